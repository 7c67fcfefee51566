//! Wildcard matching of names against patterns where `*` matches any run of characters: the one
//! matcher behind token grants (`auth`, whole channel names) and the origin allow-list
//! (`origin`, one host label at a time). Pure, no allocation. It owns only the matching rule;
//! what a pattern means (a grant, an origin) belongs to its caller.

/// Whether all of `text` matches `pattern`, where `*` matches any run of characters. No
/// allocation, O(pattern × text) worst case. Token grants apply it to whole channel names, the
/// origin allow-list to one host label at a time.
///
/// The pieces between stars must appear in order: the first as a prefix, the last as a suffix of
/// what remains, the middle ones each at their leftmost position. Taking the leftmost match is
/// safe because a `*` can absorb anything an earlier choice would have left.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let mut pieces = pattern.split('*');
    let first = pieces.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let mut pieces = pieces.peekable();
    if pieces.peek().is_none() {
        // No star at all: an exact name.
        return rest.is_empty();
    }
    while let Some(piece) = pieces.next() {
        if pieces.peek().is_none() {
            return rest.ends_with(piece);
        }
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    unreachable!("the loop returns at the last piece")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_star_absorbs_any_run_an_exact_name_nothing() {
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("pr-*", "pr-12"));
        assert!(!wildcard_match("pr-*", "pr"));
        assert!(!wildcard_match("chat", "chat2"));
    }

    /// The obvious exponential matcher, as a reference.
    fn reference(p: &[u8], t: &[u8]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => (0..=t.len()).any(|i| reference(rest, &t[i..])),
            Some((c, rest)) => t.first() == Some(c) && reference(rest, &t[1..]),
        }
    }

    #[test]
    fn wildcard_match_agrees_with_the_reference_on_random_inputs() {
        let mut rng = fastrand::Rng::with_seed(5);
        let alphabet = b"ab*";
        for _ in 0..20_000 {
            let gen_str = |rng: &mut fastrand::Rng, len: usize, stars: bool| -> String {
                (0..rng.usize(0..=len))
                    .map(|_| alphabet[rng.usize(0..if stars { 3 } else { 2 })] as char)
                    .collect()
            };
            let p = gen_str(&mut rng, 6, true);
            let t = gen_str(&mut rng, 8, false);
            assert_eq!(
                wildcard_match(&p, &t),
                reference(p.as_bytes(), t.as_bytes()),
                "pattern {p:?} text {t:?}"
            );
        }
    }
}
