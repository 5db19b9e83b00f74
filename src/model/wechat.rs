//! `kind = "wechat_official_account"` (公众号): template messages through a WeChat Official Account,
//! authorised directly with its app secret or through a 开放平台 third-party platform.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::params::{DynamicParams, MessageTemplate, WECHAT_APP_ID_PATTERN};
use super::secret::SecretRef;

/// A WeChat Official Account.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
// Inlined into the touchpoint schema, which closes it (`additionalProperties: false`) there.
#[schemars(inline)]
pub struct WechatOaSpec {
    /// # App id
    /// The Official Account's app id (`wx` and 16 hex digits).
    #[schemars(pattern(WECHAT_APP_ID_PATTERN))]
    pub app_id: String,
    /// # Authorisation
    /// How touchctl obtains access tokens: `direct` with the app secret, or `third_party` through a
    /// 开放平台 third-party platform the account has authorised.
    pub auth: WechatAuth,
    /// # Required permissions
    /// Permission sets the account must have granted (the console requires all eight by default).
    #[serde(default = "Permission::all")]
    pub required_permissions: Vec<Permission>,
    /// # Linked mini programs
    /// App ids of the mini programs associated with this account; templates may only open these.
    #[serde(default)]
    pub linked_mini_programs: Vec<String>,
    /// # Templates
    /// The template messages campaigns can send through this account.
    #[serde(default)]
    pub templates: Vec<MessageTemplate>,
    /// # Dynamic params
    /// Per-recipient fields; must include `openid`, the recipient's address.
    #[serde(default)]
    pub dynamic_params: DynamicParams,
    /// # API base URL
    /// Base URL of the WeChat API; defaults to the real service. Point it at `touchctl sandbox` to test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_base: Option<String>,
    /// # Allow insecure
    /// Permit an `http:` `api_base` (local testing only).
    #[serde(default)]
    pub allow_insecure: bool,
}

/// How a WeChat Official Account is authorised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum WechatAuth {
    /// # Direct
    /// The account's own app secret (`/cgi-bin/token`, client_credential).
    Direct {
        /// # App secret
        /// Secret reference to the Official Account's AppSecret.
        app_secret: SecretRef,
    },
    /// # Third-party platform
    /// A 开放平台 third-party platform the account has authorised (`api_authorizer_token`).
    ThirdParty {
        /// # Component app id
        /// The third-party platform's app id.
        #[schemars(pattern(WECHAT_APP_ID_PATTERN))]
        component_app_id: String,
        /// # Component secret
        /// Secret reference to the third-party platform's AppSecret.
        component_secret: SecretRef,
        /// # Authorizer refresh token
        /// Secret reference to the refresh token obtained when the account authorised the platform.
        authorizer_refresh_token: SecretRef,
    },
}

/// A permission set an Official Account grants a third-party platform.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// 消息管理权限
    Message,
    /// 用户管理权限
    User,
    /// 公众号账号信息服务权限
    Account,
    /// 网页服务权限
    Web,
    /// 群发与通知权限
    MassSend,
    /// 素材管理权限
    Material,
    /// 自定义菜单权限
    Menu,
    /// 开放平台账号管理权限
    OpenAccount,
}

impl Permission {
    /// The eight permission sets the console requires.
    pub fn all() -> Vec<Permission> {
        use Permission::*;
        vec![
            Message,
            User,
            Account,
            Web,
            MassSend,
            Material,
            Menu,
            OpenAccount,
        ]
    }
}
