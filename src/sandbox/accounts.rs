//! The accounts the sandbox knows: the credentials of the touchpoints in a loaded tree, with their
//! secret references resolved. A touchpoint whose secret cannot be read, or that the sandbox does
//! not serve, is left out with a [`Notice`] saying why; the others are served.

use std::fmt;

use crate::channel::custom::signing_key;
use crate::load::{Desired, Loaded};
use crate::model::{KindSpec, MessageTemplate, Secret, SecretPolicy, SecretRef, WechatAuth};

/// The path prefix under which custom touchpoints' webhooks are received.
pub const SINK_PREFIX: &str = "/_sandbox/webhooks/";

/// A WeChat Official Account in direct mode.
#[derive(Debug)]
pub struct OaAccount {
    /// The touchpoint id.
    pub id: String,
    /// Its app id.
    pub app_id: String,
    /// Its AppSecret.
    pub secret: Secret,
    /// Its templates: a send must name one of their `template_id`s.
    pub templates: Vec<MessageTemplate>,
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
    /// WeChat Official Accounts.
    pub oa: Vec<OaAccount>,
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
        matches!(self, Notice::Unreadable { .. })
    }
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::Unreadable { id, field, why } => write!(
                f,
                "warning: {id}: cannot read its secret `{field}` ({why}); it is left out of the sandbox: fix the reference (or pass --secrets-dir / --secret-env-allow) and start the sandbox again"
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
        for loaded in &desired.touchpoints {
            if let Err(n) = accounts.add(loaded, policy) {
                notices.push(n);
            }
        }
        (accounts, notices)
    }

    /// How many accounts in all.
    pub fn len(&self) -> usize {
        self.oa.len() + self.wecom.len() + self.getui.len() + self.sinks.len()
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
            KindSpec::WechatOfficialAccount(s) => match &s.auth {
                WechatAuth::Direct { app_secret } => {
                    let secret = read("auth.app_secret", app_secret)?;
                    self.oa.push(OaAccount {
                        id,
                        app_id: s.app_id.clone(),
                        secret,
                        templates: s.templates.clone(),
                    });
                }
                WechatAuth::ThirdParty { .. } => {
                    return Err(Notice::NotServed {
                        id,
                        why: "it is authorised through a third-party platform, which the sandbox does not serve yet (direct mode only)".into(),
                    });
                }
            },
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
            KindSpec::WechatOpenPlatform(_) => {
                return Err(Notice::NotServed {
                    id,
                    why: "the sandbox does not play the open platform yet".into(),
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
        for a in &self.oa {
            out.push(format!(
                "serving {} (wechat_official_account, app id {}, {} template(s))",
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
