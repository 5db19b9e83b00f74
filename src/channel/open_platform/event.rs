//! The pushes the open platform sends to the 授权事件接收 URL, once [`super::crypt`] has decrypted
//! them (CHANNELS.md §2.1): `<xml><AppId>component app id</AppId><CreateTime>..</CreateTime>
//! <InfoType>..</InfoType>...</xml>`, `InfoType` being
//!
//! | `InfoType` | fields | [`Event`] |
//! |---|---|---|
//! | `component_verify_ticket` | `ComponentVerifyTicket` | [`Event::VerifyTicket`] |
//! | `authorized` | `AuthorizerAppid`, `AuthorizationCode`, `AuthorizationCodeExpiredTime`, `PreAuthCode` | [`Event::Authorized`] |
//! | `updateauthorized` | the same | [`Event::UpdateAuthorized`] |
//! | `unauthorized` | `AuthorizerAppid` | [`Event::Unauthorized`] |
//! | anything else | | [`Event::Other`] |
//!
//! Values may be CDATA or text. [`parse`] refuses a payload for another platform's app id and
//! more than [`MAX_BODY`] of input; [`render`] writes the form WeChat sends, every string in
//! CDATA. The ticket, authorisation code and pre-auth code are secrets: `Debug` does not print them.

use super::crypt::{CryptError, MAX_BODY, quote};
use super::xml;

/// One decrypted push. Times are Unix seconds.
#[derive(Clone, PartialEq, Eq)]
pub enum Event {
    /// The platform's latest `component_verify_ticket` (pushed every 10 minutes, valid 12 hours).
    VerifyTicket { ticket: String, create_time: i64 },
    /// An account authorised the platform.
    Authorized {
        authorizer_app_id: String,
        auth_code: String,
        auth_code_expires_at: i64,
        pre_auth_code: Option<String>,
        create_time: i64,
    },
    /// An account changed what it granted the platform.
    UpdateAuthorized {
        authorizer_app_id: String,
        auth_code: String,
        auth_code_expires_at: i64,
        pre_auth_code: Option<String>,
        create_time: i64,
    },
    /// An account revoked the platform's authorisation.
    Unauthorized {
        authorizer_app_id: String,
        create_time: i64,
    },
    /// A push of a kind touchctl does not act on.
    Other { info_type: String },
}

const REDACTED: &str = "<redacted>";

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::VerifyTicket { create_time, .. } => f
                .debug_struct("VerifyTicket")
                .field("ticket", &REDACTED)
                .field("create_time", create_time)
                .finish(),
            Event::Authorized {
                authorizer_app_id,
                auth_code_expires_at,
                pre_auth_code,
                create_time,
                ..
            }
            | Event::UpdateAuthorized {
                authorizer_app_id,
                auth_code_expires_at,
                pre_auth_code,
                create_time,
                ..
            } => {
                let name = if matches!(self, Event::Authorized { .. }) {
                    "Authorized"
                } else {
                    "UpdateAuthorized"
                };
                f.debug_struct(name)
                    .field("authorizer_app_id", authorizer_app_id)
                    .field("auth_code", &REDACTED)
                    .field("auth_code_expires_at", auth_code_expires_at)
                    .field("pre_auth_code", &pre_auth_code.as_ref().map(|_| REDACTED))
                    .field("create_time", create_time)
                    .finish()
            }
            Event::Unauthorized {
                authorizer_app_id,
                create_time,
            } => f
                .debug_struct("Unauthorized")
                .field("authorizer_app_id", authorizer_app_id)
                .field("create_time", create_time)
                .finish(),
            Event::Other { info_type } => f
                .debug_struct("Other")
                .field("info_type", info_type)
                .finish(),
        }
    }
}

impl Event {
    /// The push's `InfoType`.
    pub fn info_type(&self) -> &str {
        match self {
            Event::VerifyTicket { .. } => VERIFY_TICKET,
            Event::Authorized { .. } => AUTHORIZED,
            Event::UpdateAuthorized { .. } => UPDATE_AUTHORIZED,
            Event::Unauthorized { .. } => UNAUTHORIZED,
            Event::Other { info_type } => info_type,
        }
    }

    /// When WeChat sent the push (`CreateTime`, Unix seconds); not kept for [`Event::Other`].
    pub fn create_time(&self) -> Option<i64> {
        match self {
            Event::VerifyTicket { create_time, .. }
            | Event::Authorized { create_time, .. }
            | Event::UpdateAuthorized { create_time, .. }
            | Event::Unauthorized { create_time, .. } => Some(*create_time),
            Event::Other { .. } => None,
        }
    }
}

const VERIFY_TICKET: &str = "component_verify_ticket";
const AUTHORIZED: &str = "authorized";
const UPDATE_AUTHORIZED: &str = "updateauthorized";
const UNAUTHORIZED: &str = "unauthorized";

fn number(fields: &xml::Fields, name: &'static str) -> Result<i64, CryptError> {
    fields
        .require(name)?
        .parse()
        .map_err(|_| CryptError::BadNumber(name))
}

/// The event a decrypted push holds; its `AppId` must be `component_app_id`.
pub fn parse(xml: &str, component_app_id: &str) -> Result<Event, CryptError> {
    if xml.len() > MAX_BODY {
        return Err(CryptError::TooLarge);
    }
    let fields = xml::read(xml)?;
    let app_id = fields.require("AppId")?;
    if app_id != component_app_id {
        return Err(CryptError::WrongPlatform {
            found: quote(app_id),
        });
    }
    let info_type = fields.require("InfoType")?;
    let text = |name| fields.require(name).map(str::to_string);
    Ok(match info_type {
        VERIFY_TICKET => Event::VerifyTicket {
            ticket: text("ComponentVerifyTicket")?,
            create_time: number(&fields, "CreateTime")?,
        },
        AUTHORIZED | UPDATE_AUTHORIZED => {
            let authorizer_app_id = text("AuthorizerAppid")?;
            let auth_code = text("AuthorizationCode")?;
            let auth_code_expires_at = number(&fields, "AuthorizationCodeExpiredTime")?;
            let pre_auth_code = fields
                .get("PreAuthCode")
                .filter(|c| !c.is_empty())
                .map(str::to_string);
            let create_time = number(&fields, "CreateTime")?;
            if info_type == AUTHORIZED {
                Event::Authorized {
                    authorizer_app_id,
                    auth_code,
                    auth_code_expires_at,
                    pre_auth_code,
                    create_time,
                }
            } else {
                Event::UpdateAuthorized {
                    authorizer_app_id,
                    auth_code,
                    auth_code_expires_at,
                    pre_auth_code,
                    create_time,
                }
            }
        }
        UNAUTHORIZED => Event::Unauthorized {
            authorizer_app_id: text("AuthorizerAppid")?,
            create_time: number(&fields, "CreateTime")?,
        },
        other => Event::Other {
            info_type: other.to_string(),
        },
    })
}

/// `<name>value</name>` appended to `out`.
fn push_number(out: &mut String, name: &str, value: i64) {
    out.push_str(&format!("<{name}>{value}</{name}>"));
}

/// The XML WeChat sends for `event` (before encryption), as the platform `component_app_id`.
pub fn render(event: &Event, component_app_id: &str) -> String {
    let mut out = "<xml>".to_string();
    xml::push_cdata(&mut out, "AppId", component_app_id);
    if let Some(create_time) = event.create_time() {
        push_number(&mut out, "CreateTime", create_time);
    }
    xml::push_cdata(&mut out, "InfoType", event.info_type());
    match event {
        Event::VerifyTicket { ticket, .. } => {
            xml::push_cdata(&mut out, "ComponentVerifyTicket", ticket);
        }
        Event::Authorized {
            authorizer_app_id,
            auth_code,
            auth_code_expires_at,
            pre_auth_code,
            ..
        }
        | Event::UpdateAuthorized {
            authorizer_app_id,
            auth_code,
            auth_code_expires_at,
            pre_auth_code,
            ..
        } => {
            xml::push_cdata(&mut out, "AuthorizerAppid", authorizer_app_id);
            xml::push_cdata(&mut out, "AuthorizationCode", auth_code);
            push_number(
                &mut out,
                "AuthorizationCodeExpiredTime",
                *auth_code_expires_at,
            );
            if let Some(code) = pre_auth_code {
                xml::push_cdata(&mut out, "PreAuthCode", code);
            }
        }
        Event::Unauthorized {
            authorizer_app_id, ..
        } => xml::push_cdata(&mut out, "AuthorizerAppid", authorizer_app_id),
        Event::Other { .. } => {}
    }
    out.push_str("</xml>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLATFORM: &str = "wx0a1b2c3d4e5f6a7b";

    fn authorized(update: bool, pre_auth_code: Option<&str>) -> Event {
        let authorizer_app_id = "wxoa0000000000001".to_string();
        let auth_code = "queryauthcode@@@abc".to_string();
        let pre_auth_code = pre_auth_code.map(str::to_string);
        if update {
            Event::UpdateAuthorized {
                authorizer_app_id,
                auth_code,
                auth_code_expires_at: 1413196205,
                pre_auth_code,
                create_time: 1413192760,
            }
        } else {
            Event::Authorized {
                authorizer_app_id,
                auth_code,
                auth_code_expires_at: 1413196205,
                pre_auth_code,
                create_time: 1413192760,
            }
        }
    }

    #[test]
    fn parses_the_payloads_of_the_docs() {
        // CHANNELS.md 2.1: the ticket push, values as text.
        let ticket = "<xml><AppId>wx0a1b2c3d4e5f6a7b</AppId><CreateTime>1413192605</CreateTime>\n\
            <InfoType>component_verify_ticket</InfoType><ComponentVerifyTicket>ticket@@@lEHj</ComponentVerifyTicket></xml>";
        assert_eq!(
            parse(ticket, PLATFORM).unwrap(),
            Event::VerifyTicket {
                ticket: "ticket@@@lEHj".to_string(),
                create_time: 1413192605
            }
        );
        // The authorisation events, values as CDATA, as wechatpy's tests carry them.
        let authorized_xml = "<xml>\n<AppId><![CDATA[wx0a1b2c3d4e5f6a7b]]></AppId>\n<CreateTime>1413192760</CreateTime>\n\
            <InfoType><![CDATA[authorized]]></InfoType>\n<AuthorizerAppid><![CDATA[wxoa0000000000001]]></AuthorizerAppid>\n\
            <AuthorizationCode><![CDATA[queryauthcode@@@abc]]></AuthorizationCode>\n\
            <AuthorizationCodeExpiredTime>1413196205</AuthorizationCodeExpiredTime>\n\
            <PreAuthCode><![CDATA[preauthcode@@@xyz]]></PreAuthCode>\n</xml>";
        assert_eq!(
            parse(authorized_xml, PLATFORM).unwrap(),
            authorized(false, Some("preauthcode@@@xyz"))
        );
        let update_xml = authorized_xml
            .replace("[authorized]", "[updateauthorized]")
            .replace(
                "<PreAuthCode><![CDATA[preauthcode@@@xyz]]></PreAuthCode>\n",
                "",
            );
        assert_eq!(
            parse(&update_xml, PLATFORM).unwrap(),
            authorized(true, None)
        );
        let unauthorized = "<xml><AppId><![CDATA[wx0a1b2c3d4e5f6a7b]]></AppId><CreateTime>1413192760</CreateTime>\
            <InfoType><![CDATA[unauthorized]]></InfoType><AuthorizerAppid><![CDATA[wxoa0000000000001]]></AuthorizerAppid></xml>";
        assert_eq!(
            parse(unauthorized, PLATFORM).unwrap(),
            Event::Unauthorized {
                authorizer_app_id: "wxoa0000000000001".to_string(),
                create_time: 1413192760
            }
        );
        let other = "<xml><AppId>wx0a1b2c3d4e5f6a7b</AppId><CreateTime>1</CreateTime><InfoType>notify_third_fasteregister</InfoType></xml>";
        assert_eq!(
            parse(other, PLATFORM).unwrap(),
            Event::Other {
                info_type: "notify_third_fasteregister".to_string()
            }
        );
    }

    #[test]
    fn renders_what_parses_back() {
        for event in [
            Event::VerifyTicket {
                ticket: "ticket@@@x]]>y".to_string(),
                create_time: 1700000000,
            },
            authorized(false, Some("pre]]>auth")),
            authorized(false, None),
            authorized(true, Some("preauthcode@@@1")),
            Event::Unauthorized {
                authorizer_app_id: "wxoa<&>]]>".to_string(),
                create_time: -1,
            },
            Event::Other {
                info_type: "x]]]]>>".to_string(),
            },
        ] {
            let xml = render(&event, PLATFORM);
            assert!(xml.starts_with("<xml><AppId><![CDATA[wx0a1b2c3d4e5f6a7b]]></AppId>"));
            assert_eq!(parse(&xml, PLATFORM).unwrap(), event, "{xml}");
        }
    }

    #[test]
    fn renders_cdata_holding_the_terminator_as_two_sections() {
        let xml = render(
            &Event::VerifyTicket {
                ticket: "a]]>b".to_string(),
                create_time: 1,
            },
            PLATFORM,
        );
        assert!(
            xml.contains(
                "<ComponentVerifyTicket><![CDATA[a]]]]><![CDATA[>b]]></ComponentVerifyTicket>"
            ),
            "{xml}"
        );
    }

    #[test]
    fn refuses_another_platforms_payload_and_missing_or_bad_fields() {
        let ticket = render(
            &Event::VerifyTicket {
                ticket: "t".to_string(),
                create_time: 1,
            },
            PLATFORM,
        );
        let err = parse(&ticket, "wxanotherplatform").unwrap_err();
        match &err {
            CryptError::WrongPlatform { found } => assert_eq!(found, PLATFORM),
            other => panic!("{other:?}"),
        }
        let cases: [(&str, &str); 5] = [
            ("<xml><InfoType>unauthorized</InfoType></xml>", "AppId"),
            ("<xml><AppId>wx0a1b2c3d4e5f6a7b</AppId></xml>", "InfoType"),
            (
                "<xml><AppId>wx0a1b2c3d4e5f6a7b</AppId><CreateTime>1</CreateTime><InfoType>component_verify_ticket</InfoType><ComponentVerifyTicket></ComponentVerifyTicket></xml>",
                "ComponentVerifyTicket",
            ),
            (
                "<xml><AppId>wx0a1b2c3d4e5f6a7b</AppId><CreateTime>1</CreateTime><InfoType>authorized</InfoType><AuthorizerAppid>wxoa</AuthorizerAppid><AuthorizationCodeExpiredTime>2</AuthorizationCodeExpiredTime></xml>",
                "AuthorizationCode",
            ),
            (
                "<xml><AppId>wx0a1b2c3d4e5f6a7b</AppId><InfoType>unauthorized</InfoType><AuthorizerAppid>wxoa</AuthorizerAppid></xml>",
                "CreateTime",
            ),
        ];
        for (xml, field) in cases {
            match parse(xml, PLATFORM) {
                Err(CryptError::MissingField(f)) => assert_eq!(f, field, "{xml}"),
                other => panic!("{xml}: {other:?}"),
            }
        }
        let bad_time = "<xml><AppId>wx0a1b2c3d4e5f6a7b</AppId><CreateTime>soon</CreateTime><InfoType>unauthorized</InfoType><AuthorizerAppid>wxoa</AuthorizerAppid></xml>";
        assert!(matches!(
            parse(bad_time, PLATFORM),
            Err(CryptError::BadNumber("CreateTime"))
        ));
        assert!(matches!(
            parse(&"x".repeat(MAX_BODY + 1), PLATFORM),
            Err(CryptError::TooLarge)
        ));
        assert!(matches!(
            parse("<xml><AppId>x", PLATFORM),
            Err(CryptError::BadXml(_))
        ));
    }

    #[test]
    fn debug_prints_no_ticket_or_codes() {
        let events = [
            Event::VerifyTicket {
                ticket: "ticket@@@secret".to_string(),
                create_time: 1,
            },
            authorized(false, Some("preauthcode@@@secret")),
            authorized(true, Some("preauthcode@@@secret")),
        ];
        for event in events {
            let debug = format!("{event:?}");
            assert!(!debug.contains("@@@"), "{debug}");
            assert!(debug.contains(REDACTED), "{debug}");
        }
        let debug = format!("{:?}", authorized(false, None));
        assert!(debug.contains("wxoa0000000000001") && debug.contains("pre_auth_code: None"));
    }
}
