//! The Origin allow-list (`--allowed-origin`): parsing the patterns once at startup and deciding,
//! per WebSocket handshake, whether the request's `Origin` header is allowed. It owns the pattern
//! syntax and the comparison rules. It is pure: no sockets, no global state. It must not write
//! the 403 or count refusals; the event loop does that.
//!
//! The threat is cross-site WebSocket hijacking: a page on `evil.com` opens a WebSocket to the
//! relay from a victim's browser, which attaches the victim's cookies. Browsers always send
//! `Origin` on a WebSocket handshake and scripts cannot forge it, so checking it stops that.
//! A request **without** `Origin` is allowed: it does not come from a browser page (backends,
//! CLI tools, mobile apps), and such clients could send any `Origin` they like anyway, so
//! refusing them would protect nothing; tokens are what keeps them out. `Origin: null`
//! (sandboxed iframes, `file://` pages) matches only the `*` pattern.
//!
//! # Pattern syntax
//!
//! - `*`: any origin (the same as not setting the flag, but explicit).
//! - `scheme://host[:port]`, no path. The scheme must match exactly (ASCII case aside). The host
//!   is compared case-insensitively. The port must match; when a pattern or an origin leaves it
//!   out, the scheme's default applies (80 for `http`/`ws`, 443 for `https`/`wss`), so
//!   `https://example.com` and `https://example.com:443` are the same origin. `:*` allows any
//!   port (`http://localhost:*` for development servers).
//! - `*` in the host: a leading `*.` matches one or more labels, so `https://*.example.com`
//!   allows `https://a.example.com` and `https://a.b.example.com` but not `https://example.com`
//!   (list that separately) and not `https://evil-example.com`. A `*` anywhere else matches
//!   within a single label: `https://pr-*.preview.example.com` allows `https://pr-12.preview.example.com`.
//!   Beware `https://*example.com`: it allows `https://evilexample.com` too. A host of `*`
//!   alone allows every host on that scheme and port. Internationalised names must be written
//!   in their `xn--` form, which is what browsers send.

use crate::wildcard::wildcard_match;

/// The parsed `--allowed-origin` list. Empty (and `Default`) allows everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPolicy {
    rules: Vec<Rule>,
    /// Set when the list is empty or contains `*`: every origin is allowed.
    any: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// Lowercase.
    scheme: String,
    host: HostPattern,
    port: PortPattern,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// `*`: any host.
    Any,
    /// An IPv6 literal with its brackets, lowercase, compared whole (it may contain dots).
    Literal(String),
    /// Labels (lowercase) matched right to left, each a wildcard pattern. With `subdomains`, the
    /// pattern began with `*.` and the host must have at least one more label on the left.
    Labels { subdomains: bool, labels: Vec<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortPattern {
    Any,
    /// The effective port: explicit, or the scheme's default, or `None` for a scheme without
    /// one and no port given.
    Exact(Option<u16>),
}

impl OriginPolicy {
    /// Parses `--allowed-origin` values. An empty list allows every origin. The error names the
    /// first bad pattern and what is wrong with it.
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        let mut policy = OriginPolicy {
            rules: Vec::with_capacity(patterns.len()),
            any: patterns.is_empty(),
        };
        for p in patterns {
            if p.trim() == "*" {
                policy.any = true;
                continue;
            }
            let rule = parse_rule(p.trim()).map_err(|why| format!("--allowed-origin {p:?}: {why}"))?;
            policy.rules.push(rule);
        }
        Ok(policy)
    }

    /// A policy that allows every origin (what no `--allowed-origin` flag means).
    pub fn allow_all() -> Self {
        OriginPolicy {
            rules: Vec::new(),
            any: true,
        }
    }

    /// Whether origins are checked at all, for logging the policy at startup.
    pub fn is_restricted(&self) -> bool {
        !self.any
    }

    /// Whether a handshake with this `Origin` header value (trimmed; `None` when absent) may
    /// proceed. An absent header is allowed (see the module documentation); a value that is not
    /// a serialized origin (has a path, userinfo, a bad port) is refused unless everything is
    /// allowed.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return true;
        };
        if self.any {
            return true;
        }
        let Ok(parts) = split_origin(origin) else {
            return false;
        };
        let Ok(port) = effective_port(parts.scheme, parts.port) else {
            return false;
        };
        // One lowercase copy per handshake: hosts arrive in any case, patterns are stored lowercase.
        let host = parts.host.to_ascii_lowercase();
        self.rules.iter().any(|rule| {
            rule.scheme.eq_ignore_ascii_case(parts.scheme)
                && match rule.port {
                    PortPattern::Any => true,
                    PortPattern::Exact(p) => p == port,
                }
                && rule.host.matches(&host)
        })
    }
}

impl Default for OriginPolicy {
    /// Allows every origin, like an empty `--allowed-origin` list.
    fn default() -> Self {
        OriginPolicy::allow_all()
    }
}

impl HostPattern {
    /// `host` is lowercase.
    fn matches(&self, host: &str) -> bool {
        if host.is_empty() || (!host.starts_with('[') && host.split('.').any(str::is_empty)) {
            // Browsers never send empty labels; refusing them keeps the label count honest.
            return false;
        }
        match self {
            HostPattern::Any => true,
            HostPattern::Literal(literal) => host == literal,
            HostPattern::Labels { subdomains, labels } => {
                let mut host_labels = host.rsplit('.');
                for pattern in labels.iter().rev() {
                    match host_labels.next() {
                        Some(label) if wildcard_match(pattern, label) => {}
                        _ => return false,
                    }
                }
                // With `*.`, at least one label must remain; without it, none may.
                host_labels.next().is_some() == *subdomains
            }
        }
    }
}

/// An origin split into its parts, without interpreting them.
struct Parts<'a> {
    scheme: &'a str,
    host: &'a str,
    port: Option<&'a str>,
}

/// Splits `scheme://host[:port]`. Used for both header values and patterns, so both follow the
/// same shape rules.
fn split_origin(s: &str) -> Result<Parts<'_>, &'static str> {
    let (scheme, rest) = s.split_once("://").ok_or("expected scheme://host[:port] or *")?;
    let valid_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !valid_scheme {
        return Err("the scheme must be letters, digits, '+', '-' or '.' (no wildcards)");
    }
    if rest.contains(['/', '?', '#']) {
        return Err("an origin has no path, query or fragment (drop the trailing '/')");
    }
    if rest.contains('@') {
        return Err("an origin has no user name");
    }
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        // IPv6 literal: the port, if any, follows the closing bracket.
        let (addr, after) = inner.split_once(']').ok_or("unclosed '[' in the host")?;
        let host = &rest[..addr.len() + 2];
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':').ok_or("junk after ']'")?)),
        }
    } else {
        match rest.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err("the host is empty");
    }
    Ok(Parts { scheme, host, port })
}

/// The default port of the schemes browsers use for pages and sockets.
fn default_port(scheme: &str) -> Option<u16> {
    match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// An explicit port (digits only, 1-65535) or the scheme's default.
fn effective_port(scheme: &str, port: Option<&str>) -> Result<Option<u16>, &'static str> {
    const BAD: &str = "the port must be a number from 1 to 65535, or *";
    match port {
        None => Ok(default_port(scheme)),
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => match p.parse() {
            Ok(0) | Err(_) => Err(BAD),
            Ok(n) => Ok(Some(n)),
        },
        Some(_) => Err(BAD),
    }
}

fn parse_rule(pattern: &str) -> Result<Rule, &'static str> {
    let parts = split_origin(pattern)?;
    let port = match parts.port {
        Some("*") => PortPattern::Any,
        port => PortPattern::Exact(effective_port(parts.scheme, port)?),
    };
    let host = parts.host.to_ascii_lowercase();
    let host = if host == "*" {
        HostPattern::Any
    } else if host.starts_with('[') {
        let valid = host[1..host.len() - 1]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        if !valid {
            return Err("an IPv6 host may hold only hex digits, ':' and '.' (no wildcards)");
        }
        HostPattern::Literal(host)
    } else {
        let valid = host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'*'));
        if !valid {
            return Err("the host may hold only letters, digits, '-', '.' and '*'");
        }
        let (subdomains, rest) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, host.as_str()),
        };
        if rest.split('.').any(str::is_empty) {
            return Err("the host has an empty label (a stray '.')");
        }
        HostPattern::Labels {
            subdomains,
            labels: rest.split('.').map(str::to_owned).collect(),
        }
    };
    Ok(Rule {
        scheme: parts.scheme.to_ascii_lowercase(),
        host,
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn policy(patterns: &[&str]) -> OriginPolicy {
        let owned: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
        OriginPolicy::new(&owned).unwrap()
    }

    #[track_caller]
    fn bad(pattern: &str) -> String {
        OriginPolicy::new(&[pattern.to_string()]).unwrap_err()
    }

    #[test]
    fn no_patterns_or_star_allow_everything() {
        let all = [
            policy(&[]),
            policy(&["*"]),
            OriginPolicy::allow_all(),
            OriginPolicy::default(),
        ];
        for p in all {
            assert!(!p.is_restricted());
            assert!(p.allows(Some("https://anything.example")));
            assert!(p.allows(Some("null")));
            assert!(p.allows(Some("garbage")));
            assert!(p.allows(None));
        }
        let mixed = policy(&["https://example.com", "*"]);
        assert!(mixed.allows(Some("http://elsewhere.test:8080")));
    }

    #[test]
    fn absent_origin_is_allowed_but_null_is_not() {
        let p = policy(&["https://example.com"]);
        assert!(p.is_restricted());
        assert!(p.allows(None));
        assert!(!p.allows(Some("null")));
        assert!(!p.allows(Some("")));
    }

    #[test]
    fn exact_origin() {
        let p = policy(&["https://example.com"]);
        assert!(p.allows(Some("https://example.com")));
        assert!(!p.allows(Some("https://www.example.com")));
        assert!(!p.allows(Some("https://example.com.evil.test")));
        assert!(!p.allows(Some("https://evil-example.com")));
        assert!(!p.allows(Some("https://example.co")));
    }

    #[test]
    fn host_is_case_insensitive_scheme_too() {
        let p = policy(&["https://Example.COM"]);
        assert!(p.allows(Some("https://example.com")));
        assert!(p.allows(Some("https://EXAMPLE.com")));
        assert!(p.allows(Some("HTTPS://example.com")));
        let sub = policy(&["https://*.example.com"]);
        assert!(sub.allows(Some("https://App.Example.Com")));
    }

    #[test]
    fn scheme_must_match() {
        let p = policy(&["https://example.com"]);
        assert!(!p.allows(Some("http://example.com")));
        assert!(!p.allows(Some("http://example.com:443")));
        assert!(!p.allows(Some("wss://example.com")));
        assert!(!p.allows(Some("ftp://example.com")));
    }

    #[test]
    fn default_ports_are_implied_both_ways() {
        let p = policy(&["https://example.com"]);
        assert!(p.allows(Some("https://example.com:443")));
        assert!(!p.allows(Some("https://example.com:8443")));
        let explicit = policy(&["https://example.com:443"]);
        assert!(explicit.allows(Some("https://example.com")));
        let http = policy(&["http://example.com"]);
        assert!(http.allows(Some("http://example.com:80")));
        assert!(!http.allows(Some("http://example.com:8080")));
        let custom = policy(&["http://example.com:8080"]);
        assert!(custom.allows(Some("http://example.com:8080")));
        assert!(!custom.allows(Some("http://example.com")));
    }

    #[test]
    fn port_wildcard() {
        let p = policy(&["http://localhost:*"]);
        assert!(p.allows(Some("http://localhost:3000")));
        assert!(p.allows(Some("http://localhost")));
        assert!(!p.allows(Some("https://localhost:3000")));
        assert!(!p.allows(Some("http://localhost.evil.test:3000")));
        assert!(!p.allows(Some("http://localhost:0")));
        assert!(!p.allows(Some("http://localhost:99999")));
        assert!(!p.allows(Some("http://localhost:")));
        assert!(!p.allows(Some("http://localhost:+80")));
    }

    #[test]
    fn subdomain_wildcard_needs_at_least_one_label() {
        let p = policy(&["https://*.example.com"]);
        assert!(p.allows(Some("https://a.example.com")));
        assert!(p.allows(Some("https://a.b.example.com")));
        assert!(p.allows(Some("https://a.example.com:443")));
        assert!(!p.allows(Some("https://example.com")));
        assert!(!p.allows(Some("https://evil-example.com")));
        assert!(!p.allows(Some("https://a.evil-example.com")));
        assert!(!p.allows(Some("https://example.com.evil.test")));
        assert!(!p.allows(Some("https://.example.com")));
        assert!(!p.allows(Some("https://a..example.com")));
        assert!(!p.allows(Some("http://a.example.com")));
        assert!(!p.allows(Some("https://a.example.com:8443")));
        // Listing the bare domain separately is how to allow both.
        let both = policy(&["https://*.example.com", "https://example.com"]);
        assert!(both.allows(Some("https://example.com")));
        assert!(both.allows(Some("https://x.example.com")));
    }

    #[test]
    fn wildcards_inside_a_label_stay_inside_it() {
        let p = policy(&["https://pr-*.preview.example.com"]);
        assert!(p.allows(Some("https://pr-12.preview.example.com")));
        assert!(p.allows(Some("https://pr-.preview.example.com")));
        assert!(!p.allows(Some("https://pr-1.x.preview.example.com")));
        assert!(!p.allows(Some("https://x.pr-1.preview.example.com")));
        let middle = policy(&["https://api.*.example.com"]);
        assert!(middle.allows(Some("https://api.eu.example.com")));
        assert!(!middle.allows(Some("https://api.example.com")));
        assert!(!middle.allows(Some("https://api.a.b.example.com")));
        // The documented foot-gun: a star glued to the domain also matches look-alikes.
        let sloppy = policy(&["https://*example.com"]);
        assert!(sloppy.allows(Some("https://evilexample.com")));
        assert!(!sloppy.allows(Some("https://a.example.com")));
    }

    #[test]
    fn any_host_on_a_scheme() {
        let p = policy(&["https://*"]);
        assert!(p.allows(Some("https://anything.test")));
        assert!(p.allows(Some("https://[::1]")));
        assert!(!p.allows(Some("http://anything.test")));
        assert!(!p.allows(Some("https://anything.test:8443")));
    }

    #[test]
    fn ipv6_hosts() {
        let p = policy(&["http://[::1]:8080", "https://[2001:DB8::1]"]);
        assert!(p.allows(Some("http://[::1]:8080")));
        assert!(!p.allows(Some("http://[::1]")));
        assert!(!p.allows(Some("http://[::2]:8080")));
        assert!(p.allows(Some("https://[2001:db8::1]:443")));
        assert!(!p.allows(Some("https://[2001:db8::1")));
        // An IPv4-mapped literal contains dots but is still one host, not labels.
        let mapped = policy(&["http://[::ffff:192.0.2.1]"]);
        assert!(mapped.allows(Some("http://[::FFFF:192.0.2.1]")));
        assert!(!mapped.allows(Some("http://1.[::ffff:192.0.2.1]")));
    }

    #[test]
    fn header_values_that_are_not_origins_are_refused() {
        let p = policy(&["https://example.com", "https://*.example.com"]);
        for v in [
            "example.com",
            "https://example.com/",
            "https://example.com/path",
            "https://example.com?q",
            "https://user@example.com",
            "https://evil.test@example.com",
            "https://example.com:443:443",
            "https://",
            "://example.com",
            "https://example.com.",
            "https://exa mple.com",
        ] {
            assert!(!p.allows(Some(v)), "{v}");
        }
    }

    #[test]
    fn bad_patterns_are_named_in_the_error() {
        let cases = [
            ("example.com", "scheme://host"),
            ("https://example.com/", "path"),
            ("https://example.com:0", "port"),
            ("https://example.com:65536", "port"),
            ("https://example.com:http", "port"),
            ("https://", "empty"),
            ("https://exa_mple.com", "host may hold only"),
            ("https://a..example.com", "empty label"),
            ("https://*.", "empty label"),
            ("h*ttps://example.com", "scheme"),
            ("https://user@example.com", "user"),
            ("https://[::1", "unclosed"),
            ("https://[*::1]", "IPv6"),
        ];
        for (pattern, why) in cases {
            let err = bad(pattern);
            assert!(err.contains("--allowed-origin"), "{err}");
            assert!(err.contains(&format!("{pattern:?}")), "{err}");
            assert!(err.contains(why), "{pattern}: {err}");
        }
    }

    #[test]
    fn unknown_schemes_have_no_default_port() {
        let p = policy(&["chrome-extension://abcdef"]);
        assert!(p.allows(Some("chrome-extension://abcdef")));
        assert!(!p.allows(Some("chrome-extension://abcdef:443")));
        assert!(!p.allows(Some("chrome-extension://other")));
    }
}
