//! `kind = "custom"` (自定义触点): the customer's own HTTP endpoint, which receives triggered users in
//! batches with their dynamic params and the campaign's template params.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::params::{DynamicParams, TemplateParam};
use super::secret::SecretRef;
use super::units::{DurationIn, RateLimit};

/// The largest batch a custom endpoint can be sent (the console's 不大于 500).
pub const MAX_CUSTOM_BATCH: u32 = 500;

/// A request's `timeout`: 1s to 5m. Below a second, a TLS handshake to a distant endpoint alone
/// can use it up, and `0s` fails every request; a batch of at most 500 recipients needs no more
/// than minutes, and a longer wait holds a lane's slot and the daemon's shutdown.
pub type Timeout = DurationIn<1_000, 300_000>;
/// `retry.backoff`, the first wait: 10ms to 1h. Short waits suit an endpoint on the same network
/// (and tests); a first wait over an hour makes the retries a dead letter in disguise.
pub type Backoff = DurationIn<10, 3_600_000>;
/// `retry.max_backoff`, the longest wait, and the cap on an endpoint's `Retry-After`: 100ms to 1d.
/// A day covers a platform's daily quota; a longer wait parks recipients past any campaign's use.
pub type MaxBackoff = DurationIn<100, 86_400_000>;

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
    /// How long one request may take, from 1s to 5m, e.g. "10s". Below a second a TLS handshake to
    /// a distant endpoint can use it up; longer than minutes only holds up the lane and shutdown.
    #[serde(default = "default_timeout")]
    pub timeout: Timeout,
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
    /// Wait before the first retry, from 10ms to 1h; doubles on each further retry (with jitter).
    /// A first wait over an hour would make the retries a dead letter in disguise.
    #[serde(default = "default_backoff")]
    pub backoff: Backoff,
    /// # Maximum backoff
    /// The longest wait between two attempts, from 100ms to 1d; also the longest an endpoint's
    /// `Retry-After` is honoured. A day covers a platform's daily quota; longer parks recipients
    /// past any campaign's use.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: MaxBackoff,
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
fn default_timeout() -> Timeout {
    const { Timeout::from_secs(15) }
}
fn default_attempts() -> u32 {
    12
}
fn default_backoff() -> Backoff {
    const { Backoff::from_secs(1) }
}
fn default_max_backoff() -> MaxBackoff {
    const { MaxBackoff::from_secs(600) }
}
