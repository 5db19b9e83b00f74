//! Writing a user as a recipient: a touchpoint's dynamic params prepared once ([`Mapping`]),
//! the check that a user has what they pick, and the recipient written by copying the raw values
//! they pick.

use serde_json::Value;

use super::MAX_USER_ID;
use super::trigger::UserRef;
use crate::model::DynamicParams;

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

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::dispatch::Rejected;
    use crate::dispatch::stored::{parse_stored, parse_users_json, store};
    use crate::dispatch::trigger::screen;
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
}
