//! Presence entries: what a channel's presence lists for one `wsrelay.v1` subscription, as
//! the JSON object both brokers store and every reply and event carries:
//!
//! ```text
//! {"client":"k3J9x0aQ-0-17","user":"u42","info":{"name":"Ada"}}
//! ```
//!
//! `client` is the connection's id (its node's id, its loop and its serial: unique across the
//! cluster and over time), `user` the token subject (absent without tokens), `info` what the
//! subscriber supplied (absent if nothing). Pure: encoding, and checking entries read back
//! from Redis, which anyone with access to it may have written: an entry is only ever passed on
//! re-encoded from its parsed fields, bounded in size, never as the bytes that were read.

use serde::Deserialize;
use serde_json::value::RawValue;

/// An entry's fields, as read back.
#[derive(Debug, Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    client: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    user: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    info: Option<&'a RawValue>,
}

/// The entry of client `client` with token subject `user` and `info` (JSON text, already
/// checked to be JSON).
pub fn encode(client: &str, user: Option<&str>, info: Option<&str>) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut out = String::with_capacity(48 + client.len() + info.map_or(0, str::len));
    out.push_str("{\"client\":");
    out.push_str(&quote(client));
    if let Some(u) = user {
        out.push_str(",\"user\":");
        out.push_str(&quote(u));
    }
    if let Some(i) = info {
        out.push_str(",\"info\":");
        out.push_str(i);
    }
    out.push('}');
    out
}

/// An entry read back (from Redis), re-encoded from its fields: `None` when it is not an entry
/// (not JSON, no `client`) or is longer than `max` bytes either way.
pub fn canonical(bytes: &[u8], max: usize) -> Option<String> {
    if bytes.len() > max {
        return None;
    }
    let f: Fields<'_> = serde_json::from_slice(bytes).ok()?;
    let info = f.info.map(RawValue::get).filter(|i| *i != "null");
    let out = encode(&f.client, f.user.as_deref(), info);
    (out.len() <= max).then_some(out)
}

/// The user an entry counts as, for distinct-user counts: its token subject, or (without one)
/// the client itself.
pub fn user_key(entry: &str) -> Option<String> {
    let f: Fields<'_> = serde_json::from_str(entry).ok()?;
    Some(match f.user {
        Some(u) => format!("u:{u}"),
        None => format!("c:{}", f.client),
    })
}

/// The client id of an entry.
pub fn client_of(entry: &str) -> Option<String> {
    let f: Fields<'_> = serde_json::from_str(entry).ok()?;
    Some(f.client.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_stay_json() {
        let e = encode("n-0-1", Some("u\"42"), Some(r#"{"name":"Ada"}"#));
        let v: serde_json::Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["client"], "n-0-1");
        assert_eq!(v["user"], "u\"42");
        assert_eq!(v["info"]["name"], "Ada");
        assert_eq!(canonical(e.as_bytes(), 512).as_deref(), Some(e.as_str()));
        assert_eq!(encode("c", None, None), r#"{"client":"c"}"#);
        assert_eq!(user_key(&e).as_deref(), Some("u:u\"42"));
        assert_eq!(user_key(r#"{"client":"c"}"#).as_deref(), Some("c:c"));
        assert_eq!(client_of(&e).as_deref(), Some("n-0-1"));
    }

    #[test]
    fn what_is_not_an_entry_is_refused_and_extra_fields_are_dropped() {
        assert_eq!(canonical(b"not json", 512), None);
        assert_eq!(canonical(br#"{"user":"u"}"#, 512), None);
        assert_eq!(canonical(br#"{"client":5}"#, 512), None);
        assert_eq!(canonical(br#"{"client":"c","user":"u"}"#, 10), None);
        assert_eq!(
            canonical(br#"{"type":"message","client":"c","x":1}"#, 512).as_deref(),
            Some(r#"{"client":"c"}"#)
        );
    }
}
