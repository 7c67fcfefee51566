//! `http::percent_decode` and `http::query_param`, against a strict reference and by round trip.
//!
//! Properties:
//! - `percent_decode` agrees with a strict RFC 3986 decoder: `%` must be followed by exactly two
//!   hex digits, and the result must be UTF-8.
//! - Encoding any string and decoding it gives the string back.
//! - `query_param` finds a parameter whose value was percent-encoded, whatever else the query
//!   holds after it, and never finds anything in no query.
//! - On arbitrary query strings and names it never panics, and what it returns is what the
//!   reference decoder makes of some `name=value` pair of the query.
//!
//! `%+X` (a plus sign and one hex digit), once decoded as the byte `0X`, is refused like any
//! other bad escape: RFC 3986 allows only `%` HEXDIG HEXDIG (seed `known-plus-escape`).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use wsrelay::http;

#[derive(Arbitrary, Debug)]
struct Input {
    raw: String,
    name: String,
    value: String,
}

fuzz_target!(|input: Input| {
    let Input { raw, name, value } = input;

    assert_eq!(
        http::percent_decode(&raw),
        reference_decode(&raw),
        "percent_decode({raw:?}) differs from the strict decoder"
    );
    assert_eq!(
        http::percent_decode(&encode(&value)).as_deref(),
        Some(value.as_str())
    );

    assert_eq!(http::query_param(None, &name), None);
    if !name.contains(['&', '=']) {
        let query = format!("{name}={}&{raw}", encode(&value));
        assert_eq!(
            http::query_param(Some(&query), &name).as_deref(),
            Some(value.as_str()),
            "query {query:?}"
        );
    }

    if let Some(found) = http::query_param(Some(&raw), &name) {
        let matches = raw.split('&').any(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            k == name && reference_decode(&v.replace('+', " ")).as_deref() == Some(found.as_str())
        });
        assert!(matches, "query_param({raw:?}, {name:?}) = {found:?}");
    }
});

/// Every byte but the unreserved ones as `%XX`.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The strict decoder: `%` HEXDIG HEXDIG, and the result must be UTF-8.
fn reference_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = hex(*b.get(i + 1)?)?;
            let lo = hex(*b.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}
