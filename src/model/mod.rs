//! The desired-state types: what one touchpoint file says. These types are the single source of the
//! JSON Schema ([`schema`]) and of the spec stored in the registry. Nothing here does I/O but
//! reading a secret reference, as its [`SecretPolicy`] allows, and reading and writing the schema
//! file ([`schema::check`], [`schema::write`]).
//!
//! A file is a [`Touchpoint`]: the [`Common`] fields every kind has, plus one [`KindSpec`] chosen by
//! its `kind` field.

mod app_push;
mod custom;
mod open_platform;
mod params;
pub mod schema;
mod secret;
mod secret_policy;
mod spec_json;
mod units;
mod wechat;
mod wecom;

use std::borrow::Cow;
use std::collections::BTreeMap;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

pub use app_push::{AppPushSpec, MAX_PUSH_BATCH, PushProvider, PushTtl};
pub use custom::{Backoff, CustomSpec, MAX_CUSTOM_BATCH, MaxBackoff, Retry, Timeout};
pub use open_platform::WechatOpenPlatformSpec;
pub use params::{
    DynamicParams, MessageTemplate, MiniProgramLink, NAME_PATTERN, ParamSource, ParamType,
    SOURCE_PATTERN, TemplateParam, WECHAT_APP_ID_PATTERN,
};
pub use secret::{Fingerprinter, MAX_SECRET_BYTES, Secret, SecretError, SecretRef};
pub use secret_policy::{EnvPattern, SecretPolicy, is_own_variable};
pub use spec_json::SpecJson;
pub use units::{
    DURATION_PATTERN, Duration, DurationIn, RATE_PATTERN, RateLimit, RateUnit, is_duration_format,
};
pub use wechat::{Permission, WechatAuth, WechatOaSpec};
pub use wecom::{FieldRules, LinkRule, MAX_NOTICE_ITEMS, WecomAudience, WecomMessage, WecomSpec};

/// The dotted paths of every secret field of every kind. A path names one field of one kind only, so
/// the set can be used on a spec without knowing its kind.
pub const SECRET_FIELDS: &[&str] = &[
    "auth_token",
    "signing_secret",
    "auth.app_secret",
    "auth.authorizer_refresh_token",
    "component_secret",
    "token",
    "encoding_aes_key",
    "secret",
    "contact_secret",
    "master_secret",
];

/// The secret fields touchctl writes itself: state, not desired configuration (`touchctl auth
/// wechat` writes the refresh token, the daemon writes a rotated one back). They are in
/// [`SECRET_FIELDS`], so never printed; but plan neither requires their file to exist (an account
/// not bound yet plans fine) nor fingerprints them (a binding or a rotation is no change).
pub const STATE_SECRETS: &[&str] = &["auth.authorizer_refresh_token"];

/// The keys of [`Common`], which [`Touchpoint::from_json`] separates from the kind's own.
const COMMON_FIELDS: &[&str] = &[
    "id",
    "name",
    "category",
    "enabled",
    "protect",
    "description",
    "labels",
];

/// The range of the bounded duration field whose schema pattern is `pattern`, if it is one: what
/// to tell a user whose value the pattern refused. Every [`DurationIn`] a field uses is listed
/// here (a test walks the schema to make sure).
pub fn duration_range(pattern: &str) -> Option<(Duration, Duration)> {
    static RANGES: std::sync::OnceLock<Vec<(String, Duration, Duration)>> =
        std::sync::OnceLock::new();
    let ranges = RANGES.get_or_init(|| {
        [
            (Timeout::MIN, Timeout::MAX),
            (Backoff::MIN, Backoff::MAX),
            (MaxBackoff::MIN, MaxBackoff::MAX),
            (PushTtl::MIN, PushTtl::MAX),
        ]
        .into_iter()
        .map(|(lo, hi)| (units::range_pattern(lo, hi), lo, hi))
        .collect()
    });
    ranges
        .iter()
        .find(|(p, _, _)| p == pattern)
        .map(|(_, lo, hi)| (*lo, *hi))
}

/// Pattern every touchpoint id must match.
pub const ID_PATTERN: &str = r"^[a-z][a-z0-9_-]{0,62}$";

/// One touchpoint, as written in its TOML file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Touchpoint {
    /// The fields every kind has.
    #[serde(flatten)]
    pub common: Common,
    /// The kind and its own fields.
    #[serde(flatten)]
    pub spec: KindSpec,
}

/// The fields every touchpoint has, whatever its kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Common {
    /// # Id
    /// The touchpoint's identity: lowercase letters, digits, `-` and `_`, starting with a letter,
    /// unique across the tree. Renaming it means deleting one touchpoint and creating another.
    #[schemars(pattern(ID_PATTERN))]
    pub id: String,
    /// # Name
    /// Display name (触点名称), any text, e.g. "短信".
    #[schemars(length(min = 1))]
    pub name: String,
    /// # Category
    /// 触点类型: `notification` (SMS, Official Account), `benefit` (coupons, points) or `other`.
    pub category: Category,
    /// # Enabled
    /// A disabled touchpoint stays registered but accepts no dispatches.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// # Protect
    /// A protected touchpoint is never deleted by apply; set it to false first.
    #[serde(default)]
    pub protect: bool,
    /// # Description
    /// Free text for the people who maintain this touchpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// # Labels
    /// Free key/value pairs, e.g. `team = "crm"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

/// The 触点类型 of the console.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// 通知类型: SMS, Official Account messages, push.
    Notification,
    /// 权益类型: coupons, points.
    Benefit,
    /// 其他.
    Other,
}

/// What kind of touchpoint this is, with the fields of that kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KindSpec {
    /// # Custom touchpoint
    /// 自定义触点: the customer's own HTTP endpoint receives triggered users in batches.
    Custom(CustomSpec),
    /// # WeChat Official Account
    /// 公众号: template messages through a WeChat Official Account.
    WechatOfficialAccount(WechatOaSpec),
    /// # WeCom app
    /// 企业微信: messages through a WeCom corp app.
    Wecom(WecomSpec),
    /// # App push
    /// App 消息推送: notifications through a push provider (个推 Getui).
    AppPush(AppPushSpec),
    /// # WeChat open platform
    /// 开放平台第三方平台: the third-party platform Official Accounts in third-party mode are bound
    /// through. Not a touchpoint (nothing is dispatched to it); its `category` defaults to `other`.
    WechatOpenPlatform(WechatOpenPlatformSpec),
}

impl KindSpec {
    /// The `kind` value as written in files.
    pub fn name(&self) -> &'static str {
        match self {
            KindSpec::Custom(_) => "custom",
            KindSpec::WechatOfficialAccount(_) => "wechat_official_account",
            KindSpec::Wecom(_) => "wecom",
            KindSpec::AppPush(_) => "app_push",
            KindSpec::WechatOpenPlatform(_) => "wechat_open_platform",
        }
    }

    /// The dynamic params of any kind (none for an open platform, which is not dispatched to).
    pub fn dynamic_params(&self) -> &DynamicParams {
        static NONE: std::sync::LazyLock<DynamicParams> =
            std::sync::LazyLock::new(DynamicParams::default);
        match self {
            KindSpec::Custom(s) => &s.dynamic_params,
            KindSpec::WechatOfficialAccount(s) => &s.dynamic_params,
            KindSpec::Wecom(s) => &s.dynamic_params,
            KindSpec::AppPush(s) => &s.dynamic_params,
            KindSpec::WechatOpenPlatform(_) => &NONE,
        }
    }

    /// Whether triggers can be dispatched to this kind: every kind but the open platform.
    pub fn is_touchpoint(&self) -> bool {
        !matches!(self, KindSpec::WechatOpenPlatform(_))
    }

    /// The recipient field a channel kind addresses users by (`openid`, `userid` or
    /// `external_userid` by the WeCom audience, `cid`); none for custom.
    pub fn address_param(&self) -> Option<&'static str> {
        match self {
            KindSpec::Custom(_) => None,
            KindSpec::WechatOfficialAccount(_) => Some("openid"),
            KindSpec::Wecom(s) => Some(s.audience.address_param()),
            KindSpec::AppPush(_) => Some("cid"),
            KindSpec::WechatOpenPlatform(_) => None,
        }
    }
}

impl Touchpoint {
    /// Reads a touchpoint from its JSON form, taking the values over instead of copying them: the
    /// common fields are moved into one table and the rest is read as the kind's fields. (Unknown
    /// fields are the schema's job: the kind structs ignore the fields they do not own.)
    pub fn from_json(doc: serde_json::Value) -> Result<Self, serde_json::Error> {
        use serde::de::Error;
        let serde_json::Value::Object(mut rest) = doc else {
            return Err(Error::custom("a touchpoint must be a table"));
        };
        type Read = fn(serde_json::Value) -> Result<KindSpec, serde_json::Error>;
        let kind = rest
            .get("kind")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned);
        let read_kind: Read = match kind.as_deref() {
            Some("custom") => |v| CustomSpec::deserialize(v).map(KindSpec::Custom),
            Some("wechat_official_account") => {
                |v| WechatOaSpec::deserialize(v).map(KindSpec::WechatOfficialAccount)
            }
            Some("wecom") => |v| WecomSpec::deserialize(v).map(KindSpec::Wecom),
            Some("app_push") => |v| AppPushSpec::deserialize(v).map(KindSpec::AppPush),
            Some("wechat_open_platform") => {
                // A platform is not a touchpoint: its category only sorts it with the others.
                if !rest.contains_key("category") {
                    rest.insert("category".into(), "other".into());
                }
                |v| WechatOpenPlatformSpec::deserialize(v).map(KindSpec::WechatOpenPlatform)
            }
            Some(other) => return Err(Error::custom(format!("unknown kind `{other}`"))),
            None => return Err(Error::missing_field("kind")),
        };
        let mut common = serde_json::Map::new();
        for field in COMMON_FIELDS {
            if let Some((key, value)) = rest.remove_entry(*field) {
                common.insert(key, value);
            }
        }
        let common = Common::deserialize(serde_json::Value::Object(common))?;
        let spec = read_kind(serde_json::Value::Object(rest))?;
        Ok(Self { common, spec })
    }

    /// The touchpoint's id.
    pub fn id(&self) -> &str {
        &self.common.id
    }

    /// The secret references of the desired configuration: [`Self::secrets`] without the
    /// [`STATE_SECRETS`], which touchctl writes itself.
    pub fn desired_secrets(&self) -> Vec<(&'static str, &SecretRef)> {
        let mut out = self.secrets();
        out.retain(|(path, _)| !STATE_SECRETS.contains(path));
        out
    }

    /// Every secret reference, with its dotted field path (`auth_token`, `auth.app_secret`).
    pub fn secrets(&self) -> Vec<(&'static str, &SecretRef)> {
        let mut out = Vec::new();
        match &self.spec {
            KindSpec::Custom(s) => {
                out.push(("auth_token", &s.auth_token));
                if let Some(r) = &s.signing_secret {
                    out.push(("signing_secret", r));
                }
            }
            KindSpec::WechatOfficialAccount(s) => match &s.auth {
                WechatAuth::Direct { app_secret } => out.push(("auth.app_secret", app_secret)),
                WechatAuth::ThirdParty {
                    authorizer_refresh_token,
                    ..
                } => out.push(("auth.authorizer_refresh_token", authorizer_refresh_token)),
            },
            KindSpec::Wecom(s) => {
                out.push(("secret", &s.secret));
                if let Some(r) = &s.contact_secret {
                    out.push(("contact_secret", r));
                }
            }
            KindSpec::AppPush(s) => out.push(("master_secret", &s.master_secret)),
            KindSpec::WechatOpenPlatform(s) => {
                out.push(("component_secret", &s.component_secret));
                out.push(("token", &s.token));
                out.push(("encoding_aes_key", &s.encoding_aes_key));
            }
        }
        out
    }
}

impl JsonSchema for Touchpoint {
    fn schema_name() -> Cow<'static, str> {
        "Touchpoint".into()
    }

    /// Each kind becomes one closed object schema holding the common fields, `kind` and the kind's
    /// own fields, so that editors and `validate` can name unknown fields precisely. (A derived
    /// schema of two flattened parts could only say "unevaluated property" about the whole object.)
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let common = Common::json_schema(generator);
        let kinds = KindSpec::json_schema(generator);
        let common_props = common.get("properties").cloned().unwrap_or_default();
        let common_required = common.get("required").cloned().unwrap_or_default();
        let mut variants = Vec::new();
        for variant in kinds
            .get("oneOf")
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default()
        {
            let serde_json::Value::Object(mut variant) = variant else {
                continue;
            };
            let mut props = common_props.as_object().cloned().unwrap_or_default();
            if let Some(serde_json::Value::Object(own)) = variant.remove("properties") {
                for (name, schema) in own {
                    props.insert(name, schema);
                }
            }
            if let Some(kind) = props.get_mut("kind").and_then(|k| k.as_object_mut()) {
                kind.insert("title".into(), "Kind".into());
                kind.insert(
                    "description".into(),
                    "Which kind of touchpoint this file describes.".into(),
                );
            }
            let mut required: Vec<serde_json::Value> =
                common_required.as_array().cloned().unwrap_or_default();
            for r in variant
                .remove("required")
                .and_then(|r| r.as_array().cloned())
                .unwrap_or_default()
            {
                if !required.contains(&r) {
                    required.push(r);
                }
            }
            // A platform is not a touchpoint: its category only sorts it with the others.
            if props
                .get("kind")
                .and_then(|k| k.get("const"))
                .is_some_and(|k| k == "wechat_open_platform")
            {
                required.retain(|r| r != "category");
            }
            variant.insert("type".into(), "object".into());
            variant.insert("properties".into(), props.into());
            variant.insert("required".into(), required.into());
            variant.insert("additionalProperties".into(), false.into());
            variants.push(serde_json::Value::Object(variant));
        }
        schemars::json_schema!({
            "title": "Touchpoint",
            "description": "One touchpoint (触点) managed by touchctl: the common fields, `kind`, and that kind's fields.",
            "type": "object",
            "oneOf": variants,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_duration_field_of_the_schema_has_a_known_range() {
        fn patterns<'v>(v: &'v serde_json::Value, out: &mut Vec<&'v str>) {
            match v {
                serde_json::Value::Object(map) => {
                    if let Some(p) = map.get("pattern").and_then(serde_json::Value::as_str) {
                        out.push(p);
                    }
                    map.values().for_each(|v| patterns(v, out));
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| patterns(v, out)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        patterns(crate::model::schema::schema(), &mut found);
        let mut durations = 0;
        for p in found {
            let validator =
                jsonschema::validator_for(&serde_json::json!({ "pattern": p })).unwrap();
            // A pattern that takes one of these is a duration field's.
            let takes_durations = ["1s", "10s", "1m", "1h", "1d"]
                .iter()
                .any(|s| validator.is_valid(&serde_json::json!(s)));
            if takes_durations && p != DURATION_PATTERN {
                assert!(duration_range(p).is_some(), "unlisted duration pattern {p}");
                durations += 1;
            }
        }
        // timeout, retry.backoff, retry.max_backoff, ttl.
        assert_eq!(durations, 4);
    }

    #[test]
    fn kind_names_match_serde() {
        let sample = r#"{"id":"a","name":"A","category":"other","kind":"custom","url":"https://x.example","auth_token":{"env":"T"}}"#;
        let tp: Touchpoint = serde_json::from_str(sample).unwrap();
        let back = serde_json::to_value(&tp).unwrap();
        assert_eq!(back["kind"], tp.spec.name());
        assert_eq!(back["batch_size"], 100);
        assert_eq!(back["retry"]["max_backoff"], "10m");
        assert_eq!(Touchpoint::from_json(back).unwrap(), tp);
    }

    #[test]
    fn common_fields_are_the_fields_of_common() {
        let schema = schemars::schema_for!(Common);
        let mut props: Vec<&str> = schema
            .get("properties")
            .and_then(|p| p.as_object())
            .map(|p| p.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let mut listed = COMMON_FIELDS.to_vec();
        props.sort_unstable();
        listed.sort_unstable();
        assert_eq!(props, listed);
    }

    #[test]
    fn secret_fields_cover_every_secret_of_every_kind() {
        let refs = r#"{"env":"X"}"#;
        let samples = [
            format!(
                r#"{{"kind":"custom","url":"https://x","auth_token":{refs},"signing_secret":{refs}}}"#
            ),
            format!(
                r#"{{"kind":"wechat_official_account","app_id":"wx0123456789abcdef","auth":{{"mode":"direct","app_secret":{refs}}}}}"#
            ),
            format!(
                r#"{{"kind":"wechat_official_account","app_id":"wx0123456789abcdef","auth":{{"mode":"third_party","platform":"open","authorizer_refresh_token":{refs}}}}}"#
            ),
            format!(
                r#"{{"kind":"wecom","corp_id":"ww0123456789abcdef","agent_id":1,"secret":{refs},"contact_secret":{refs}}}"#
            ),
            format!(
                r#"{{"kind":"app_push","provider":"getui","app_id":"a","app_key":"k","master_secret":{refs}}}"#
            ),
            format!(
                r#"{{"kind":"wechat_open_platform","component_app_id":"wx0123456789abcdef","component_secret":{refs},"token":{refs},"encoding_aes_key":{refs}}}"#
            ),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for spec in samples {
            let spec = spec.replacen('{', r#"{"id":"a","name":"A","category":"other","#, 1);
            let tp: Touchpoint = serde_json::from_str(&spec).unwrap();
            for (path, _) in tp.secrets() {
                assert!(
                    SECRET_FIELDS.contains(&path),
                    "{path} missing from SECRET_FIELDS"
                );
                seen.insert(path);
            }
        }
        assert_eq!(seen.len(), SECRET_FIELDS.len());
    }
}
