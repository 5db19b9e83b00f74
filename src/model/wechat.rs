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
    /// A 开放平台 third-party platform the account has authorised (`api_authorizer_token`);
    /// `touchctl auth wechat` binds the account and writes the refresh token.
    ThirdParty {
        /// # Platform
        /// The `id` of the `wechat_open_platform` file that declares the third-party platform.
        #[schemars(pattern(crate::model::ID_PATTERN))]
        platform: String,
        /// # Authorizer refresh token
        /// A `{ file = "..." }` reference to where the account's refresh token is kept:
        /// `touchctl auth wechat` writes it there, and the daemon writes a rotated one back.
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

    /// The permission set's id in WeChat's `func_info` (`funcscope_category.id`).
    pub fn id(self) -> u32 {
        match self {
            Permission::Message => 1,
            Permission::User => 2,
            Permission::Account => 3,
            Permission::Web => 4,
            Permission::MassSend => 7,
            Permission::Material => 11,
            Permission::Menu => 15,
            Permission::OpenAccount => 24,
        }
    }

    /// The permission set with this `func_info` id, if it is one of the eight.
    pub fn from_id(id: u32) -> Option<Permission> {
        Permission::all().into_iter().find(|p| p.id() == id)
    }

    /// The name as written in files (`mass_send`).
    pub fn name(self) -> &'static str {
        match self {
            Permission::Message => "message",
            Permission::User => "user",
            Permission::Account => "account",
            Permission::Web => "web",
            Permission::MassSend => "mass_send",
            Permission::Material => "material",
            Permission::Menu => "menu",
            Permission::OpenAccount => "open_account",
        }
    }

    /// The name WeChat's authorisation page shows (消息管理).
    pub fn label(self) -> &'static str {
        match self {
            Permission::Message => "消息管理",
            Permission::User => "用户管理",
            Permission::Account => "帐号服务",
            Permission::Web => "网页服务",
            Permission::MassSend => "群发与通知",
            Permission::Material => "素材管理",
            Permission::Menu => "自定义菜单",
            Permission::OpenAccount => "开放平台帐号管理",
        }
    }

    /// An account grants this set to one third-party platform at a time (互斥权限集): when another
    /// platform holds it, the account cannot grant it to this one.
    pub fn exclusive(self) -> bool {
        matches!(self, Permission::Web | Permission::OpenAccount)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_ids_are_wechat_s_and_names_are_serde_s() {
        let ids: Vec<u32> = Permission::all().into_iter().map(Permission::id).collect();
        assert_eq!(ids, [1, 2, 3, 4, 7, 11, 15, 24]);
        for p in Permission::all() {
            assert_eq!(Permission::from_id(p.id()), Some(p));
            assert_eq!(serde_json::to_value(p).unwrap(), p.name());
        }
        assert_eq!(Permission::from_id(33), None);
        let exclusive: Vec<u32> = Permission::all()
            .into_iter()
            .filter(|p| p.exclusive())
            .map(Permission::id)
            .collect();
        assert_eq!(exclusive, [4, 24]);
    }
}
