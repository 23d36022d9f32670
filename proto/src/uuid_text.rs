//! UUIDs written the canonical way (8-4-4-4-12 lowercase hex digits, what
//! the SDKs generate for session and message ids), and their 16 bytes.
//!
//! The kernel and the stores keep one such id per open session (and the
//! kernel one message id), so they hold canonical ones as 16 bytes instead
//! of a 36-byte string in an allocation of its own (issue 15: 100,000 open
//! sessions in 100 MiB). Only the canonical spelling is converted, so
//! writing the bytes back always gives the id exactly.

/// The 16 bytes of `id` when it is a UUID written the canonical way
/// (8-4-4-4-12 lowercase hex digits), so that writing the bytes back gives
/// `id` exactly; `None` for anything else.
pub fn parse(id: &str) -> Option<[u8; 16]> {
    let s = id.as_bytes();
    if s.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut n = 0;
    let mut i = 0;
    while i < 36 {
        if matches!(i, 8 | 13 | 18 | 23) {
            if s[i] != b'-' {
                return None;
            }
            i += 1;
            continue;
        }
        let hex = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        out[n] = (hex(s[i])? << 4) | hex(s[i + 1])?;
        n += 1;
        i += 2;
    }
    Some(out)
}

/// The canonical text of a UUID's 16 bytes ([`parse`]'s inverse).
pub fn format(b: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(36);
    for (k, byte) in b.iter().enumerate() {
        if matches!(k, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(HEX[usize::from(byte >> 4)] as char);
        s.push(HEX[usize::from(byte & 0xf)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_uuids_are_not_canonical() {
        for id in [
            "0123456789abcdef0123456789abcdef0123",
            "01234567-89ab-cdef-0123-456789abcdeg",
            "01234567-89ab-cdef-0123-456789abcde",
            "01234567+89ab-cdef-0123-456789abcdef",
            "01234567-89AB-cdef-0123-456789abcdef",
        ] {
            assert_eq!(parse(id), None, "{id}");
        }
        let id = "01234567-89ab-cdef-0123-456789abcdef";
        assert_eq!(parse(id).map(|b| format(&b)).as_deref(), Some(id));
    }
}
