//! Users on the hot path: read from a trigger's body in one pass, checked, stored and sent without
//! being copied into owned maps. A [`UserRef`] borrows its id and attribute values (as raw JSON)
//! from the bytes it was read from; a stored batch is the users written back in the same form, and
//! a recipient is written by copying the raw values its dynamic params pick.

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
    /// The attributes in the order given, values as raw JSON.
    attributes: Vec<(Cow<'a, str>, &'a RawValue)>,
}

/// An attribute's value: raw JSON from the trigger, or (for a nested path) the part picked out.
#[derive(Debug)]
pub enum Attr<'a> {
    /// Copied as it is.
    Raw(&'a RawValue),
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
            return (raw.get() != "null").then_some(Attr::Raw(raw));
        }
        let mut value: Value = serde_json::from_str(raw.get()).ok()?;
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
        if self.id.chars().count() > MAX_USER_ID {
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
                Attr::Raw(raw) => out.extend_from_slice(raw.get().as_bytes()),
                Attr::Owned(value) => {
                    let _ = serde_json::to_writer(&mut *out, &value);
                }
            }
        }
        out.push(b'}');
    }

    /// Writes the user as stored: `{"user_id": ..., "attributes": {...}}`, values as received.
    pub fn write_stored(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"user_id\":");
        write_str(out, &self.id);
        if !self.attributes.is_empty() {
            out.extend_from_slice(b",\"attributes\":{");
            for (i, (k, v)) in self.attributes.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, k);
                out.push(b':');
                out.extend_from_slice(v.get().as_bytes());
            }
            out.push(b'}');
        }
        out.push(b'}');
    }
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
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "user_id" => {
                            id =
                                Some(map.next_value::<Cow<'de, str>>().map_err(|_| {
                                    de::Error::custom("`user_id` must be a string")
                                })?);
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

/// Attribute names and raw values, in order.
struct Attributes<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

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
                while let Some((k, v)) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                    out.push((k, v));
                }
                Ok(Attributes(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
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
    #[serde(default, borrow)]
    users: Vec<UserRef<'a>>,
}

impl<'a> RawTrigger<'a> {
    /// Reads a JSON trigger (`users` inside).
    pub fn from_json(body: &'a [u8]) -> Result<Self, String> {
        let t: JsonTrigger<'a> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        Ok(Self {
            head: TriggerHead {
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
        for (i, line) in body.split(|&b| b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if head.is_none() {
                head = Some(serde_json::from_slice::<TriggerHead>(line).map_err(|e| {
                    format!(
                        "line {}: the first line must be the trigger head {{\"touchpoint\", \"campaign\", \"idempotency_key\", \"template_params\"}}: {e}",
                        i + 1
                    )
                })?);
            } else {
                users.push(serde_json::from_slice(line).map_err(|e| {
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

/// Sorts a trigger's users into the ones to queue and the rejected ones (each with its reason).
/// A user id seen twice is queued once.
pub fn screen<'a, 'b>(
    users: &'b [UserRef<'a>],
    params: &DynamicParams,
) -> (Vec<&'b UserRef<'a>>, Vec<Rejected>) {
    let mapping = Mapping::new(params);
    let mut seen: HashSet<&str> = HashSet::with_capacity(users.len());
    let mut accepted = Vec::with_capacity(users.len());
    let mut rejected = Vec::new();
    for user in users {
        let verdict = user.check(&mapping).and_then(|()| {
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

/// Reads a stored batch: a JSON array of user objects (as bytes: the JSON parser checks the
/// strings' UTF-8 as it goes, so no separate pass is needed).
pub fn parse_stored(text: &[u8]) -> Result<Vec<UserRef<'_>>, String> {
    serde_json::from_slice(text).map_err(|e| e.to_string())
}

/// Writes users as a stored batch (a JSON array of user objects).
pub fn store<'a, 'b: 'a>(users: impl IntoIterator<Item = &'a UserRef<'b>>) -> Vec<u8> {
    let mut out = Vec::with_capacity(4096);
    out.push(b'[');
    for (i, u) in users.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        u.write_stored(&mut out);
    }
    out.push(b']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let users = parse_stored(text.as_bytes()).unwrap();
        let (ok, rejected) = screen(&users, &params());
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
        let stored = store(ok);
        assert_eq!(
            String::from_utf8_lossy(&stored),
            r#"[{"user_id":"u1","attributes":{"phone":"138","address":{"city":"杭州"},"other":1}}]"#
        );
        let users = parse_stored(&stored).unwrap();
        let mut out = Vec::new();
        users[0].write_recipient(&mut out, &Mapping::new(&params()));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"user_id":"u1","city":"杭州","phone":"138"}"#
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
    }
}
