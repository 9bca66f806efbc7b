//! API-key checks for `/v1/*`: a constant-time comparison, so response timing does not reveal
//! how much of a guessed key was right.

/// Compare two byte strings in time that depends only on their lengths, not their contents.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let len = a.len().max(b.len());
    let mut diff = a.len() ^ b.len();
    for i in 0..len {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

/// True when an `Authorization` header value carries `Bearer <expected>` (scheme
/// case-insensitive, surrounding spaces ignored).
pub fn bearer_matches(header: Option<&[u8]>, expected: &str) -> bool {
    let Some(value) = header else { return false };
    let value = trim_ascii(value);
    if value.len() < 7 || !value[..7].eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    constant_time_eq(trim_ascii(&value[7..]), expected.as_bytes())
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_exactly() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret1"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn bearer_header() {
        assert!(bearer_matches(Some(b"Bearer k1"), "k1"));
        assert!(bearer_matches(Some(b"bearer  k1 "), "k1"));
        assert!(!bearer_matches(Some(b"Bearer k2"), "k1"));
        assert!(!bearer_matches(Some(b"Basic k1"), "k1"));
        assert!(!bearer_matches(Some(b"k1"), "k1"));
        assert!(!bearer_matches(None, "k1"));
        assert!(!bearer_matches(Some(b"Bearer "), "k1"));
    }
}
