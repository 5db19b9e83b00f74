//! `kind = "wecom"` (企业微信): messages sent through a WeCom corp app, to members (`message/send`)
//! or, through customer contact (客户联系), to customers (`externalcontact/add_msg_template`).
//!
//! WeCom has no platform templates: a touchpoint's `[[templates]]` name the messages campaigns may
//! send, and a template's `fields` are the parts of the message type's body ([`WecomMessage::rules`]
//! says which, checked when files are loaded):
//!
//! | message | fields | link | members (`message/send`) | customers (`add_msg_template`) |
//! |---|---|---|---|---|
//! | `text` | `content` | none | `text.content` | `text.content` |
//! | `textcard` | `title`, `description`; `btntxt` optional | `url` | `textcard` | not available |
//! | `news` | `title`; `description`, `picurl` optional | `url` (members: or `mini_program`) | one article | one `link` attachment |
//! | `miniprogram_notice` | `title`; `description` optional; any other field is a `content_item` | `mini_program` | `miniprogram_notice` | not available |

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::params::{DynamicParams, MessageTemplate};
use super::secret::SecretRef;

/// A WeCom corp app.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
// Inlined into the touchpoint schema, which closes it (`additionalProperties: false`) there.
#[schemars(inline)]
pub struct WecomSpec {
    /// # Corp id
    /// The enterprise's corp id (`ww` and 16 hex digits), from the WeCom admin console.
    #[schemars(pattern(r"^w[wx][0-9a-f]{16}$"))]
    pub corp_id: String,
    /// # Agent id
    /// The app's AgentId. For `message = "miniprogram_notice"` it is the mini program app's
    /// (小程序应用), whose Secret `secret` must then be.
    #[schemars(range(min = 1))]
    pub agent_id: u32,
    /// # App secret
    /// Secret reference to the app's Secret.
    pub secret: SecretRef,
    /// # Contact secret
    /// Secret reference to the 客户联系 (customer contact) secret; required with
    /// `audience = "customers"`, whose messages are sent with its token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_secret: Option<SecretRef>,
    /// # Audience
    /// Who receives the messages: `members` (default: the corp's members, by `userid`, through
    /// `message/send`, up to 1000 a request) or `customers` (external contacts, by
    /// `external_userid`, through a 客户联系 mass message, `externalcontact/add_msg_template`, up
    /// to 10,000 a request; a member confirms each one in the WeCom client before it is sent).
    #[serde(default, skip_serializing_if = "WecomAudience::is_members")]
    pub audience: WecomAudience,
    /// # Sender
    /// `audience = "customers"` only: the userid of the member who sends the mass message (only
    /// that member's customers receive it). Without it, each customer receives it from the member
    /// who added them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub sender: Option<String>,
    /// # Linked mini programs
    /// App ids of the mini programs associated with the enterprise; templates may only open these.
    #[serde(default)]
    pub linked_mini_programs: Vec<String>,
    /// # Message type
    /// The message type sent: `text` (default; field `content`), `textcard` (fields `title`,
    /// `description`, optional `btntxt`; the template's `url`), `news` (fields `title`, optional
    /// `description` and `picurl`; the template's `url` or `mini_program`) or `miniprogram_notice`
    /// (field `title`, optional `description`, any other field shown as a key/value item; the
    /// template's `mini_program`). Customers take `text` and `news` only.
    #[serde(default)]
    pub message: WecomMessage,
    /// # Templates
    /// The messages campaigns can send through this app; a template's `fields` are the parts of
    /// the message type's body (see `message`). WeCom has no platform templates: `template_id` is
    /// this touchpoint's own label and is not sent.
    #[serde(default)]
    pub templates: Vec<MessageTemplate>,
    /// # Dynamic params
    /// Per-recipient fields; must include the recipient's address: `userid` for members,
    /// `external_userid` for customers.
    #[serde(default)]
    pub dynamic_params: DynamicParams,
    /// # API base URL
    /// Base URL of the WeCom API; defaults to the real service (https://qyapi.weixin.qq.com).
    /// Point it at `touchctl sandbox` to test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_base: Option<String>,
    /// # Allow insecure
    /// Permit an `http:` `api_base` (local testing only).
    #[serde(default)]
    pub allow_insecure: bool,
}

/// Who a WeCom touchpoint sends to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WecomAudience {
    /// The corp's members, by `userid` (`message/send`).
    #[default]
    Members,
    /// External contacts, by `external_userid` (客户联系 `externalcontact/add_msg_template`).
    Customers,
}

impl WecomAudience {
    /// Whether it is the default, `members`.
    pub fn is_members(&self) -> bool {
        *self == WecomAudience::Members
    }

    /// The dynamic param recipients are addressed by.
    pub fn address_param(self) -> &'static str {
        match self {
            WecomAudience::Members => "userid",
            WecomAudience::Customers => "external_userid",
        }
    }

    /// The value as written in files.
    pub fn name(self) -> &'static str {
        match self {
            WecomAudience::Members => "members",
            WecomAudience::Customers => "customers",
        }
    }
}

/// The WeCom message type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WecomMessage {
    /// A text message (field `content`).
    #[default]
    Text,
    /// A text card (文本卡片): fields `title`, `description`, optional `btntxt`; opens the
    /// template's `url`.
    Textcard,
    /// A news (图文) message: fields `title`, optional `description` and `picurl`; opens the
    /// template's `url` (members: or its `mini_program`).
    News,
    /// A mini program notice (小程序通知), members only: field `title`, optional `description`,
    /// every other field a key/value item; opens the template's `mini_program`.
    MiniprogramNotice,
}

/// What a template's link must be for a message type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkRule {
    /// Neither `url` nor `mini_program`.
    None,
    /// `url`, and no `mini_program`.
    Url,
    /// `url`, `mini_program` or both.
    UrlOrMiniProgram,
    /// `mini_program`, and no `url`.
    MiniProgram,
}

/// Which template fields and link a message type takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldRules {
    /// Fields every template must declare.
    pub required: &'static [&'static str],
    /// Fields a template may declare.
    pub optional: &'static [&'static str],
    /// Whether any other field is taken (as a `content_item` of a mini program notice).
    pub items: bool,
    /// The link.
    pub link: LinkRule,
}

/// The most `content_item`s a mini program notice takes.
pub const MAX_NOTICE_ITEMS: usize = 10;

impl WecomMessage {
    /// The value as written in files.
    pub fn name(self) -> &'static str {
        match self {
            WecomMessage::Text => "text",
            WecomMessage::Textcard => "textcard",
            WecomMessage::News => "news",
            WecomMessage::MiniprogramNotice => "miniprogram_notice",
        }
    }

    /// What a template of this type takes for `audience`, or `None` when the audience cannot be
    /// sent this type (customers take `text` and `news`).
    pub fn rules(self, audience: WecomAudience) -> Option<FieldRules> {
        let customers = audience == WecomAudience::Customers;
        Some(match self {
            WecomMessage::Text => FieldRules {
                required: &["content"],
                optional: &[],
                items: false,
                link: LinkRule::None,
            },
            WecomMessage::Textcard if !customers => FieldRules {
                required: &["title", "description"],
                optional: &["btntxt"],
                items: false,
                link: LinkRule::Url,
            },
            WecomMessage::News => FieldRules {
                required: &["title"],
                optional: &["description", "picurl"],
                items: false,
                link: if customers {
                    LinkRule::Url
                } else {
                    LinkRule::UrlOrMiniProgram
                },
            },
            WecomMessage::MiniprogramNotice if !customers => FieldRules {
                required: &["title"],
                optional: &["description"],
                items: true,
                link: LinkRule::MiniProgram,
            },
            _ => return None,
        })
    }
}

impl WecomSpec {
    /// The template rules of its message type and audience (see [`WecomMessage::rules`]).
    pub fn rules(&self) -> Option<FieldRules> {
        self.message.rules(self.audience)
    }
}
