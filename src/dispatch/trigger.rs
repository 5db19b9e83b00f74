//! Users on the hot path: read from a trigger's body in one pass, checked, stored and sent without
//! being copied into owned maps. A [`UserRef`] borrows its id and attribute values (as raw JSON)
//! from the bytes it was read from. A stored batch is the users in a length-prefixed form that
//! reads back without scanning JSON again, and a recipient is written by copying the raw values
//! its dynamic params pick.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::{MAX_USER_ID, Rejected, TriggerHead};
use crate::model::DynamicParams;

/// One user, borrowed from the JSON it was read from.
#[derive(Debug)]
pub struct UserRef<'a> {
    /// `user_id`.
    pub id: Cow<'a, str>,
    /// The attributes in the order given, values as raw JSON text.
    attributes: Vec<(Cow<'a, str>, &'a str)>,
}

/// An attribute's value: raw JSON from the trigger, or (for a nested path) the part picked out.
#[derive(Debug)]
pub enum Attr<'a> {
    /// Copied as it is (raw JSON text).
    Raw(&'a str),
    /// Picked out of an object attribute.
    Owned(Value),
}

/// A touchpoint's dynamic params, prepared once for many users: each recipient field's JSON key
/// already escaped, and each source split into its attribute and nested keys.
#[derive(Clone, Debug)]
pub struct Mapping {
    fields: Vec<Field>,
}

#[derive(Clone, Debug)]
struct Field {
    /// The recipient field name.
    name: String,
    /// `,"name":`, ready to copy.
    key: Vec<u8>,
    /// The top-level attribute.
    attribute: String,
    /// Keys inside it, for `user.a.b`.
    nested: Vec<String>,
    optional: bool,
}

impl Mapping {
    /// Prepares `params` (in their declaration order).
    pub fn new(params: &DynamicParams) -> Self {
        let fields = params
            .iter()
            .map(|(name, source)| {
                let mut key = vec![b','];
                write_str(&mut key, name);
                key.push(b':');
                let mut parts = source
                    .from()
                    .strip_prefix("user.")
                    .unwrap_or(source.from())
                    .split('.');
                let attribute = parts.next().unwrap_or_default().to_string();
                Field {
                    name: name.clone(),
                    key,
                    attribute,
                    nested: parts.map(str::to_string).collect(),
                    optional: source.optional(),
                }
            })
            .collect();
        Self { fields }
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    // Writing a string to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

impl<'a> UserRef<'a> {
    /// The value a field picks from this user (`null` is absent).
    fn pick(&self, field: &Field) -> Option<Attr<'a>> {
        let raw = self
            .attributes
            .iter()
            .find(|(k, _)| *k == field.attribute)
            .map(|(_, v)| *v)?;
        if field.nested.is_empty() {
            return (raw != "null").then_some(Attr::Raw(raw));
        }
        let mut value: Value = serde_json::from_str(raw).ok()?;
        for key in &field.nested {
            value = value.get_mut(key)?.take();
        }
        (!value.is_null()).then_some(Attr::Owned(value))
    }

    /// Why this user cannot be a recipient of a touchpoint with these dynamic params, if it cannot.
    pub fn check(&self, mapping: &Mapping) -> Result<(), String> {
        if self.id.is_empty() {
            return Err("`user_id` is empty".into());
        }
        // A string has at most as many characters as bytes: count them only when it could be over.
        if self.id.len() > MAX_USER_ID && self.id.chars().count() > MAX_USER_ID {
            return Err(format!("`user_id` is longer than {MAX_USER_ID} characters"));
        }
        for field in &mapping.fields {
            if !field.optional && self.pick(field).is_none() {
                let mut path = field.attribute.clone();
                for key in &field.nested {
                    path.push('.');
                    path.push_str(key);
                }
                return Err(format!(
                    "missing attribute `{path}` (dynamic param `{}`)",
                    field.name
                ));
            }
        }
        Ok(())
    }

    /// Writes the user as a recipient: `user_id`, then each dynamic param it has, in the order of
    /// the touchpoint's declaration.
    pub fn write_recipient(&self, out: &mut Vec<u8>, mapping: &Mapping) {
        out.extend_from_slice(b"{\"user_id\":");
        write_str(out, &self.id);
        for field in &mapping.fields {
            let Some(v) = self.pick(field) else {
                continue;
            };
            out.extend_from_slice(&field.key);
            match v {
                Attr::Raw(raw) => out.extend_from_slice(raw.as_bytes()),
                Attr::Owned(value) => {
                    let _ = serde_json::to_writer(&mut *out, &value);
                }
            }
        }
        out.push(b'}');
    }
}

/// A batch's recipients as the channels receive them: each user written by
/// [`UserRef::write_recipient`], separated by commas (see [`crate::channel`]).
pub fn recipients<'a, 'b: 'a>(users: &[&'a UserRef<'b>], mapping: &Mapping) -> Vec<u8> {
    let mut out = Vec::with_capacity(users.len() * 96);
    for (i, user) in users.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        user.write_recipient(&mut out, mapping);
    }
    out
}

impl<'de: 'a, 'a> Deserialize<'de> for UserRef<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = UserRef<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a user object {\"user_id\", \"attributes\": {...}}")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<UserRef<'a>, M::Error> {
                let mut id: Option<Cow<'a, str>> = None;
                let mut attributes = None;
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    // A key given twice would be read as one of its values here and as the other
                    // by another reader: refused, whichever.
                    let again = match key.as_ref() {
                        "user_id" => id.is_some(),
                        "attributes" => attributes.is_some(),
                        _ => false,
                    };
                    if again {
                        return Err(de::Error::custom(format!(
                            "duplicate key `{key}` in a user: give it once"
                        )));
                    }
                    match key.as_ref() {
                        "user_id" => {
                            id = Some(
                                map.next_value::<Text<'de>>()
                                    .map_err(|_| de::Error::custom("`user_id` must be a string"))?
                                    .0,
                            );
                        }
                        "attributes" => attributes = Some(map.next_value::<Attributes<'a>>()?.0),
                        other => {
                            let _: IgnoredAny = map.next_value()?;
                            return Err(de::Error::custom(format!(
                                "unknown field `{other}`: a user has `user_id` and `attributes`"
                            )));
                        }
                    }
                }
                Ok(UserRef {
                    id: id.ok_or_else(|| de::Error::missing_field("user_id"))?,
                    attributes: attributes.unwrap_or_default(),
                })
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// A string borrowed from the input when it has no escapes, owned otherwise. (serde's own
/// `Cow<str>` always allocates.)
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

/// Attribute names and raw values, in order.
struct Attributes<'a>(Vec<(Cow<'a, str>, &'a str)>);

impl<'de: 'a, 'a> Deserialize<'de> for Attributes<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Attributes<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of attributes")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Attributes<'a>, M::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some((Text(k), v)) = map.next_entry::<Text<'de>, &'de RawValue>()? {
                    out.push((k, v.get()));
                }
                match first_repeat(&out) {
                    Some(name) => Err(de::Error::custom(duplicate_attribute(name))),
                    None => Ok(Attributes(out)),
                }
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Why a user with an attribute given twice is refused: a dynamic param would pick one of its
/// values, and the same user read back from the queue, or by the customer's endpoint, the other.
pub fn duplicate_attribute(name: &str) -> String {
    format!("duplicate attribute `{name}` in a user: give each attribute once")
}

/// The first attribute name given a second time, if any.
fn first_repeat<'b>(attributes: &'b [(Cow<'_, str>, &str)]) -> Option<&'b str> {
    // Most users have a handful of attributes: comparing them costs less than hashing. A set
    // keeps a user with thousands of them from costing their square.
    const SCAN: usize = 16;
    if attributes.len() <= SCAN {
        return (1..attributes.len())
            .find(|&i| attributes[..i].iter().any(|(k, _)| *k == attributes[i].0))
            .map(|i| attributes[i].0.as_ref());
    }
    let mut seen: HashSet<&str, foldhash::fast::RandomState> =
        HashSet::with_capacity_and_hasher(attributes.len(), Default::default());
    attributes
        .iter()
        .map(|(k, _)| k.as_ref())
        .find(|k| !seen.insert(k))
}

/// A trigger read from a request body, its users borrowed from it.
pub struct RawTrigger<'a> {
    /// Everything but the users.
    pub head: TriggerHead,
    /// The users as received.
    pub users: Vec<UserRef<'a>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonTrigger<'a> {
    touchpoint: String,
    campaign: String,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    template_params: Map<String, Value>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default, borrow)]
    users: Vec<UserRef<'a>>,
}

impl<'a> RawTrigger<'a> {
    /// Reads a JSON trigger (`users` inside).
    pub fn from_json(body: &'a [u8]) -> Result<Self, String> {
        // One UTF-8 check of the whole body; reading from text then skips the check per string.
        let text = utf8(body)?;
        let t: JsonTrigger<'a> = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Ok(Self {
            head: TriggerHead {
                template: t.template,
                title: t.title,
                body: t.body,
                payload: t.payload,
                touchpoint: t.touchpoint,
                campaign: t.campaign,
                idempotency_key: t.idempotency_key,
                template_params: t.template_params,
            },
            users: t.users,
        })
    }

    /// Reads an NDJSON trigger: the head on the first line, then one user per line (blank lines
    /// are skipped). Errors name the line.
    pub fn from_ndjson(body: &'a [u8]) -> Result<Self, String> {
        let mut head = None;
        let mut users = Vec::new();
        for (i, line) in utf8(body)?.split('\n').enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.bytes().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            if head.is_none() {
                head = Some(serde_json::from_str::<TriggerHead>(line).map_err(|e| {
                    format!(
                        "line {}: the first line must be the trigger head {{\"touchpoint\", \"campaign\", \"idempotency_key\", \"template_params\"}}: {e}",
                        i + 1
                    )
                })?);
            } else {
                users.push(serde_json::from_str(line).map_err(|e| {
                    format!(
                        "line {}: not a user {{\"user_id\", \"attributes\": {{...}}}}: {e}",
                        i + 1
                    )
                })?);
            }
        }
        let head = head.ok_or_else(|| {
            "the body is empty: send the trigger head on the first line, then one user per line"
                .to_string()
        })?;
        Ok(Self { head, users })
    }
}

/// The body as text, or where it stops being UTF-8.
fn utf8(body: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(body).map_err(|e| {
        let at = e.valid_up_to();
        let line = body[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        let column = at
            - body[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1)
            + 1;
        format!("the body is not UTF-8: invalid bytes at line {line} column {column}")
    })
}

/// Sorts a trigger's users into the ones to queue and the rejected ones (each with its reason).
/// A user id seen twice is queued once.
pub fn screen<'a, 'b>(
    users: &'b [UserRef<'a>],
    mapping: &Mapping,
) -> (Vec<&'b UserRef<'a>>, Vec<Rejected>) {
    // foldhash: fast on short keys, and seeded per set, so ids cannot be chosen to collide.
    let mut seen: HashSet<&str, foldhash::fast::RandomState> =
        HashSet::with_capacity_and_hasher(users.len(), Default::default());
    let mut accepted = Vec::with_capacity(users.len());
    let mut rejected = Vec::new();
    for user in users {
        let verdict = user.check(mapping).and_then(|()| {
            if seen.insert(user.id.as_ref()) {
                Ok(())
            } else {
                Err("the same `user_id` appears earlier in this trigger".to_string())
            }
        });
        match verdict {
            Ok(()) => accepted.push(user),
            Err(reason) => rejected.push(Rejected {
                user_id: user.id.to_string(),
                reason,
            }),
        }
    }
    (accepted, rejected)
}

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
    use crate::channel::Message;
    use crate::model::ParamSource;

    fn params() -> DynamicParams {
        let mut p = DynamicParams::new();
        p.insert("phone".into(), ParamSource::Attribute("user.phone".into()));
        p.insert(
            "city".into(),
            ParamSource::Detailed {
                from: "user.address.city".into(),
                optional: true,
            },
        );
        p
    }

    #[test]
    fn users_map_to_recipients_in_declaration_order() {
        let text = r#"[{"user_id":"u\u0031","attributes":{"phone":"138","address":{"city":"杭州"},"other":1}},{"user_id":"u2","attributes":{"phone":null}},{"attributes":{"phone":"1"},"user_id":"u1"}]"#;
        let users = parse_users_json(text.as_bytes()).unwrap();
        // Strings without escapes are borrowed from the input; escaped ones are decoded.
        assert!(matches!(users[0].id, Cow::Owned(_)) && users[0].id == "u1");
        assert!(matches!(users[1].id, Cow::Borrowed("u2")));
        assert!(matches!(users[1].attributes[0].0, Cow::Borrowed("phone")));
        let (ok, rejected) = screen(&users, &Mapping::new(&params()));
        assert_eq!(ok.len(), 1);
        assert_eq!(
            rejected,
            [
                Rejected {
                    user_id: "u2".into(),
                    reason: "missing attribute `phone` (dynamic param `phone`)".into()
                },
                Rejected {
                    user_id: "u1".into(),
                    reason: "the same `user_id` appears earlier in this trigger".into()
                }
            ]
        );
        let stored = store(ok.into_iter());
        let users = parse_stored(&stored).unwrap();
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].id, "u1");
        assert_eq!(
            users[0].attributes,
            [
                (Cow::Borrowed("phone"), r#""138""#),
                (Cow::Borrowed("address"), r#"{"city":"杭州"}"#),
                (Cow::Borrowed("other"), "1")
            ]
        );
        let mut out = Vec::new();
        users[0].write_recipient(&mut out, &Mapping::new(&params()));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"user_id":"u1","city":"杭州","phone":"138"}"#
        );
    }

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
    fn user_ids_are_limited_in_characters_not_bytes() {
        let mapping = Mapping::new(&DynamicParams::new());
        let user = |id: String| {
            let text = format!(r#"[{{"user_id":"{id}"}}]"#);
            let users = parse_users_json(text.as_bytes()).unwrap();
            users[0].check(&mapping)
        };
        assert_eq!(user("杭".repeat(MAX_USER_ID)), Ok(()));
        assert_eq!(user("a".repeat(MAX_USER_ID)), Ok(()));
        let too_long = Err(format!("`user_id` is longer than {MAX_USER_ID} characters"));
        assert_eq!(user("a".repeat(MAX_USER_ID + 1)), too_long);
        assert_eq!(user("杭".repeat(MAX_USER_ID + 1)), too_long);
        assert_eq!(user(String::new()), Err("`user_id` is empty".into()));
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

    #[test]
    fn a_duplicate_attribute_or_user_id_key_in_a_user_is_refused() {
        let json = |users: &str| {
            RawTrigger::from_json(
                format!(r#"{{"touchpoint":"t","campaign":"c","users":[{users}]}}"#).as_bytes(),
            )
            .err()
        };
        let ndjson = |user: &str| {
            RawTrigger::from_ndjson(
                format!("{{\"touchpoint\":\"t\",\"campaign\":\"c\"}}\n{user}\n").as_bytes(),
            )
            .err()
        };
        let many: String = (0..40)
            .map(|i| format!(r#""a{i}":{i},"#))
            .collect::<String>()
            + r#""a7":0"#;
        let many = format!(r#"{{"user_id":"u","attributes":{{{many}}}}}"#);
        for (user, says) in [
            (
                r#"{"user_id":"u","attributes":{"phone":"1","phone":"2"}}"#,
                "duplicate attribute `phone` in a user",
            ),
            (many.as_str(), "duplicate attribute `a7` in a user"),
            (
                r#"{"user_id":"u","user_id":"v"}"#,
                "duplicate key `user_id` in a user",
            ),
            (
                r#"{"user_id":"u","attributes":{"a":1},"attributes":{"a":2}}"#,
                "duplicate key `attributes` in a user",
            ),
        ] {
            for err in [json(user), ndjson(user)] {
                let err = err.unwrap_or_else(|| panic!("accepted {user}"));
                assert!(err.contains(says), "{err}");
            }
        }
        // The same name in different users, or nested in a value, is no repeat.
        assert!(
            json(
                r#"{"user_id":"u","attributes":{"a":{"a":1}}},{"user_id":"v","attributes":{"a":1}}"#
            )
            .is_none()
        );
    }

    #[test]
    fn a_json_trigger_names_its_template_and_app_push_text_as_an_ndjson_head_does() {
        let head = r#""touchpoint":"t","campaign":"c","template":"order_shipped","title":"Hi","body":"B","payload":"P""#;
        let json = RawTrigger::from_json(format!("{{{head},\"users\":[]}}").as_bytes())
            .unwrap()
            .head;
        let nd = format!("{{{head}}}\n");
        assert_eq!(json, RawTrigger::from_ndjson(nd.as_bytes()).unwrap().head);
        assert_eq!(
            json.message(),
            Message {
                template: Some("order_shipped".into()),
                title: Some("Hi".into()),
                body: Some("B".into()),
                payload: Some("P".into()),
            }
        );
    }

    #[test]
    fn bad_users_and_triggers_say_where() {
        let err = RawTrigger::from_json(
            br#"{"touchpoint":"t","campaign":"c","users":[{"user_id":"a"},{"user_id":"b","extra":1}]}"#,
        )
        .err()
        .unwrap();
        assert!(err.starts_with("unknown field `extra`"), "{err}");
        let err =
            RawTrigger::from_json(br#"{"touchpoint":"t","campaign":"c","users":[{"user_id":7}]}"#)
                .err()
                .unwrap();
        assert!(err.starts_with("`user_id` must be a string"), "{err}");
        let nd = b"{\"touchpoint\":\"t\",\"campaign\":\"c\"}\n\n{\"user_id\":\"a\"}\r\nnope\n";
        assert!(
            RawTrigger::from_ndjson(nd)
                .err()
                .unwrap()
                .starts_with("line 4: not a user")
        );
        let t = RawTrigger::from_json(
            br#"{"touchpoint":"t","campaign":"c","users":[{"user_id":"a"}]}"#,
        )
        .unwrap();
        assert_eq!((t.head.touchpoint.as_str(), t.users.len()), ("t", 1));
        assert!(RawTrigger::from_json(br#"{"touchpoint":"t","campaign":"c","extra":1}"#).is_err());
        assert_eq!(
            RawTrigger::from_json(b"{\"touchpoint\":\"t\",\n\"campaign\":\"c\xff\"}")
                .err()
                .unwrap(),
            "the body is not UTF-8: invalid bytes at line 2 column 14"
        );
        assert_eq!(
            RawTrigger::from_ndjson(
                b"{\"touchpoint\":\"t\",\"campaign\":\"c\"}\n{\"user_id\":\"\xfe\"}"
            )
            .err()
            .unwrap(),
            "the body is not UTF-8: invalid bytes at line 2 column 13"
        );
    }
}
