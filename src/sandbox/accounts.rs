//! The accounts the sandbox knows: the credentials of the touchpoints in a loaded tree, with their
//! secret references resolved. A touchpoint whose secret cannot be read, or that the sandbox does
//! not serve, is left out with a [`Notice`] saying why; the others are served.
//!
//! Open platforms (`wechat_open_platform`) are read first: an Official Account in third-party mode
//! is served when the platform it names is, as an account an administrator can authorise to it.

use std::fmt;

use crate::channel::custom::signing_key;
use crate::channel::open_platform::crypt::MsgCrypt;
use crate::load::{Desired, Loaded};
use crate::model::{KindSpec, MessageTemplate, Secret, SecretPolicy, SecretRef, WechatAuth};

/// The path prefix under which custom touchpoints' webhooks are received.
pub const SINK_PREFIX: &str = "/_sandbox/webhooks/";

/// A WeChat Official Account.
#[derive(Debug)]
pub struct OaAccount {
    /// The touchpoint id.
    pub id: String,
    /// Its display name (the `nick_name` the open platform answers).
    pub name: String,
    /// Its app id.
    pub app_id: String,
    /// How its tokens are obtained.
    pub auth: OaAuth,
    /// Its templates: a send must name one of their `template_id`s.
    pub templates: Vec<MessageTemplate>,
    /// The mini programs linked to it (`wxamplinkget` lists them).
    pub linked_mini_programs: Vec<String>,
}

/// How an Official Account's tokens are obtained.
#[derive(Debug)]
pub enum OaAuth {
    /// Direct mode: `/cgi-bin/token` with its AppSecret.
    Direct {
        /// Its AppSecret.
        secret: Secret,
    },
    /// Third-party mode: an authorizer token of the open platform at this index of
    /// [`Accounts::platforms`], once the account has authorised it.
    ThirdParty {
        /// The platform's index.
        platform: usize,
    },
}

impl OaAccount {
    /// The open platform it is authorised through, if any.
    pub fn platform(&self) -> Option<usize> {
        match self.auth {
            OaAuth::Direct { .. } => None,
            OaAuth::ThirdParty { platform } => Some(platform),
        }
    }
}

/// A WeChat open platform third-party platform (`wechat_open_platform`).
#[derive(Debug)]
pub struct PlatformAccount {
    /// The file's id.
    pub id: String,
    /// Its display name, shown on the authorisation page.
    pub name: String,
    /// The component app id.
    pub component_app_id: String,
    /// The component AppSecret.
    pub secret: Secret,
    /// The message token (it also signs a push's plain `signature`).
    pub token: Secret,
    /// The message crypto of its pushes (its token and EncodingAESKey).
    pub crypt: MsgCrypt,
}

/// A WeCom corp app.
#[derive(Debug)]
pub struct WecomAccount {
    /// The touchpoint id.
    pub id: String,
    /// The corp id.
    pub corp_id: String,
    /// The app's AgentId.
    pub agent_id: u32,
    /// The app's Secret (its token sends `message/send`).
    pub secret: Secret,
    /// The 客户联系 secret (its token sends `externalcontact/add_msg_template`).
    pub contact_secret: Option<Secret>,
}

/// A Getui app.
#[derive(Debug)]
pub struct GetuiAccount {
    /// The touchpoint id.
    pub id: String,
    /// The app id (the `{appId}` of the paths).
    pub app_id: String,
    /// The app key the `auth` sign is made with.
    pub app_key: String,
    /// The MasterSecret the `auth` sign is made with.
    pub master_secret: Secret,
}

/// A custom touchpoint whose url is a sandbox sink path.
#[derive(Debug)]
pub struct SinkAccount {
    /// The touchpoint id.
    pub id: String,
    /// The `NAME` of `/_sandbox/webhooks/NAME`.
    pub name: String,
    /// The Bearer token requests must carry.
    pub auth_token: Secret,
    /// The Standard Webhooks key, when the touchpoint signs.
    pub signing_key: Option<Vec<u8>>,
}

/// Everything the sandbox serves.
#[derive(Debug, Default)]
pub struct Accounts {
    /// WeChat Official Accounts, in direct and third-party mode.
    pub oa: Vec<OaAccount>,
    /// WeChat open platforms.
    pub platforms: Vec<PlatformAccount>,
    /// WeCom apps.
    pub wecom: Vec<WecomAccount>,
    /// Getui apps.
    pub getui: Vec<GetuiAccount>,
    /// Custom touchpoints' sinks.
    pub sinks: Vec<SinkAccount>,
}

/// Why a touchpoint of the tree is not served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A secret could not be read: the touchpoint is left out.
    Unreadable {
        /// The touchpoint id.
        id: String,
        /// The secret's field path.
        field: &'static str,
        /// Why.
        why: String,
    },
    /// Its settings cannot be used as they are (an EncodingAESKey that is not one): it is left out.
    Unusable {
        /// The touchpoint id.
        id: String,
        /// Why, and what to do.
        why: String,
    },
    /// The sandbox does not serve this touchpoint.
    NotServed {
        /// The touchpoint id.
        id: String,
        /// Why.
        why: String,
    },
}

impl Notice {
    /// Whether it is a warning (something is wrong) rather than a note.
    pub fn is_warning(&self) -> bool {
        matches!(self, Notice::Unreadable { .. } | Notice::Unusable { .. })
    }
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::Unreadable { id, field, why } => write!(
                f,
                "warning: {id}: cannot read its secret `{field}` ({why}); it is left out of the sandbox: fix the reference (or pass --secrets-dir / --secret-env-allow) and start the sandbox again"
            ),
            Notice::Unusable { id, why } => write!(
                f,
                "warning: {id}: {why}; it is left out of the sandbox: fix it and start the sandbox again"
            ),
            Notice::NotServed { id, why } => write!(f, "note: {id} is not served: {why}"),
        }
    }
}

impl Accounts {
    /// The accounts of every touchpoint of `desired` the sandbox serves, and what it left out.
    pub fn load(desired: &Desired, policy: &SecretPolicy) -> (Self, Vec<Notice>) {
        let mut accounts = Accounts::default();
        let mut notices = Vec::new();
        // Platforms first: the Official Accounts in third-party mode refer to them.
        let (platforms, others): (Vec<_>, Vec<_>) = desired
            .touchpoints
            .iter()
            .partition(|l| matches!(l.touchpoint.spec, KindSpec::WechatOpenPlatform(_)));
        for loaded in platforms.into_iter().chain(others) {
            if let Err(n) = accounts.add(loaded, policy) {
                notices.push(n);
            }
        }
        (accounts, notices)
    }

    /// How many accounts in all.
    pub fn len(&self) -> usize {
        self.oa.len()
            + self.platforms.len()
            + self.wecom.len()
            + self.getui.len()
            + self.sinks.len()
    }

    /// The Official Accounts an administrator can authorise to the platform at `platform`, with
    /// their indexes among [`Accounts::oa`].
    pub fn authorisable(&self, platform: usize) -> impl Iterator<Item = (usize, &OaAccount)> {
        self.oa
            .iter()
            .enumerate()
            .filter(move |(_, a)| a.platform() == Some(platform))
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn add(&mut self, loaded: &Loaded, policy: &SecretPolicy) -> Result<(), Notice> {
        let tp = &loaded.touchpoint;
        let id = tp.id().to_string();
        let read = |field: &'static str, r: &SecretRef| {
            r.resolve(&loaded.dir, policy)
                .map_err(|e| Notice::Unreadable {
                    id: id.clone(),
                    field,
                    why: e.to_string(),
                })
        };
        match &tp.spec {
            KindSpec::WechatOfficialAccount(s) => {
                let auth = match &s.auth {
                    WechatAuth::Direct { app_secret } => OaAuth::Direct {
                        secret: read("auth.app_secret", app_secret)?,
                    },
                    WechatAuth::ThirdParty { platform, .. } => {
                        let Some(i) = self.platforms.iter().position(|p| &p.id == platform) else {
                            return Err(Notice::NotServed {
                                id,
                                why: format!(
                                    "the open platform it is authorised through, `{platform}`, is not served (see above)"
                                ),
                            });
                        };
                        OaAuth::ThirdParty { platform: i }
                    }
                };
                self.oa.push(OaAccount {
                    id,
                    name: tp.common.name.clone(),
                    app_id: s.app_id.clone(),
                    auth,
                    templates: s.templates.clone(),
                    linked_mini_programs: s.linked_mini_programs.clone(),
                });
            }
            KindSpec::Wecom(s) => {
                let secret = read("secret", &s.secret)?;
                let contact_secret = s
                    .contact_secret
                    .as_ref()
                    .map(|r| read("contact_secret", r))
                    .transpose()?;
                self.wecom.push(WecomAccount {
                    id,
                    corp_id: s.corp_id.clone(),
                    agent_id: s.agent_id,
                    secret,
                    contact_secret,
                });
            }
            KindSpec::AppPush(s) => {
                let master_secret = read("master_secret", &s.master_secret)?;
                self.getui.push(GetuiAccount {
                    id,
                    app_id: s.app_id.clone(),
                    app_key: s.app_key.clone(),
                    master_secret,
                });
            }
            KindSpec::WechatOpenPlatform(s) => {
                let secret = read("component_secret", &s.component_secret)?;
                let token = read("token", &s.token)?;
                let key = read("encoding_aes_key", &s.encoding_aes_key)?;
                let crypt = MsgCrypt::new(token.expose(), key.expose(), &s.component_app_id)
                    .map_err(|e| Notice::Unusable {
                        id: id.clone(),
                        why: e.to_string(),
                    })?;
                self.platforms.push(PlatformAccount {
                    id,
                    name: tp.common.name.clone(),
                    component_app_id: s.component_app_id.clone(),
                    secret,
                    token,
                    crypt,
                });
            }
            KindSpec::Custom(s) => {
                let Some(name) = sink_name(&s.url) else {
                    return Err(Notice::NotServed {
                        id,
                        why: format!(
                            "its url is not a sandbox sink ({SINK_PREFIX}NAME on the sandbox's address)"
                        ),
                    });
                };
                let auth_token = read("auth_token", &s.auth_token)?;
                let signing_key = match &s.signing_secret {
                    None => None,
                    Some(r) => Some(signing_key(&read("signing_secret", r)?).map_err(|why| {
                        Notice::Unreadable {
                            id: id.clone(),
                            field: "signing_secret",
                            why,
                        }
                    })?),
                };
                self.sinks.push(SinkAccount {
                    id,
                    name,
                    auth_token,
                    signing_key,
                });
            }
        }
        Ok(())
    }

    /// One line per account served, for the operator (not escaped: the caller escapes). `base` is
    /// the sandbox's `http://ADDR`.
    pub fn describe(&self, base: &str) -> Vec<String> {
        let mut out = Vec::with_capacity(self.len());
        for (i, p) in self.platforms.iter().enumerate() {
            let accounts: Vec<&str> = self.authorisable(i).map(|(_, a)| a.id.as_str()).collect();
            out.push(format!(
                "serving {} (wechat_open_platform, component app id {}, authorisation page {base}/cgi-bin/componentloginpage, accounts it can authorise: {})",
                p.id,
                p.component_app_id,
                if accounts.is_empty() {
                    "none".to_string()
                } else {
                    accounts.join(", ")
                }
            ));
        }
        for a in &self.oa {
            let mode = match a.auth {
                OaAuth::Direct { .. } => String::new(),
                OaAuth::ThirdParty { platform } => format!(
                    ", third-party through {}",
                    self.platforms.get(platform).map_or("?", |p| p.id.as_str())
                ),
            };
            out.push(format!(
                "serving {} (wechat_official_account, app id {}{mode}, {} template(s))",
                a.id,
                a.app_id,
                a.templates.len()
            ));
        }
        for a in &self.wecom {
            out.push(format!(
                "serving {} (wecom, corp id {}, agent {}{})",
                a.id,
                a.corp_id,
                a.agent_id,
                if a.contact_secret.is_some() {
                    ", customer contact"
                } else {
                    ""
                }
            ));
        }
        for a in &self.getui {
            out.push(format!(
                "serving {} (app_push getui, app id {})",
                a.id, a.app_id
            ));
        }
        for a in &self.sinks {
            out.push(format!(
                "serving {} (custom, {base}{SINK_PREFIX}{}, {})",
                a.id,
                a.name,
                if a.signing_key.is_some() {
                    "Bearer token and signature checked"
                } else {
                    "Bearer token checked"
                }
            ));
        }
        out
    }
}

/// The `NAME` of a url whose path is `/_sandbox/webhooks/NAME` (one non-empty segment).
pub fn sink_name(url: &str) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    let name = url.path().strip_prefix(SINK_PREFIX)?;
    (!name.is_empty() && !name.contains('/')).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_names_are_one_segment_under_the_prefix() {
        assert_eq!(
            sink_name("http://127.0.0.1:8641/_sandbox/webhooks/sms").as_deref(),
            Some("sms")
        );
        assert_eq!(
            sink_name("https://sandbox.local/_sandbox/webhooks/a-b?x=1").as_deref(),
            Some("a-b")
        );
        assert_eq!(sink_name("http://127.0.0.1:8641/_sandbox/webhooks/"), None);
        assert_eq!(
            sink_name("http://127.0.0.1:8641/_sandbox/webhooks/a/b"),
            None
        );
        assert_eq!(sink_name("https://sms.example.com/hook"), None);
        assert_eq!(sink_name("not a url"), None);
    }
}
