//! Reading a trigger: its JSON or NDJSON body in one pass, its users without being copied into
//! owned maps (a [`UserRef`] borrows its id and attribute values, as raw JSON, from the bytes it
//! was read from), and screening them into the ones to queue and the rejected ones.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::recipient::Mapping;
use super::{Rejected, TriggerHead};

/// One user, borrowed from the JSON it was read from.
#[derive(Debug)]
pub struct UserRef<'a> {
    /// `user_id`.
    pub id: Cow<'a, str>,
    /// The attributes in the order given, values as raw JSON text. (Read by [`super::recipient`]
    /// and [`super::stored`], which also builds users from the stored form.)
    pub(super) attributes: Vec<(Cow<'a, str>, &'a str)>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Message;

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
