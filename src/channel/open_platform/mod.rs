//! The WeChat open platform's (开放平台 third-party platform) protocol, as CHANNELS.md §2 describes
//! it: what a platform receives and sends on behalf of the Official Accounts that authorised it.
//!
//! | file | owns |
//! |---|---|
//! | [`crypt`] | the message encryption of pushes (WXBizMsgCrypt): signature, AES-256-CBC, envelope |
//! | [`event`] | the decrypted pushes: verify tickets and authorisation events, read and written |
//! | [`client`] | the component API: component token from the ticket, pre-auth codes and authorisation page URLs, `api_query_auth`, authorizer info and tokens; the live platforms ([`Platforms`]); writing a refresh token |
//!
//! Both read XML through one small reader of flat `<xml><Name>value</Name>...</xml>` documents
//! (`xml`), which is what WeChat sends.

pub mod client;
pub mod crypt;
pub mod event;
#[cfg(test)]
pub(crate) mod stub;
mod xml;

pub use client::{Platform, PlatformError, Platforms, TicketStore};
