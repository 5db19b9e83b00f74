//! `kind = "app_push"` (App 消息推送): notifications pushed to an app through a push provider.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::params::DynamicParams;
use super::secret::SecretRef;
use super::units::DurationIn;

/// The largest batch a push provider is sent.
pub const MAX_PUSH_BATCH: u32 = 1000;

/// An app push `ttl`: 1s to 3d. Getui keeps an offline message at most three days (its `ttl` runs
/// to 3 × 24 × 3600 × 1000 ms); under a second nothing is kept for a device that is offline.
pub type PushTtl = DurationIn<1_000, 259_200_000>;

/// An app push channel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
// Inlined into the touchpoint schema, which closes it (`additionalProperties: false`) there.
#[schemars(inline)]
pub struct AppPushSpec {
    /// # Provider
    /// The push service: `getui` (个推) today.
    pub provider: PushProvider,
    /// # App id
    /// The app's id at the provider.
    #[schemars(length(min = 1))]
    pub app_id: String,
    /// # App key
    /// The app's key at the provider.
    #[schemars(length(min = 1))]
    pub app_key: String,
    /// # Master secret
    /// Secret reference to the app's MasterSecret.
    pub master_secret: SecretRef,
    /// # Batch size
    /// Devices per push request, 1 to 1000.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = MAX_PUSH_BATCH))]
    pub batch_size: u32,
    /// # Time to live
    /// How long the provider keeps an undelivered message, from 1s to 3d, e.g. "1d". Getui keeps an
    /// offline message at most three days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<PushTtl>,
    /// # Default title
    /// Notification title used when a trigger gives none, 1 to 50 characters (Getui's limit). The
    /// same text goes to every recipient, so it cannot hold `{{name}}` placeholders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 50))]
    pub title: Option<String>,
    /// # Default body
    /// Notification body used when a trigger gives none, 1 to 256 characters (Getui's limit). The
    /// same text goes to every recipient, so it cannot hold `{{name}}` placeholders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub body: Option<String>,
    /// # Dynamic params
    /// Per-recipient fields; must include `cid`, the device's client id.
    #[serde(default)]
    pub dynamic_params: DynamicParams,
    /// # API base URL
    /// Base URL of the provider's API, without a path: requests go to `{api_base}/v2/{app_id}/...`.
    /// Defaults to the real service (`https://restapi.getui.com`). Point it at `touchctl sandbox`
    /// (e.g. `http://127.0.0.1:8641`, with `allow_insecure = true`) to test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_base: Option<String>,
    /// # Allow insecure
    /// Permit an `http:` `api_base` (local testing only).
    #[serde(default)]
    pub allow_insecure: bool,
}

/// A push provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PushProvider {
    /// 个推 Getui (REST API v2).
    Getui,
}

fn default_batch_size() -> u32 {
    200
}
