//! Dispatch: a campaign trigger (a touchpoint, template params, users) becomes durable batches that
//! workers send with retries. This module owns the rules that need no I/O: what a trigger looks
//! like, which template params it must carry, how a user's attributes become a recipient, and how
//! long to wait before a retry. [`queue`] stores the batches; [`worker`] sends them.

pub mod fresh;
pub mod intake;
pub mod queue;
pub mod recipient;
pub mod retry;
pub mod segments;
pub mod stored;
pub mod trigger;
pub mod worker;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::channel::Message;

/// The longest `user_id` accepted.
pub const MAX_USER_ID: usize = 256;

/// The longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;

/// Why an idempotency key is refused, if it is: empty, longer than [`MAX_IDEMPOTENCY_KEY`] bytes,
/// or holding a control character. Keys are stored with every dispatch and compared on every
/// trigger: a bound keeps that cheap.
pub fn check_idempotency_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("`idempotency_key` is empty: leave it out, or give a key such as `spring-sale-2026-03-01`".into());
    }
    if key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(format!(
            "`idempotency_key` is {} bytes long; it takes at most {MAX_IDEMPOTENCY_KEY} bytes (a UUID, or the campaign and a date, fits)",
            key.len()
        ));
    }
    if let Some(c) = key.chars().find(|c| c.is_control()) {
        return Err(format!(
            "`idempotency_key` holds the control character U+{:04X}: use printable characters only",
            u32::from(c)
        ));
    }
    Ok(())
}

/// A triggered user as a client writes it: an id and the attributes dynamic params are mapped
/// from. (The daemon reads users without copying them: see [`trigger::UserRef`].)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// The platform's id of the user.
    pub user_id: String,
    /// What the platform knows of the user (`phone`, `member_id`, ...). Each name once.
    #[serde(
        default,
        skip_serializing_if = "Map::is_empty",
        deserialize_with = "attributes_once"
    )]
    pub attributes: Map<String, Value>,
}

/// Reads a user's attributes, refusing a name given twice (a map would keep the last one
/// silently; the daemon refuses the user).
fn attributes_once<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Map<String, Value>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object of attributes")
        }
        fn visit_map<M: serde::de::MapAccess<'de>>(
            self,
            mut map: M,
        ) -> Result<Self::Value, M::Error> {
            let mut out = Map::new();
            while let Some((k, v)) = map.next_entry::<String, Value>()? {
                if out.contains_key(&k) {
                    return Err(serde::de::Error::custom(trigger::duplicate_attribute(&k)));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(V)
}

/// The head of a trigger: everything but the users. A JSON trigger carries its users in `users`;
/// an NDJSON trigger sends this on its first line and one user per following line.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerHead {
    /// The touchpoint id.
    pub touchpoint: String,
    /// The campaign that triggered the users.
    pub campaign: String,
    /// A key that makes the trigger idempotent: the same key again returns the first result and
    /// queues nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Values for the touchpoint's template params, once for the whole audience.
    #[serde(default)]
    pub template_params: Map<String, Value>,
    /// The `id` of one of the touchpoint's `[[templates]]` (Official Account, WeCom).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// App push: the notification title, instead of the touchpoint's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// App push: the notification body, instead of the touchpoint's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// App push: data for the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
}

impl TriggerHead {
    /// What the trigger asks the channel to send besides its template params.
    pub fn message(&self) -> Message {
        Message {
            template: self.template.clone(),
            title: self.title.clone(),
            body: self.body.clone(),
            payload: self.payload.clone(),
        }
    }
}

/// A user that was not queued, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// The user's id as given.
    pub user_id: String,
    /// Why it was not queued (or not delivered).
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idempotency_key_longer_than_256_bytes_is_refused() {
        assert_eq!(check_idempotency_key(&"杭".repeat(85)), Ok(()));
        assert_eq!(
            check_idempotency_key(&"k".repeat(MAX_IDEMPOTENCY_KEY)),
            Ok(())
        );
        let long = check_idempotency_key(&"k".repeat(1024 * 1024)).unwrap_err();
        assert!(
            long.contains("1048576 bytes long; it takes at most 256 bytes"),
            "{long}"
        );
        assert!(
            check_idempotency_key(&"杭".repeat(86))
                .unwrap_err()
                .contains("258 bytes")
        );
        assert!(
            check_idempotency_key("a\nb")
                .unwrap_err()
                .contains("U+000A")
        );
        assert!(
            check_idempotency_key("a\u{1b}[31m")
                .unwrap_err()
                .contains("U+001B")
        );
        assert!(check_idempotency_key("").unwrap_err().contains("empty"));
    }

    #[test]
    fn a_client_user_with_an_attribute_given_twice_is_refused() {
        let err = serde_json::from_str::<User>(r#"{"user_id":"u","attributes":{"a":1,"a":2}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("duplicate attribute `a`"), "{err}");
        let err = serde_json::from_str::<User>(r#"{"user_id":"u","user_id":"v"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("duplicate field `user_id`"), "{err}");
        let user: User =
            serde_json::from_str(r#"{"user_id":"u","attributes":{"a":1,"b":2}}"#).unwrap();
        assert_eq!(user.attributes.len(), 2);
    }
}
