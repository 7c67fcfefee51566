//! Structured commands, encoded as a client would (any field order, any `ref`, extra fields),
//! must parse back to exactly the command and the `ref` that was sent.
//!
//! Known deviation, tolerated unless `FUZZ_STRICT` is set: a `ref` that is a floating-point
//! number may come back as a neighbouring float (serde_json's default float parsing is not
//! correctly rounded), e.g. `1.968083429401173e+243` is echoed as `1.9680834294011727e+243`,
//! so a client cannot match the reply to its request by `ref`.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};
use wsrelay::envelope::{self, Command};
use wsrelay::frame::Kind;

#[derive(Arbitrary, Debug)]
enum Op {
    Subscribe {
        channel: String,
        recover: Option<(u64, String)>,
        /// Presence info, sent as a JSON string value.
        info: Option<String>,
    },
    History {
        channel: String,
        limit: Option<u64>,
        since: Option<(u64, String)>,
    },
    Presence {
        channel: String,
        stats: bool,
    },
    Refresh {
        token: String,
    },
    Unsubscribe {
        channel: String,
    },
    PublishText {
        channel: String,
        data: String,
    },
    PublishBinary {
        channel: String,
        data: Vec<u8>,
    },
    Ping,
    Connect {
        token: String,
    },
}

#[derive(Arbitrary, Debug)]
enum Ref {
    None,
    Null,
    Str(String),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
}

#[derive(Arbitrary, Debug)]
struct Input {
    op: Op,
    reference: Ref,
    /// Unknown fields a newer client might send; they must be ignored.
    extra: Vec<(String, String)>,
    /// Reverses the field order of the encoded object.
    reversed: bool,
}

fuzz_target!(|input: Input| {
    let (mut fields, expected): (Vec<(String, Value)>, Command) = match input.op {
        Op::Ping => (vec![], Command::Ping),
        Op::Connect { token } => (vec![("token".into(), json!(token))], Command::Connect { token }),
        Op::Unsubscribe { channel } => (
            vec![("channel".into(), json!(channel))],
            Command::Unsubscribe { channel },
        ),
        Op::Subscribe {
            channel,
            recover,
            info,
        } => {
            let mut f = vec![("channel".into(), json!(channel))];
            if let Some((offset, epoch)) = &recover {
                f.push(("offset".into(), json!(offset)));
                f.push(("epoch".into(), json!(epoch)));
            }
            if let Some(i) = &info {
                f.push(("info".into(), json!(i)));
            }
            let info = info.map(|i| json!(i).to_string());
            (
                f,
                Command::Subscribe {
                    channel,
                    recover,
                    info,
                },
            )
        }
        Op::History {
            channel,
            limit,
            since,
        } => {
            let mut f = vec![("channel".into(), json!(channel))];
            if let Some(l) = limit {
                f.push(("limit".into(), json!(l)));
            }
            if let Some((offset, epoch)) = &since {
                f.push(("since".into(), json!({"offset": offset, "epoch": epoch})));
            }
            (
                f,
                Command::History {
                    channel,
                    limit,
                    since,
                },
            )
        }
        Op::Presence { channel, stats } => (
            vec![("channel".into(), json!(channel))],
            Command::Presence { channel, stats },
        ),
        Op::Refresh { token } => (vec![("token".into(), json!(token))], Command::Refresh { token }),
        Op::PublishText { channel, data } => (
            vec![("channel".into(), json!(channel)), ("data".into(), json!(data))],
            Command::Publish {
                channel,
                kind: Kind::Text,
                data: Bytes::from(data.into_bytes()),
            },
        ),
        Op::PublishBinary { channel, data } => (
            vec![
                ("channel".into(), json!(channel)),
                ("data_b64".into(), json!(B64.encode(&data))),
            ],
            Command::Publish {
                channel,
                kind: Kind::Binary,
                data: Bytes::from(data),
            },
        ),
    };
    let op = match &expected {
        Command::Ping => "ping",
        Command::Subscribe { .. } => "subscribe",
        Command::Unsubscribe { .. } => "unsubscribe",
        Command::Publish { .. } => "publish",
        Command::Connect { .. } => "connect",
        Command::Refresh { .. } => "refresh",
        Command::History { .. } => "history",
        Command::Presence { stats: false, .. } => "presence",
        Command::Presence { stats: true, .. } => "presence_stats",
    };
    fields.insert(0, ("op".into(), json!(op)));
    let reference = match input.reference {
        Ref::None => None,
        Ref::Null => Some(Value::Null),
        Ref::Str(s) => Some(json!(s)),
        Ref::Unsigned(n) => Some(json!(n)),
        Ref::Signed(n) => Some(json!(n)),
        // NaN and infinities have no JSON form (json! makes them null).
        Ref::Float(f) => Some(json!(f)),
    };
    if let Some(r) = &reference {
        fields.push(("ref".into(), r.clone()));
    }
    let known = [
        "op", "channel", "offset", "epoch", "data", "data_b64", "token", "ref", "info", "limit", "since",
    ];
    for (k, v) in input.extra {
        if !known.contains(&k.as_str()) && !fields.iter().any(|(f, _)| *f == k) {
            fields.push((k, json!(v)));
        }
    }
    if input.reversed {
        fields.reverse();
    }
    let text = encode_object(&fields);

    let parsed = envelope::parse(text.as_bytes());
    assert_eq!(parsed.command, Ok(expected), "{text}");
    let want_ref = reference.filter(|r| !r.is_null()).map(|r| r.to_string());
    let got_ref = parsed.reference.as_deref();
    if got_ref != want_ref.as_deref() && !strict() {
        // The known deviation: the same number, give or take the last bits of a float.
        let (Some(got), Some(want)) = (got_ref, want_ref.as_deref()) else {
            panic!("ref {got_ref:?}, sent {want_ref:?}: {text}");
        };
        let (g, w): (f64, f64) = (got.parse().unwrap(), want.parse().unwrap());
        assert!(
            want.contains(['.', 'e', 'E']) && near(g, w),
            "ref {got}, sent {want}: {text}"
        );
        return;
    }
    assert_eq!(got_ref, want_ref.as_deref(), "{text}");
});

fn strict() -> bool {
    static STRICT: OnceLock<bool> = OnceLock::new();
    *STRICT.get_or_init(|| std::env::var_os("FUZZ_STRICT").is_some())
}

/// A JSON object with the fields in this order.
fn encode_object(fields: &[(String, Value)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&Value::String(k.clone()).to_string());
        s.push(':');
        s.push_str(&v.to_string());
    }
    s.push('}');
    let _: Map<String, Value> = serde_json::from_str(&s).expect("valid JSON");
    s
}

/// Whether two floats are at most a few units in the last place apart.
fn near(a: f64, b: f64) -> bool {
    a.is_sign_negative() == b.is_sign_negative() && a.to_bits().abs_diff(b.to_bits()) <= 4
}
