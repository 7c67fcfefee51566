//! Token authentication: verifying the HS256 JSON Web Tokens that clients present (as `?token=`
//! or in the `wsrelay.v1` connect command) and the channel grants they carry. It owns the token
//! format, the order of the checks and the meaning of a channel pattern. It is pure: no sockets,
//! no clock (the caller passes `now`), no global state. It must not decide what a refusal looks
//! like on the wire (401, error reply, close 1008) or count it: that belongs to the event loop,
//! which can use [`AuthError::reason`] as the metrics label.
//!
//! Why JWT HS256: every backend language has a JWT library that mints one from a shared secret,
//! so the backend that knows who a user is can hand the browser a token without talking to
//! wsrelay. Verifying costs one HMAC-SHA256 over ~300 bytes (about a microsecond), cheap enough
//! for every handshake. Only HS256 is accepted: a verifier that honours the token's own `alg`
//! can be talked into `none` or into treating a public key as an HMAC secret.
//!
//! # Minting a token
//!
//! The secret is the raw bytes of the `--token-secret` string, which is what JWT libraries do
//! with a string key. With PyJWT:
//!
//! ```text
//! import jwt, time
//! token = jwt.encode(
//!     {"sub": "user-42", "exp": int(time.time()) + 3600,
//!      "subscribe": ["chat:*", "user:42:*"], "publish": ["chat:*"]},
//!     SECRET, algorithm="HS256")
//! ```
//!
//! With Node's `jsonwebtoken`: `jwt.sign({sub, subscribe, publish}, SECRET, {algorithm: "HS256",
//! expiresIn: "1h"})`. From Rust (or an operator's script built on this crate), [`mint`]:
//!
//! ```
//! use wsrelay::auth::{mint, Claims, Verifier};
//!
//! let secret = b"an example secret of at least 32 bytes";
//! let token = mint(secret, &Claims {
//!     sub: "user-42".into(),
//!     exp: 2_000_000_000,
//!     nbf: None,
//!     subscribe: vec!["chat:*".into()],
//!     publish: vec!["chat:lobby".into()],
//! });
//! let id = Verifier::new(secret, 60).unwrap().verify(&token, 1_900_000_000).unwrap();
//! assert_eq!(id.subject, "user-42");
//! assert!(id.grant.may_subscribe("chat:random"));
//! assert!(!id.grant.may_publish("chat:random"));
//! ```

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::wildcard::wildcard_match;

type HmacSha256 = Hmac<Sha256>;

/// Shortest secret [`Verifier::new`] accepts, in bytes. RFC 7518 §3.2 requires an HS256 key at
/// least as long as the hash output (256 bits); a shorter one can be brute-forced from a single
/// captured token.
pub const MIN_SECRET_LEN: usize = 32;

/// Longest token looked at, in bytes; longer is [`AuthError::Malformed`] before any decoding. A
/// token with a few dozen grant patterns is well under 2 KiB, and the request head that carries
/// `?token=` is capped at 8 KiB anyway; the cap keeps a connect command from making the server
/// hash 64 KiB of junk.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Suggested allowance for clock skew between the backend that mints tokens and the relay, in
/// seconds. 60 s is the default of the common JWT libraries, so backends already expect it;
/// NTP-synced hosts are within a second of each other, so it only matters for broken clocks.
pub const DEFAULT_LEEWAY_SECS: u64 = 60;

/// The claims of a token, as [`mint`] writes them. Verification reads the same fields and ignores
/// any others (`iat`, `iss`, `jti`, ...), so tokens minted elsewhere may carry more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claims {
    /// Subject: who the holder is (a user id). Required and non-empty; a resumed session must
    /// present a token with the same subject.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch. Required: a token that never expires cannot be
    /// taken back short of changing the secret.
    pub exp: u64,
    /// Not before, seconds since the Unix epoch. Optional.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Channel patterns the holder may subscribe to (see [`Pattern`]). Absent means none.
    pub subscribe: Vec<String>,
    /// Channel patterns the holder may publish to (see [`Pattern`]). Absent means none.
    pub publish: Vec<String>,
}

/// What a connection keeps after a successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`.
    pub subject: String,
    /// The token's `exp` (seconds since the Unix epoch). Tokens are checked at the handshake
    /// only; a loop that wants connections to end with their token can compare against this.
    pub expires_at: u64,
    /// Which channels the holder may use.
    pub grant: Grant,
}

/// Why a token was refused. Every variant means the same thing to the event loop: refuse the
/// handshake with 401 (or the connect command with an error). The variants differ in what the
/// *client* should do, and are counted separately so an operator can tell an attack (forged
/// signatures) from a deployment mistake (wrong secret, skewed clock) from normal churn (expiry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No token was presented. [`Verifier::verify`] never returns it; it is here so the loop can
    /// report a missing token through the same type and metrics label.
    Missing,
    /// Not a well-formed JWT (wrong number of parts, bad base64url, not JSON, a claim of the
    /// wrong type, too long). The text says which part; it names no secret data.
    Malformed(&'static str),
    /// The header's `alg` is not `HS256` (for example `none`). Holds the offending value,
    /// truncated to 32 bytes since it comes from the client.
    UnsupportedAlgorithm(String),
    /// The signature does not match: forged, altered, or minted with another secret.
    BadSignature,
    /// `exp` (plus leeway) has passed. The client should fetch a fresh token and reconnect.
    Expired,
    /// `nbf` (minus leeway) has not arrived yet; usually a clock that is far off.
    NotYetValid,
    /// A required claim (`sub` or `exp`) is absent or empty.
    MissingClaim(&'static str),
}

impl AuthError {
    /// A short, stable label for metrics (`handshake_failures{reason="expired"}`).
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::MissingClaim(_) => "missing_claim",
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Missing => f.write_str("no token presented"),
            AuthError::Malformed(what) => write!(f, "malformed token: {what}"),
            // Debug formatting escapes control characters in the client-supplied value.
            AuthError::UnsupportedAlgorithm(alg) => {
                write!(f, "unsupported token algorithm {alg:?} (only HS256)")
            }
            AuthError::BadSignature => f.write_str("token signature does not match"),
            AuthError::Expired => f.write_str("token expired"),
            AuthError::NotYetValid => f.write_str("token not valid yet"),
            AuthError::MissingClaim(claim) => write!(f, "token lacks the {claim:?} claim"),
        }
    }
}

impl std::error::Error for AuthError {}

/// Checks tokens against one secret. Build it once at startup and share it (it is `Clone`, and
/// `verify` takes `&self`).
#[derive(Clone)]
pub struct Verifier {
    /// HMAC already keyed with the secret: cloning it per token skips re-hashing the key.
    mac: HmacSha256,
    leeway: u64,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret (or the keyed state derived from it) into a log.
        f.debug_struct("Verifier")
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for tokens signed with `secret`, allowing `leeway_secs` of clock skew on `exp`
    /// and `nbf` (see [`DEFAULT_LEEWAY_SECS`]). Refuses a secret shorter than [`MIN_SECRET_LEN`],
    /// with a message naming the flag, so a weak secret fails at startup.
    pub fn new(secret: &[u8], leeway_secs: u64) -> Result<Self, String> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(format!(
                "--token-secret must be at least {MIN_SECRET_LEN} bytes (it has {}): a shorter \
                 HS256 secret can be guessed offline from one token",
                secret.len()
            ));
        }
        Ok(Verifier::with_any_key(secret, leeway_secs))
    }

    /// No length check: for tests against published vectors with short keys.
    fn with_any_key(secret: &[u8], leeway: u64) -> Self {
        let mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
        Verifier { mac, leeway }
    }

    /// Verifies `token` at time `now` (seconds since the Unix epoch, from
    /// `SystemTime::now().duration_since(UNIX_EPOCH)`).
    ///
    /// The order matters: the header is read only to check `alg`; the signature is checked
    /// (in constant time) before the payload is even decoded, so nothing an attacker wrote is
    /// interpreted until it is known to come from the secret's holder. Then the claims: `sub`,
    /// `exp`, `nbf`. A token is valid while `now < exp + leeway` (RFC 7519: the token must not be
    /// accepted *on or after* `exp`) and once `now + leeway >= nbf`.
    pub fn verify(&self, token: &str, now: u64) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed("longer than 8 KiB"));
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed("not three dot-separated parts"));
        };

        let header: Header =
            decode_json(header).ok_or(AuthError::Malformed("header is not base64url JSON"))?;
        match header.alg.as_deref() {
            Some("HS256") => {}
            Some(other) => {
                let cut = (0..=other.len().min(32))
                    .rev()
                    .find(|&i| other.is_char_boundary(i))
                    .unwrap_or(0);
                return Err(AuthError::UnsupportedAlgorithm(other[..cut].to_owned()));
            }
            None => return Err(AuthError::Malformed("header has no alg")),
        }
        if header.crit.is_some() {
            // RFC 7515 §4.1.11: extensions listed in `crit` must be understood or the token
            // refused; we understand none.
            return Err(AuthError::Malformed("header has crit extensions"));
        }

        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| AuthError::Malformed("signature is not base64url"))?;
        let signed = &token.as_bytes()[..header_len(token)];
        let mut mac = self.mac.clone();
        mac.update(signed);
        // verify_slice compares in constant time; a wrong length fails without comparing.
        mac.verify_slice(&signature)
            .map_err(|_| AuthError::BadSignature)?;

        let claims: RawClaims = decode_json(payload).ok_or(AuthError::Malformed(
            "payload is not base64url JSON with the expected claim types",
        ))?;
        let subject = claims
            .sub
            .filter(|s| !s.is_empty())
            .ok_or(AuthError::MissingClaim("sub"))?;
        let exp = claims.exp.ok_or(AuthError::MissingClaim("exp"))?;
        let exp = numeric_date(&exp).ok_or(AuthError::Malformed("exp is not a time"))?;
        if now >= exp.saturating_add(self.leeway) {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = claims.nbf {
            let nbf = numeric_date(&nbf).ok_or(AuthError::Malformed("nbf is not a time"))?;
            if now.saturating_add(self.leeway) < nbf {
                return Err(AuthError::NotYetValid);
            }
        }
        Ok(Identity {
            subject,
            expires_at: exp,
            grant: Grant::new(&claims.subscribe, &claims.publish),
        })
    }
}

/// Signs `claims` with `secret` as an HS256 JWT (`{"alg":"HS256","typ":"JWT"}` header), exactly
/// as any JWT library would. For tests and operators' scripts; production backends normally use
/// their own language's JWT library (see the module documentation).
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
    let payload = serde_json::to_vec(claims).expect("claims are plain strings and numbers");
    let mut token = URL_SAFE_NO_PAD.encode(HEADER);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(payload, &mut token);
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(token.as_bytes());
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(mac.finalize().into_bytes(), &mut token);
    token
}

/// The channels one token holder may use: a list of patterns for subscribing and one for
/// publishing. A channel is allowed when any pattern matches. An empty list allows nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Grant {
    subscribe: Box<[Pattern]>,
    publish: Box<[Pattern]>,
}

impl Grant {
    /// A grant from pattern strings (see [`Pattern`] for the syntax).
    pub fn new<S: AsRef<str>>(subscribe: &[S], publish: &[S]) -> Self {
        let patterns = |list: &[S]| list.iter().map(|p| Pattern::new(p.as_ref())).collect();
        Grant {
            subscribe: patterns(subscribe),
            publish: patterns(publish),
        }
    }

    /// Everything allowed: what connections get when no `--token-secret` is configured, so the
    /// loop can check grants unconditionally.
    pub fn allow_all() -> Self {
        Grant::new(&["*"], &["*"])
    }

    /// Whether the holder may subscribe to `channel`.
    pub fn may_subscribe(&self, channel: &str) -> bool {
        self.subscribe.iter().any(|p| p.matches(channel))
    }

    /// Whether the holder may publish to `channel`.
    pub fn may_publish(&self, channel: &str) -> bool {
        self.publish.iter().any(|p| p.matches(channel))
    }
}

/// A channel pattern: a channel name in which every `*` matches any run of characters, including
/// none and including `:`. So `chat:lobby` matches only itself, `chat:*` every channel starting
/// with `chat:`, `*:admin` every channel ending with `:admin`, `user:*:inbox` the inboxes of all
/// users, and `*` every channel. There is no escape: a `*` in a pattern is always a wildcard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(Box<str>);

impl Pattern {
    /// A pattern from its text. Every string is a valid pattern.
    pub fn new(pattern: &str) -> Self {
        Pattern(pattern.into())
    }

    /// The pattern's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `channel` matches the whole pattern.
    pub fn matches(&self, channel: &str) -> bool {
        wildcard_match(&self.0, channel)
    }
}

/// The JOSE header fields we look at.
#[derive(Deserialize)]
struct Header {
    alg: Option<String>,
    crit: Option<serde::de::IgnoredAny>,
}

/// The claims as they arrive: optional, so a missing one is reported by name rather than as a
/// generic parse error. Unknown claims are ignored; a duplicated claim is a parse error.
#[derive(Deserialize)]
struct RawClaims {
    sub: Option<String>,
    exp: Option<serde_json::Number>,
    nbf: Option<serde_json::Number>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

/// A JWT NumericDate: seconds since the epoch, which RFC 7519 allows to be fractional. Negative
/// or non-finite values are not times. Fractions are dropped; the leeway dwarfs them.
fn numeric_date(n: &serde_json::Number) -> Option<u64> {
    if let Some(secs) = n.as_u64() {
        return Some(secs);
    }
    let secs = n.as_f64()?;
    (secs.is_finite() && secs >= 0.0).then_some(secs as u64)
}

/// Length of `header.payload`, the signed part: everything before the last dot.
fn header_len(token: &str) -> usize {
    token.rfind('.').expect("checked: three parts")
}

fn decode_json<T: for<'de> Deserialize<'de>>(part: &str) -> Option<T> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_700_000_000;
    const LEEWAY: u64 = 60;

    fn claims() -> Claims {
        Claims {
            sub: "user-42".into(),
            exp: NOW + 3600,
            nbf: None,
            subscribe: vec!["chat:*".into(), "user:42:*".into()],
            publish: vec!["chat:lobby".into()],
        }
    }

    fn verifier() -> Verifier {
        Verifier::new(SECRET, LEEWAY).unwrap()
    }

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    /// A token with the given raw header and payload JSON, signed correctly with SECRET.
    fn signed(header: &str, payload: &str) -> String {
        let mut mac = HmacSha256::new_from_slice(SECRET).unwrap();
        let signed = format!("{}.{}", b64(header), b64(payload));
        mac.update(signed.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signed}.{sig}")
    }

    #[track_caller]
    fn refused(token: &str, now: u64) -> AuthError {
        verifier().verify(token, now).unwrap_err()
    }

    #[test]
    fn minted_token_round_trips() {
        let id = verifier().verify(&mint(SECRET, &claims()), NOW).unwrap();
        assert_eq!(id.subject, "user-42");
        assert_eq!(id.expires_at, NOW + 3600);
        assert!(id.grant.may_subscribe("chat:lobby"));
        assert!(id.grant.may_subscribe("user:42:inbox"));
        assert!(!id.grant.may_subscribe("user:43:inbox"));
        assert!(id.grant.may_publish("chat:lobby"));
        assert!(!id.grant.may_publish("chat:other"));
    }

    #[test]
    fn accepts_a_token_made_by_an_independent_implementation() {
        // Made with Python's hmac/hashlib/base64 modules, with an extra `iat` claim.
        let token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
            eyJzdWIiOiJ1c2VyLTQyIiwiZXhwIjoyMDAwMDAwMDAwLCJpYXQiOjE3MDAwMDAwMDAsInN1YnNjcmliZSI6\
            WyJjaGF0OioiLCJ1c2VyOjQyOioiXSwicHVibGlzaCI6WyJjaGF0OmxvYmJ5Il19.\
            y2P3pabnLFFw4jEPwiGwCMMMt6Q2ot0Rff4EMEEhviM";
        let id = verifier().verify(token, NOW).unwrap();
        assert_eq!(id.subject, "user-42");
        assert_eq!(id.expires_at, 2_000_000_000);
        assert_eq!(id.grant, Grant::new(&["chat:*", "user:42:*"], &["chat:lobby"]));
    }

    #[test]
    fn jwt_io_example_passes_the_signature_check() {
        // The well-known HS256 example (secret "your-256-bit-secret"). It has no `exp`, so
        // getting as far as MissingClaim("exp") proves the signature was accepted.
        let token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
            eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.\
            SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
        let v = Verifier::with_any_key(b"your-256-bit-secret", 0);
        assert_eq!(v.verify(token, NOW), Err(AuthError::MissingClaim("exp")));
        let wrong = Verifier::with_any_key(b"your-256-bit-secreT", 0);
        assert_eq!(wrong.verify(token, NOW), Err(AuthError::BadSignature));
    }

    #[test]
    fn short_secret_is_refused_at_startup() {
        let err = Verifier::new(b"too short", LEEWAY).unwrap_err();
        assert!(err.contains("--token-secret"), "{err}");
        assert!(Verifier::new(&[7; MIN_SECRET_LEN], LEEWAY).is_ok());
    }

    #[test]
    fn debug_does_not_leak_the_secret() {
        let shown = format!("{:?}", verifier());
        assert!(!shown.contains("0123"), "{shown}");
    }

    #[test]
    fn forged_signature_is_refused() {
        let token = mint(b"another secret, also 32 bytes long", &claims());
        assert_eq!(refused(&token, NOW), AuthError::BadSignature);
    }

    #[test]
    fn altered_payload_is_refused() {
        // Keep the signature, swap in a payload that grants everything.
        let token = mint(SECRET, &claims());
        let sig = token.rsplit('.').next().unwrap();
        let greedy = Claims {
            publish: vec!["*".into()],
            ..claims()
        };
        let forged = mint(SECRET, &greedy);
        let forged_body = &forged[..forged.rfind('.').unwrap()];
        assert_eq!(
            refused(&format!("{forged_body}.{sig}"), NOW),
            AuthError::BadSignature
        );
    }

    #[test]
    fn flipped_signature_bit_is_refused() {
        let token = mint(SECRET, &claims());
        let (body, sig) = token.rsplit_once('.').unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        raw[31] ^= 1;
        let token = format!("{body}.{}", URL_SAFE_NO_PAD.encode(raw));
        assert_eq!(refused(&token, NOW), AuthError::BadSignature);
    }

    #[test]
    fn alg_none_is_refused_with_or_without_a_signature() {
        let payload = serde_json::to_string(&claims()).unwrap();
        let unsigned = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&payload));
        assert_eq!(
            refused(&unsigned, NOW),
            AuthError::UnsupportedAlgorithm("none".into())
        );
        // Even with a valid HS256 signature over it, `none` is not a way in.
        let signed_none = signed(r#"{"alg":"none"}"#, &payload);
        assert_eq!(
            refused(&signed_none, NOW),
            AuthError::UnsupportedAlgorithm("none".into())
        );
    }

    #[test]
    fn other_algorithms_are_refused() {
        let payload = serde_json::to_string(&claims()).unwrap();
        for alg in ["HS384", "HS512", "RS256", "ES256", "hs256", "HS256 "] {
            let token = signed(&format!(r#"{{"alg":"{alg}"}}"#), &payload);
            assert_eq!(
                refused(&token, NOW),
                AuthError::UnsupportedAlgorithm(alg.into()),
                "{alg}"
            );
        }
        let long = "X".repeat(1000);
        let token = signed(&format!(r#"{{"alg":"{long}"}}"#), &payload);
        assert_eq!(
            refused(&token, NOW),
            AuthError::UnsupportedAlgorithm("X".repeat(32))
        );
        let token = signed(r#"{"typ":"JWT"}"#, &payload);
        assert_eq!(refused(&token, NOW), AuthError::Malformed("header has no alg"));
        let token = signed(r#"{"alg":"HS256","crit":["b64"]}"#, &payload);
        assert!(matches!(refused(&token, NOW), AuthError::Malformed(_)));
    }

    #[test]
    fn truncated_and_malformed_tokens_are_refused() {
        let token = mint(SECRET, &claims());
        let (body, sig) = token.rsplit_once('.').unwrap();
        // Signature dropped entirely: well-formed but empty, so it does not match.
        assert_eq!(refused(&format!("{body}."), NOW), AuthError::BadSignature);
        // Signature cut short by a few bytes' worth of characters.
        assert_eq!(
            refused(&format!("{body}.{}", &sig[..40]), NOW),
            AuthError::BadSignature
        );
        // A cut that leaves an impossible base64 length.
        assert_eq!(
            refused(&format!("{body}.{}", &sig[..41]), NOW),
            AuthError::Malformed("signature is not base64url")
        );
        // No signature part at all, or one part too many.
        assert_eq!(
            refused(body, NOW),
            AuthError::Malformed("not three dot-separated parts")
        );
        assert_eq!(
            refused(&format!("{token}.x"), NOW),
            AuthError::Malformed("not three dot-separated parts")
        );
        for junk in ["", ".", "..", "a.b.c", "🦀.🦀.🦀", "eyJ.eyJ.eyJ"] {
            assert!(matches!(refused(junk, NOW), AuthError::Malformed(_)), "{junk:?}");
        }
        // Padding and the standard alphabet are not base64url-without-padding.
        assert!(matches!(
            refused(&format!("{body}.{sig}="), NOW),
            AuthError::Malformed(_)
        ));
        let std_sig = sig.replace('-', "+").replace('_', "/");
        if std_sig != sig {
            assert!(matches!(
                refused(&format!("{body}.{std_sig}"), NOW),
                AuthError::Malformed(_)
            ));
        }
        let huge = format!("{body}.{}", "A".repeat(MAX_TOKEN_LEN));
        assert_eq!(refused(&huge, NOW), AuthError::Malformed("longer than 8 KiB"));
    }

    #[test]
    fn signed_but_unusable_payloads_are_refused() {
        let h = r#"{"alg":"HS256","typ":"JWT"}"#;
        let cases = [
            (r#"{"exp":1800000000}"#, AuthError::MissingClaim("sub")),
            (r#"{"sub":"","exp":1800000000}"#, AuthError::MissingClaim("sub")),
            (r#"{"sub":null,"exp":1800000000}"#, AuthError::MissingClaim("sub")),
            (r#"{"sub":"a"}"#, AuthError::MissingClaim("exp")),
        ];
        for (payload, want) in cases {
            assert_eq!(refused(&signed(h, payload), NOW), want, "{payload}");
        }
        for payload in [
            r#"{"sub":42,"exp":1800000000}"#,
            r#"{"sub":"a","exp":"tomorrow"}"#,
            r#"{"sub":"a","exp":-5}"#,
            r#"{"sub":"a","exp":1800000000,"subscribe":"chat:*"}"#,
            r#"{"sub":"a","exp":1800000000,"publish":[1]}"#,
            r#"{"sub":"a","sub":"b","exp":1800000000}"#,
            r#"["sub","exp"]"#,
            "not json",
        ] {
            assert!(
                matches!(refused(&signed(h, payload), NOW), AuthError::Malformed(_)),
                "{payload}"
            );
        }
    }

    #[test]
    fn expiry_boundary_honours_the_leeway() {
        let exp = NOW;
        let token = mint(SECRET, &Claims { exp, ..claims() });
        let v = verifier();
        // The last second at which the token is still accepted.
        assert!(v.verify(&token, exp + LEEWAY - 1).is_ok());
        // On or after exp + leeway it is not (RFC 7519: not accepted on or after exp).
        assert_eq!(v.verify(&token, exp + LEEWAY), Err(AuthError::Expired));
        assert_eq!(v.verify(&token, exp + LEEWAY + 1), Err(AuthError::Expired));
        // Without leeway, exp itself is the first refused second.
        let strict = Verifier::new(SECRET, 0).unwrap();
        assert!(strict.verify(&token, exp - 1).is_ok());
        assert_eq!(strict.verify(&token, exp), Err(AuthError::Expired));
    }

    #[test]
    fn not_before_boundary_honours_the_leeway() {
        let nbf = NOW + 1000;
        let token = mint(
            SECRET,
            &Claims {
                nbf: Some(nbf),
                exp: nbf + 3600,
                ..claims()
            },
        );
        let v = verifier();
        assert!(v.verify(&token, nbf - LEEWAY).is_ok());
        assert_eq!(v.verify(&token, nbf - LEEWAY - 1), Err(AuthError::NotYetValid));
        assert!(v.verify(&token, nbf).is_ok());
    }

    #[test]
    fn fractional_and_huge_times_are_handled() {
        let h = r#"{"alg":"HS256"}"#;
        let token = signed(h, r#"{"sub":"a","exp":1700000100.75,"nbf":1699999999.5}"#);
        assert_eq!(verifier().verify(&token, NOW).unwrap().expires_at, 1_700_000_100);
        // exp + leeway must not overflow into the past.
        let token = signed(h, &format!(r#"{{"sub":"a","exp":{}}}"#, u64::MAX));
        assert!(verifier().verify(&token, NOW).is_ok());
    }

    #[test]
    fn missing_grant_lists_allow_nothing() {
        let token = signed(r#"{"alg":"HS256"}"#, r#"{"sub":"a","exp":1800000000}"#);
        let id = verifier().verify(&token, NOW).unwrap();
        assert!(!id.grant.may_subscribe("chat"));
        assert!(!id.grant.may_publish("chat"));
        assert!(!Grant::default().may_subscribe(""));
        assert!(Grant::allow_all().may_publish("anything:at:all"));
        assert!(Grant::allow_all().may_subscribe(""));
    }

    #[test]
    fn errors_read_as_lowercase_sentences_with_stable_labels() {
        let all = [
            AuthError::Missing,
            AuthError::Malformed("x"),
            AuthError::UnsupportedAlgorithm("none".into()),
            AuthError::BadSignature,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::MissingClaim("sub"),
        ];
        let mut labels = std::collections::HashSet::new();
        for e in &all {
            let text = e.to_string();
            assert!(text.starts_with(|c: char| c.is_ascii_lowercase()), "{text}");
            assert!(labels.insert(e.reason()), "duplicate label {}", e.reason());
        }
        assert_eq!(
            AuthError::UnsupportedAlgorithm("a\nb".into()).to_string(),
            r#"unsupported token algorithm "a\nb" (only HS256)"#
        );
    }

    #[test]
    fn patterns_exact_prefix_suffix_middle() {
        let m = |p: &str, c: &str| Pattern::new(p).matches(c);
        // `*` alone matches everything, even the empty name.
        assert!(m("*", "chat"));
        assert!(m("*", ""));
        // Exact names match only themselves: no partial or prefix match.
        assert!(m("chat", "chat"));
        assert!(!m("chat", "chat2"));
        assert!(!m("chat", "cha"));
        assert!(!m("chat", "xchat"));
        assert!(!m("", "a"));
        // Prefix.
        assert!(m("chat:*", "chat:lobby"));
        assert!(m("chat:*", "chat:"));
        assert!(!m("chat:*", "chat"));
        assert!(!m("chat:*", "chatroom:lobby"));
        assert!(!m("chat:*", "xchat:lobby"));
        // Suffix.
        assert!(m("*:admin", "ops:admin"));
        assert!(!m("*:admin", "ops:admins"));
        // Middle.
        assert!(m("user:*:inbox", "user:42:inbox"));
        assert!(m("user:*:inbox", "user::inbox"));
        assert!(m("user:*:inbox", "user:a:b:inbox"));
        assert!(!m("user:*:inbox", "user:42:outbox"));
        assert!(!m("user:*:inbox", "user:inbox"));
        // `*` matches `:` too, so user:42:* covers deeper names.
        assert!(m("user:42:*", "user:42:a:b"));
        assert!(!m("user:42:*", "user:420:a"));
        // Several stars, repeated pieces, overlaps between prefix and suffix.
        assert!(m("a*b*c", "abc"));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(!m("a*b*c", "acb"));
        assert!(m("ab*b", "abb"));
        assert!(!m("ab*b", "ab"));
        assert!(m("**", "x"));
        assert!(m("é*ü", "éaü"));
    }
}
