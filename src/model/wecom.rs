//! `kind = "wecom"` (企业微信): messages sent through a WeCom corp app.

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
    /// The app's AgentId.
    #[schemars(range(min = 1))]
    pub agent_id: u32,
    /// # App secret
    /// Secret reference to the app's Secret.
    pub secret: SecretRef,
    /// # Contact secret
    /// Secret reference to the 客户联系 (customer contact) secret, when customer contact is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_secret: Option<SecretRef>,
    /// # Linked mini programs
    /// App ids of the mini programs associated with the app; templates may only open these.
    #[serde(default)]
    pub linked_mini_programs: Vec<String>,
    /// # Message type
    /// The message type sent: `text` or `news`.
    #[serde(default)]
    pub message: WecomMessage,
    /// # Templates
    /// The messages campaigns can send through this app.
    #[serde(default)]
    pub templates: Vec<MessageTemplate>,
    /// # Dynamic params
    /// Per-recipient fields; must include `userid`, the recipient's address.
    #[serde(default)]
    pub dynamic_params: DynamicParams,
    /// # API base URL
    /// Base URL of the WeCom API; defaults to the real service. Point it at `touchctl sandbox` to test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_base: Option<String>,
    /// # Allow insecure
    /// Permit an `http:` `api_base` (local testing only).
    #[serde(default)]
    pub allow_insecure: bool,
}

/// The WeCom message type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WecomMessage {
    /// A text message.
    #[default]
    Text,
    /// A news (图文) message.
    News,
}
