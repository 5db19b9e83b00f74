//! `kind = "custom"` (自定义触点): the customer's own HTTP endpoint, which receives triggered users in
//! batches with their dynamic params and the campaign's template params.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::params::{DynamicParams, TemplateParam};
use super::secret::SecretRef;
use super::units::{Duration, RateLimit};

/// The largest batch a custom endpoint can be sent (the console's 不大于 500).
pub const MAX_CUSTOM_BATCH: u32 = 500;

/// A custom touchpoint: batches of triggered users POSTed to the customer's endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
// Inlined into the touchpoint schema, which closes it (`additionalProperties: false`) there.
#[schemars(inline)]
pub struct CustomSpec {
    /// # Endpoint URL
    /// The customer's endpoint (https; http only with `allow_insecure = true`).
    pub url: String,
    /// # Auth token
    /// Secret reference; sent as `Authorization: Bearer <token>`.
    pub auth_token: SecretRef,
    /// # Signing secret
    /// Optional secret reference; when set, requests carry Standard Webhooks signature headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret: Option<SecretRef>,
    /// # Batch size
    /// Recipients per request, 1 to 500.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = MAX_CUSTOM_BATCH))]
    pub batch_size: u32,
    /// # Timeout
    /// How long one request may take, e.g. "10s".
    #[serde(default = "default_timeout")]
    pub timeout: Duration,
    /// # Allow insecure
    /// Permit an `http:` URL (local testing only).
    #[serde(default)]
    pub allow_insecure: bool,
    /// # Rate limit
    /// Requests per unit of time to this endpoint, e.g. "50/s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// # Retry policy
    /// How failed batches are retried: exponential backoff with jitter.
    #[serde(default)]
    pub retry: Retry,
    /// # Dynamic params
    /// Per-recipient fields (动态参数): recipient field name = "user.<attribute>".
    #[serde(default)]
    pub dynamic_params: DynamicParams,
    /// # Template params
    /// Values given once per campaign for the whole audience (模版参数), e.g. the SMS text.
    #[serde(default)]
    pub template_params: Vec<TemplateParam>,
}

/// Retry policy for failed deliveries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// # Attempts
    /// How many attempts in all before a batch is dead-lettered.
    #[serde(default = "default_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub attempts: u32,
    /// # Backoff
    /// Wait before the first retry; doubles on each further retry.
    #[serde(default = "default_backoff")]
    pub backoff: Duration,
    /// # Maximum backoff
    /// The longest wait between two attempts.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: default_attempts(),
            backoff: default_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

fn default_batch_size() -> u32 {
    100
}
fn default_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_attempts() -> u32 {
    12
}
fn default_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(600)
}
