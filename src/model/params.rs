//! Parameters shared by the kinds: dynamic params (per recipient, mapped from user attributes),
//! template params (given once per campaign) and message templates of the WeChat-family channels.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Pattern of a dynamic param's source: `user.` followed by an attribute name.
pub const SOURCE_PATTERN: &str = r"^user\.[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$";
/// Pattern of a parameter or template name.
pub const NAME_PATTERN: &str = r"^[A-Za-z_][A-Za-z0-9_]*$";
/// Pattern of a WeChat app id (Official Account or mini program).
pub const WECHAT_APP_ID_PATTERN: &str = r"^wx[0-9a-f]{16}$";

/// Per-recipient fields, keyed by the recipient field name (动态参数).
pub type DynamicParams = BTreeMap<String, ParamSource>;

/// Where a dynamic param's value comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged, deny_unknown_fields)]
pub enum ParamSource {
    /// # User attribute
    /// A required user attribute, written `"user.<attribute>"`: a user without it is rejected at dispatch.
    Attribute(#[schemars(pattern(SOURCE_PATTERN))] String),
    /// # User attribute, with options
    /// A user attribute with options.
    Detailed {
        /// # Source
        /// The user attribute, written `"user.<attribute>"`.
        #[schemars(pattern(SOURCE_PATTERN))]
        from: String,
        /// # Optional
        /// When true, a user without the attribute is still sent, without this field.
        #[serde(default)]
        optional: bool,
    },
}

impl ParamSource {
    /// The `user.<attribute>` path.
    pub fn from(&self) -> &str {
        match self {
            ParamSource::Attribute(from) | ParamSource::Detailed { from, .. } => from,
        }
    }

    /// Whether a user may lack the attribute.
    pub fn optional(&self) -> bool {
        matches!(self, ParamSource::Detailed { optional: true, .. })
    }
}

/// The type of a template param's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ParamType {
    /// Any text.
    String,
    /// A whole number.
    Integer,
    /// Any number.
    Number,
    /// true or false.
    Boolean,
    /// An absolute http(s) URL.
    Url,
}

/// A parameter whose value is given once per campaign for the whole audience (模版参数), e.g. SMS text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateParam {
    /// # Name
    /// The key the value is sent under in the request's `template` object.
    #[schemars(pattern(NAME_PATTERN))]
    pub name: String,
    /// # Type
    /// The type a campaign's value must have.
    #[serde(rename = "type")]
    pub kind: ParamType,
    /// # Required
    /// Whether every campaign must give a value.
    #[serde(default = "yes")]
    pub required: bool,
    /// # Maximum length
    /// The longest value accepted, in characters (string and url params only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_length: Option<u32>,
    /// # Description
    /// What the campaign author should put here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

fn yes() -> bool {
    true
}

/// A mini program page a template message opens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MiniProgramLink {
    /// # Mini program app id
    /// The mini program to open; it must be listed in `linked_mini_programs`.
    #[schemars(pattern(WECHAT_APP_ID_PATTERN))]
    pub app_id: String,
    /// # Page
    /// The page path inside the mini program, e.g. `pages/order/detail?id=1`.
    #[schemars(length(min = 1))]
    pub page: String,
}

/// A message template of a WeChat Official Account or WeCom app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageTemplate {
    /// # Template name
    /// This touchpoint's name for the template; campaigns refer to it.
    #[schemars(pattern(NAME_PATTERN))]
    pub id: String,
    /// # Platform template id
    /// The template id assigned by the platform.
    #[schemars(length(min = 1))]
    pub template_id: String,
    /// # Fields
    /// The template's keys, e.g. `first`, `keyword1`, `remark`.
    #[serde(default)]
    pub fields: Vec<String>,
    /// # Link
    /// A web page the message opens (https).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// # Mini program
    /// A mini program page the message opens instead of, or as well as, `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mini_program: Option<MiniProgramLink>,
}
