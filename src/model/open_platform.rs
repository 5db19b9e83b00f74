//! `kind = "wechat_open_platform"` (开放平台第三方平台): the third-party platform through which Official
//! Accounts in third-party mode are authorised. Nothing is dispatched to it; it is kept, planned and
//! applied with the touchpoints, and the OA files that use it name it by `id`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::params::WECHAT_APP_ID_PATTERN;
use super::secret::SecretRef;

/// A WeChat open platform third-party platform (开放平台第三方平台).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
// Inlined into the touchpoint schema, which closes it (`additionalProperties: false`) there.
#[schemars(inline)]
pub struct WechatOpenPlatformSpec {
    /// # Component app id
    /// The third-party platform's AppID (`wx` and 16 hex digits), from 开放平台 → 第三方平台 → 详情.
    #[schemars(pattern(WECHAT_APP_ID_PATTERN))]
    pub component_app_id: String,
    /// # Component secret
    /// Secret reference to the third-party platform's AppSecret.
    pub component_secret: SecretRef,
    /// # Message verification token
    /// Secret reference to the platform's 消息校验Token, which signs the events WeChat pushes.
    pub token: SecretRef,
    /// # EncodingAESKey
    /// Secret reference to the platform's 消息加解密Key (43 characters), which encrypts the events WeChat pushes.
    pub encoding_aes_key: SecretRef,
    /// # API base URL
    /// Base URL of the WeChat API and of the authorisation pages; defaults to the real services. Point it
    /// at `touchctl sandbox` to test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_base: Option<String>,
    /// # Allow insecure
    /// Permit an `http:` `api_base` (local testing only).
    #[serde(default)]
    pub allow_insecure: bool,
}
