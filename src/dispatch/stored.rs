//! The stored form of a batch's users: a length-prefixed form that reads back without scanning
//! JSON again or copying; the forms earlier versions stored (the first length-prefixed form, a
//! JSON array) read too.

use std::borrow::Cow;

use super::trigger::UserRef;

/// The first byte of a stored batch (see [`store`]). Batches stored by earlier versions start
/// with [`STORED_V1`] (every string length-prefixed in place) or `[` (a JSON array).
const STORED: u8 = 2;
const STORED_V1: u8 = 1;

fn put_len(out: &mut Vec<u8>, n: usize) {
    // Lengths are bounded by the request body cap, far below 4 GiB.
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

/// Reads little-endian lengths, checking that each is there.
struct Lengths<'a> {
    rest: &'a [u8],
}

impl<'a> Lengths<'a> {
    fn next(&mut self) -> Result<usize, String> {
        let (head, rest) = self
            .rest
            .split_first_chunk::<4>()
            .ok_or("the stored batch is truncated")?;
        self.rest = rest;
        Ok(u32::from_le_bytes(*head) as usize)
    }

    /// A length-prefixed string in place (the form of earlier versions).
    fn str(&mut self) -> Result<&'a str, String> {
        let n = self.next()?;
        if n > self.rest.len() {
            return Err("the stored batch is truncated".into());
        }
        let (text, rest) = self.rest.split_at(n);
        self.rest = rest;
        std::str::from_utf8(text)
            .map_err(|_| "the stored batch holds text that is not UTF-8".into())
    }
}

/// Cuts the strings of a stored batch out of its text, in order.
struct Texts<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Texts<'a> {
    fn next(&mut self, len: usize) -> Result<&'a str, String> {
        let end = self
            .at
            .checked_add(len)
            .ok_or("the stored batch is damaged")?;
        // `get` refuses a range beyond the text or one that splits a character.
        let s = self
            .text
            .get(self.at..end)
            .ok_or("the stored batch is damaged: a length does not fit its text")?;
        self.at = end;
        Ok(s)
    }
}

/// Reads a stored batch (see [`store`]); batches stored in the forms of earlier versions are read
/// too.
pub fn parse_stored(bytes: &[u8]) -> Result<Vec<UserRef<'_>>, String> {
    match bytes.split_first() {
        Some((&STORED, body)) => parse_stored_v2(body),
        Some((&STORED_V1, body)) => parse_stored_v1(body),
        _ => parse_users_json(bytes),
    }
}

fn parse_stored_v2(body: &[u8]) -> Result<Vec<UserRef<'_>>, String> {
    let mut head = Lengths { rest: body };
    let count = head.next()?;
    let structure = head.next()?;
    if structure > head.rest.len() {
        return Err("the stored batch is truncated".into());
    }
    let (structure, text) = head.rest.split_at(structure);
    // One check of all the text at once; each string is then a slice of it.
    let text = std::str::from_utf8(text)
        .map_err(|_| "the stored batch holds text that is not UTF-8".to_string())?;
    let mut lengths = Lengths { rest: structure };
    let mut texts = Texts { text, at: 0 };
    // Each user takes at least 8 bytes of structure: a bad count cannot make a huge allocation.
    let mut users = Vec::with_capacity(count.min(structure.len() / 8));
    for _ in 0..count {
        let id = Cow::Borrowed(texts.next(lengths.next()?)?);
        let n = lengths.next()?;
        let mut attributes = Vec::with_capacity(n.min(lengths.rest.len() / 8));
        for _ in 0..n {
            let key = texts.next(lengths.next()?)?;
            let value = texts.next(lengths.next()?)?;
            attributes.push((Cow::Borrowed(key), value));
        }
        users.push(UserRef { id, attributes });
    }
    if !lengths.rest.is_empty() || texts.at != text.len() {
        return Err("the stored batch has bytes after its last user".into());
    }
    Ok(users)
}

/// The form of earlier versions: every string prefixed with its length, in place.
fn parse_stored_v1(body: &[u8]) -> Result<Vec<UserRef<'_>>, String> {
    let mut r = Lengths { rest: body };
    let count = r.next()?;
    let mut users = Vec::with_capacity(count.min(r.rest.len() / 8));
    for _ in 0..count {
        let id = Cow::Borrowed(r.str()?);
        let n = r.next()?;
        let mut attributes = Vec::with_capacity(n.min(r.rest.len() / 8));
        for _ in 0..n {
            attributes.push((Cow::Borrowed(r.str()?), r.str()?));
        }
        users.push(UserRef { id, attributes });
    }
    if !r.rest.is_empty() {
        return Err("the stored batch has bytes after its last user".into());
    }
    Ok(users)
}

/// Reads users from a JSON array of user objects.
pub fn parse_users_json(text: &[u8]) -> Result<Vec<UserRef<'_>>, String> {
    serde_json::from_slice(text).map_err(|e| e.to_string())
}

/// Writes users as a stored batch: a format byte, the number of users, the size of the
/// structure, then the structure (for each user the length of its id, its number of attributes
/// and the lengths of each name and raw JSON value) and last all the text (ids, names and values)
/// in the same order. Reading it back copies nothing, scans no JSON and checks the text as UTF-8
/// in one go.
pub fn store<'a, 'b: 'a>(users: impl ExactSizeIterator<Item = &'a UserRef<'b>> + Clone) -> Vec<u8> {
    let (mut structure, mut text) = (0usize, 0usize);
    for u in users.clone() {
        structure += 8 + 8 * u.attributes.len();
        text += u.id.len()
            + u.attributes
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
    }
    let mut out = Vec::with_capacity(9 + structure + text);
    out.push(STORED);
    put_len(&mut out, users.len());
    put_len(&mut out, structure);
    for u in users.clone() {
        put_len(&mut out, u.id.len());
        put_len(&mut out, u.attributes.len());
        for (k, v) in &u.attributes {
            put_len(&mut out, k.len());
            put_len(&mut out, v.len());
        }
    }
    for u in users {
        out.extend_from_slice(u.id.as_bytes());
        for (k, v) in &u.attributes {
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(v.as_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_batches_are_read_back_checked() {
        let text = br#"[{"user_id":"a","attributes":{"k":"v"}},{"user_id":"b"}]"#;
        let users = parse_users_json(text).unwrap();
        let stored = store(users.iter());
        let back = parse_stored(&stored).unwrap();
        assert_eq!(
            (
                back[0].id.as_ref(),
                back[1].id.as_ref(),
                back[0].attributes.len()
            ),
            ("a", "b", 1)
        );
        // Batches stored as JSON, or in the first length-prefixed form, by earlier versions
        // still read.
        assert_eq!(parse_stored(text).unwrap().len(), 2);
        let v1 = store_v1(&users);
        let v1 = parse_stored(&v1).unwrap();
        assert_eq!(
            (v1[0].id.as_ref(), v1[1].id.as_ref(), &v1[0].attributes[..]),
            ("a", "b", &[(Cow::Borrowed("k"), r#""v""#)][..])
        );
        // Damage is an error, never a panic or a huge allocation.
        for cut in 1..stored.len() {
            assert!(parse_stored(&stored[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = stored.clone();
        bad.push(0);
        assert!(parse_stored(&bad).is_err());
        let mut huge = vec![STORED];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_stored(&huge).is_err());
        let mut not_utf8 = stored.clone();
        let at = not_utf8.iter().position(|&b| b == b'a').unwrap();
        not_utf8[at] = 0xff;
        assert!(parse_stored(&not_utf8).unwrap_err().contains("UTF-8"));
        let mut v1_not_utf8 = store_v1(&users);
        let at = v1_not_utf8.iter().position(|&b| b == b'a').unwrap();
        v1_not_utf8[at] = 0xff;
        assert!(parse_stored(&v1_not_utf8).unwrap_err().contains("UTF-8"));
        let v1 = store_v1(&users);
        for cut in 1..v1.len() {
            assert!(parse_stored(&v1[..cut]).is_err(), "v1 cut at {cut}");
        }
    }

    #[test]
    fn stored_lengths_that_do_not_fit_their_text_are_refused() {
        let users =
            parse_users_json(r#"[{"user_id":"杭州","attributes":{"k":"1"}}]"#.as_bytes()).unwrap();
        let stored = store(users.iter());
        assert_eq!(parse_stored(&stored).unwrap()[0].id, "杭州");
        // The id's length is the first length after the header (format, count, structure size).
        let id_len = 9;
        for len in [1u32, 2, 4, 5, 1000, u32::MAX] {
            let mut bad = stored.clone();
            bad[id_len..id_len + 4].copy_from_slice(&len.to_le_bytes());
            let err = parse_stored(&bad).unwrap_err();
            assert!(
                err.contains("damaged") || err.contains("after its last"),
                "{len}: {err}"
            );
        }
        // A structure size beyond the batch.
        let mut bad = stored.clone();
        bad[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_stored(&bad).unwrap_err().contains("truncated"));
    }

    /// The first length-prefixed form, as earlier versions stored it.
    fn store_v1(users: &[UserRef<'_>]) -> Vec<u8> {
        let put_str = |out: &mut Vec<u8>, s: &str| {
            put_len(out, s.len());
            out.extend_from_slice(s.as_bytes());
        };
        let mut out = vec![STORED_V1];
        put_len(&mut out, users.len());
        for u in users {
            put_str(&mut out, &u.id);
            put_len(&mut out, u.attributes.len());
            for (k, v) in &u.attributes {
                put_str(&mut out, k);
                put_str(&mut out, v);
            }
        }
        out
    }
}
