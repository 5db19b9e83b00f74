//! WeChat's message encryption (WXBizMsgCrypt), as CHANNELS.md §2.1 describes it and wechatpy
//! implements it; the open platform encrypts every push to the 授权事件接收 URL this way.
//!
//! - The key is the platform's 43-character EncodingAESKey read as base64 (with the missing `=`):
//!   32 bytes. The console's keys are random letters and digits, so the last character may carry
//!   bits beyond the 32 bytes; they are ignored, as WeChat's own samples and wechatpy do.
//! - A message is sealed as AES-256-CBC with IV = the key's first 16 bytes over
//!   `16 random bytes ‖ u32 big-endian length ‖ message ‖ app id`, padded PKCS#7-style to a
//!   **32-byte** block (one to 32 bytes of the pad length), then base64. The padding is done here;
//!   the cipher ([`cbc`] over [`aes`]) runs over whole blocks.
//! - `msg_signature` is the hex SHA-1 of the four strings `token`, `timestamp`, `nonce` and the
//!   base64 ciphertext, sorted bytewise and concatenated; it is compared in constant time.
//! - The POST body is `<xml><AppId>..</AppId><Encrypt>..</Encrypt></xml>`. Whether WeChat names the
//!   first element `AppId` or `ToUserName` is not confirmed (CHANNELS.md §6 q2): reading takes only
//!   `Encrypt`, so either works, as does the reply envelope wechatpy writes.
//! - Opening checks the signature before decrypting anything, then the padding, the length field
//!   and that the trailing app id is this platform's, and refuses bodies over [`MAX_BODY`].
//!
//! Neither the key, the token nor any ciphertext or plaintext appears in an error or in `Debug`.

use aes::Aes256;
use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use cbc::cipher::consts::U16;
use cbc::cipher::{Array, BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

use super::xml;

/// The largest POST body [`MsgCrypt::open`] reads (and the largest ciphertext
/// [`MsgCrypt::decrypt`] takes): 64 KiB, far more than any push WeChat sends.
pub const MAX_BODY: usize = 64 * 1024;

/// The length of an EncodingAESKey.
const KEY_CHARS: usize = 43;
/// The block the plaintext is padded to (WeChat's, not AES's 16).
const PAD_BLOCK: usize = 32;
/// The random prefix of every plaintext.
const RANDOM_PREFIX: usize = 16;
/// The longest part of a received app id an error quotes.
const QUOTE_MAX: usize = 64;

/// The key, read as base64: the standard alphabet, no padding, extra bits in the last character
/// ignored (see the module docs).
const KEY_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone),
);

/// Why a message could not be sealed or opened. No variant carries the key, the token, a
/// ciphertext or a plaintext.
#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    #[error(
        "the EncodingAESKey is not valid: it must be the 43 letters and digits the open platform's console shows (the base64 of 32 bytes without its trailing `=`); check the platform's `encoding_aes_key`"
    )]
    BadKey,
    #[error("the platform's `{0}` is empty: set it to the value the open platform's console shows")]
    EmptySetting(&'static str),
    #[error(
        "the message signature does not match: check the platform's `token` (it must equal the message token set in the open platform's console)"
    )]
    BadSignature,
    #[error(
        "the `Encrypt` element is not base64: the message was not sealed by WeChat or was altered on the way"
    )]
    BadBase64,
    #[error(
        "the encrypted message is not a whole number of AES blocks: it was cut short or altered on the way"
    )]
    NotWholeBlocks,
    #[error(
        "the decrypted message has invalid padding: check the platform's `encoding_aes_key` (it must equal the EncodingAESKey set in the open platform's console)"
    )]
    BadPadding,
    #[error(
        "the decrypted message's length field does not fit its content: check the platform's `encoding_aes_key`"
    )]
    BadLength,
    #[error(
        "the decrypted message or its app id is not UTF-8 text: check the platform's `encoding_aes_key`"
    )]
    NotUtf8,
    #[error(
        "the message was encrypted for the app id `{}`, not for this platform: check the platform's `component_app_id`",
        crate::term::escape(found)
    )]
    WrongAppId { found: String },
    #[error(
        "the event is for the platform `{}`, not for this one: check the platform's `component_app_id`",
        crate::term::escape(found)
    )]
    WrongPlatform { found: String },
    #[error("the message is not the XML WeChat sends: {}", crate::term::escape(.0))]
    BadXml(String),
    #[error("the message has no `{0}` element (or it is empty): it is not a message WeChat sends")]
    MissingField(&'static str),
    #[error("the `{0}` element is not a whole number: it is not a message WeChat sends")]
    BadNumber(&'static str),
    #[error("the message is larger than 64 KiB, more than WeChat ever sends: refused")]
    TooLarge,
    #[error(
        "could not get random bytes from the operating system ({0}): check that /dev/urandom or getrandom(2) is available"
    )]
    Random(String),
}

/// At most [`QUOTE_MAX`] characters of text received from outside, for an error.
pub(super) fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE_MAX) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

/// One platform's message crypto: its EncodingAESKey, message token and app id.
#[derive(Clone)]
pub struct MsgCrypt {
    key: [u8; 32],
    /// The key's first 16 bytes.
    iv: [u8; 16],
    token: String,
    app_id: String,
}

impl std::fmt::Debug for MsgCrypt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsgCrypt")
            .field("app_id", &self.app_id)
            .field("key", &"<redacted>")
            .field("token", &"<redacted>")
            .finish()
    }
}

type Encryptor = cbc::Encryptor<Aes256>;
type Decryptor = cbc::Decryptor<Aes256>;

impl MsgCrypt {
    /// The crypto of the platform `app_id` with message token `token` and the 43-character
    /// `encoding_aes_key`.
    pub fn new(token: &str, encoding_aes_key: &str, app_id: &str) -> Result<Self, CryptError> {
        if token.is_empty() {
            return Err(CryptError::EmptySetting("token"));
        }
        if app_id.is_empty() {
            return Err(CryptError::EmptySetting("component_app_id"));
        }
        if encoding_aes_key.len() != KEY_CHARS {
            return Err(CryptError::BadKey);
        }
        let mut key = [0u8; 32];
        match KEY_BASE64.decode_slice(encoding_aes_key, &mut key) {
            Ok(32) => {}
            _ => return Err(CryptError::BadKey),
        }
        let mut iv = [0u8; 16];
        iv.copy_from_slice(&key[..16]);
        Ok(MsgCrypt {
            key,
            iv,
            token: token.to_string(),
            app_id: app_id.to_string(),
        })
    }

    /// The platform's app id, which every message it opens must end with.
    pub fn app_id(&self) -> &str {
        &self.app_id
    }

    /// `msg_signature`: the hex SHA-1 of token, timestamp, nonce and ciphertext, sorted and joined.
    pub fn signature(&self, timestamp: &str, nonce: &str, encrypt: &str) -> String {
        let mut parts = [self.token.as_str(), timestamp, nonce, encrypt];
        parts.sort_unstable();
        let mut sha = Sha1::new();
        for part in parts {
            sha.update(part.as_bytes());
        }
        hex::encode(sha.finalize())
    }

    /// AES-256-CBC encryption of `buf` in place; the caller has padded it to whole blocks.
    fn encrypt_blocks(&self, buf: &mut [u8]) {
        let (blocks, rest) = Array::<u8, U16>::slice_as_chunks_mut(buf);
        debug_assert!(rest.is_empty(), "the plaintext is padded to whole blocks");
        Encryptor::new(&self.key.into(), &self.iv.into()).encrypt_blocks(blocks);
    }

    /// AES-256-CBC decryption of `buf` in place, which must be whole blocks.
    fn decrypt_blocks(&self, buf: &mut [u8]) -> Result<(), CryptError> {
        let (blocks, rest) = Array::<u8, U16>::slice_as_chunks_mut(buf);
        if blocks.is_empty() || !rest.is_empty() {
            return Err(CryptError::NotWholeBlocks);
        }
        Decryptor::new(&self.key.into(), &self.iv.into()).decrypt_blocks(blocks);
        Ok(())
    }

    /// `msg` sealed: the base64 ciphertext, with a fresh random prefix.
    pub fn encrypt(&self, msg: &str) -> Result<String, CryptError> {
        let len = u32::try_from(msg.len()).map_err(|_| CryptError::TooLarge)?;
        let mut random = [0u8; RANDOM_PREFIX];
        getrandom::fill(&mut random).map_err(|e| CryptError::Random(e.to_string()))?;
        let body = RANDOM_PREFIX + 4 + msg.len() + self.app_id.len();
        let pad = PAD_BLOCK - body % PAD_BLOCK;
        let mut buf = Vec::with_capacity(body + pad);
        buf.extend_from_slice(&random);
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(msg.as_bytes());
        buf.extend_from_slice(self.app_id.as_bytes());
        // `pad` is 1..=32, so it fits a byte.
        buf.resize(body + pad, pad as u8);
        self.encrypt_blocks(&mut buf);
        Ok(STANDARD.encode(buf))
    }

    /// The message a base64 ciphertext holds, after checking its padding, its length field and
    /// that it was sealed for this platform's app id.
    pub fn decrypt(&self, encrypt: &str) -> Result<String, CryptError> {
        if encrypt.len() > MAX_BODY {
            return Err(CryptError::TooLarge);
        }
        let mut buf = STANDARD
            .decode(encrypt.trim())
            .map_err(|_| CryptError::BadBase64)?;
        self.decrypt_blocks(&mut buf)?;
        let (content, app_id) = unpad_and_split(&buf)?;
        let app_id = std::str::from_utf8(app_id).map_err(|_| CryptError::NotUtf8)?;
        if app_id != self.app_id {
            return Err(CryptError::WrongAppId {
                found: quote(app_id),
            });
        }
        String::from_utf8(content.to_vec()).map_err(|_| CryptError::NotUtf8)
    }

    /// What WeChat POSTs: `<xml><AppId><![CDATA[..]]></AppId><Encrypt><![CDATA[..]]></Encrypt></xml>` and its msg_signature.
    pub fn seal(
        &self,
        msg: &str,
        timestamp: &str,
        nonce: &str,
    ) -> Result<(String, String), CryptError> {
        let encrypt = self.encrypt(msg)?;
        let signature = self.signature(timestamp, nonce, &encrypt);
        let mut body = "<xml>".to_string();
        xml::push_cdata(&mut body, "AppId", &self.app_id);
        xml::push_cdata(&mut body, "Encrypt", &encrypt);
        body.push_str("</xml>");
        Ok((body, signature))
    }

    /// Checks msg_signature (constant-time compare), then decrypts the Encrypt element.
    pub fn open(
        &self,
        body: &[u8],
        msg_signature: &str,
        timestamp: &str,
        nonce: &str,
    ) -> Result<String, CryptError> {
        if body.len() > MAX_BODY {
            return Err(CryptError::TooLarge);
        }
        let body = std::str::from_utf8(body)
            .map_err(|_| CryptError::BadXml("the body is not UTF-8".to_string()))?;
        let fields = xml::read(body)?;
        let encrypt = fields.require("Encrypt")?;
        let expected = self.signature(timestamp, nonce, encrypt);
        let given = msg_signature.trim().to_ascii_lowercase();
        if !bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
            return Err(CryptError::BadSignature);
        }
        self.decrypt(encrypt)
    }
}

/// The message and the app id of a decrypted plaintext: the padding checked and removed, the
/// random prefix skipped, the length field checked against what is there.
fn unpad_and_split(plain: &[u8]) -> Result<(&[u8], &[u8]), CryptError> {
    let pad = usize::from(*plain.last().ok_or(CryptError::BadPadding)?);
    if pad == 0 || pad > PAD_BLOCK || pad > plain.len() {
        return Err(CryptError::BadPadding);
    }
    let (unpadded, padding) = plain.split_at(plain.len() - pad);
    if padding.iter().any(|&b| usize::from(b) != pad) {
        return Err(CryptError::BadPadding);
    }
    let rest = unpadded.get(RANDOM_PREFIX..).ok_or(CryptError::BadLength)?;
    let (len, rest) = rest.split_first_chunk::<4>().ok_or(CryptError::BadLength)?;
    let len = usize::try_from(u32::from_be_bytes(*len)).map_err(|_| CryptError::BadLength)?;
    if len > rest.len() {
        return Err(CryptError::BadLength);
    }
    Ok(rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Produced once with wechatpy 1.8.18:
    /// `WeChatCrypto(TOKEN, KEY, APP).encrypt_message(TICKET_PUSH, NONCE, TIMESTAMP)`.
    /// The key is the example of WeChat's docs; its last character carries extra bits.
    const TOKEN: &str = "platform-msg-token";
    const KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
    const APP: &str = "wx0a1b2c3d4e5f6a7b";
    const NONCE: &str = "1320562132";
    const TIMESTAMP: &str = "1413192605";
    const TICKET_PUSH: &str = "<xml><AppId><![CDATA[wx0a1b2c3d4e5f6a7b]]></AppId><CreateTime>1413192605</CreateTime><InfoType><![CDATA[component_verify_ticket]]></InfoType><ComponentVerifyTicket><![CDATA[ticket@@@lEHjsBEi_TPDey0IZxw4Zbb7JRYLOtEf9ksvDpSwzkwog3R6xEpdaK0yIee7JOyOXM0V7cp0dpM58GKmb8FSKA]]></ComponentVerifyTicket></xml>";
    const WECHATPY_BODY: &str = "<xml>
<Encrypt><![CDATA[egDhC0KqSvrKUC+CLFWlKlIPwAbPIx/rxGdoeKMI5WOMUv6NuvLK/xq3ATZbki3Ba/osKtY+q4TeUywz96C0oQ0Sw+M5Jow6u6mR3/WnE2/rsNQbzcwFzevPQ3+A+rz90k3DCLmDZxkEMH0IVh9f4UvUEW1FoCLzBoHGO2MtzPPNNuDdOwRPVfdgAVMKlGPfu5HTjxuDkKfdGvj0zWxVQdjbtfEQCOicHVVMuSjOV4XuVImxLfg3965M/FgQBaegMuWX1autxns2L6LvaUvofVHTX61rpxNwp/mw6aQb/YkwISjwNfz6T7vub9ybRcoOMgJtLewIepdLThzaUrkMs+rhQCaoodsZp4Pj2xZ61HSoc6dfbQomzmVymneaEiUYFH+AWEy4OyZ3gbOb7lNMEsspwP+8/E6csi5dFGUANVqdzCLrdUh/EiDzePzVDO4UZlqarW6dvaBqh8PGKSkxUw==]]></Encrypt>
<MsgSignature><![CDATA[7311723aacb050449288bc2f24d6ce7b7c3aaaaa]]></MsgSignature>
<TimeStamp>1413192605</TimeStamp>
<Nonce><![CDATA[1320562132]]></Nonce>
</xml>";
    const WECHATPY_SIGNATURE: &str = "7311723aacb050449288bc2f24d6ce7b7c3aaaaa";

    fn crypt() -> MsgCrypt {
        MsgCrypt::new(TOKEN, KEY, APP).unwrap()
    }

    /// A ciphertext of `plain` exactly as given (no prefix, length or padding added).
    fn raw_ciphertext(c: &MsgCrypt, mut plain: Vec<u8>) -> String {
        c.encrypt_blocks(&mut plain);
        STANDARD.encode(plain)
    }

    /// `16 zero bytes ‖ len ‖ msg ‖ app` padded with `pad` bytes of value `value`.
    fn plaintext(len: u32, msg: &[u8], app: &[u8], pad: usize, value: u8) -> Vec<u8> {
        let mut p = vec![0u8; RANDOM_PREFIX];
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(msg);
        p.extend_from_slice(app);
        p.extend(std::iter::repeat_n(value, pad));
        p
    }

    #[test]
    fn opens_what_wechatpy_sealed() {
        let c = crypt();
        assert_eq!(
            c.open(
                WECHATPY_BODY.as_bytes(),
                WECHATPY_SIGNATURE,
                TIMESTAMP,
                NONCE
            )
            .unwrap(),
            TICKET_PUSH
        );
        // The signature as WeChat computes it, over the ciphertext in the body.
        let encrypt = xml::read(WECHATPY_BODY).unwrap();
        let encrypt = encrypt.get("Encrypt").unwrap();
        assert_eq!(c.signature(TIMESTAMP, NONCE, encrypt), WECHATPY_SIGNATURE);
        // An uppercase signature is the same signature.
        c.open(
            WECHATPY_BODY.as_bytes(),
            &WECHATPY_SIGNATURE.to_uppercase(),
            TIMESTAMP,
            NONCE,
        )
        .unwrap();
    }

    #[test]
    fn round_trips_with_a_fresh_prefix_each_time() {
        let c = crypt();
        for msg in ["", "x", "<xml>中文 ]]> &amp;</xml>", &"a".repeat(1000)] {
            let (body, sig) = c.seal(msg, TIMESTAMP, NONCE).unwrap();
            assert!(
                body.starts_with("<xml><AppId><![CDATA[wx0a1b2c3d4e5f6a7b]]></AppId><Encrypt>")
            );
            assert_eq!(
                c.open(body.as_bytes(), &sig, TIMESTAMP, NONCE).unwrap(),
                msg
            );
            let sealed = STANDARD.decode(c.encrypt(msg).unwrap()).unwrap();
            assert_eq!(sealed.len() % PAD_BLOCK, 0, "padded to 32-byte blocks");
        }
        assert_ne!(c.encrypt("same").unwrap(), c.encrypt("same").unwrap());
    }

    #[test]
    fn pads_a_full_block_when_the_plaintext_fills_one() {
        let c = crypt();
        // 16 + 4 + msg + 18 (app id) = 64 when msg is 26 bytes: a whole extra block of padding.
        let msg = "m".repeat(26);
        let sealed = STANDARD.decode(c.encrypt(&msg).unwrap()).unwrap();
        assert_eq!(sealed.len(), 96);
        assert_eq!(c.decrypt(&STANDARD.encode(&sealed)).unwrap(), msg);
    }

    #[test]
    fn opens_a_to_user_name_envelope() {
        let c = crypt();
        let encrypt = c.encrypt(TICKET_PUSH).unwrap();
        let body = format!(
            "<xml><ToUserName><![CDATA[{APP}]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
        );
        let sig = c.signature(TIMESTAMP, NONCE, &encrypt);
        assert_eq!(
            c.open(body.as_bytes(), &sig, TIMESTAMP, NONCE).unwrap(),
            TICKET_PUSH
        );
    }

    #[test]
    fn refuses_a_wrong_signature_before_decrypting() {
        let c = crypt();
        let (body, sig) = c.seal("hello", TIMESTAMP, NONCE).unwrap();
        for (sig, ts, nonce) in [
            ("0".repeat(40).as_str(), TIMESTAMP, NONCE),
            ("", TIMESTAMP, NONCE),
            (&sig[..39], TIMESTAMP, NONCE),
            (sig.as_str(), "1413192606", NONCE),
            (sig.as_str(), TIMESTAMP, "other"),
        ] {
            let err = c.open(body.as_bytes(), sig, ts, nonce).unwrap_err();
            assert!(matches!(err, CryptError::BadSignature), "{err:?}");
        }
        let other_token = MsgCrypt::new("another-token", KEY, APP).unwrap();
        let err = other_token
            .open(body.as_bytes(), &sig, TIMESTAMP, NONCE)
            .unwrap_err();
        assert!(matches!(err, CryptError::BadSignature));
        assert!(err.to_string().contains("check the platform's `token`"));
        // A body that is not a sealed message fails on the signature too, not on its content.
        let forged = "<xml><Encrypt><![CDATA[!!!not base64]]></Encrypt></xml>";
        assert!(matches!(
            c.open(forged.as_bytes(), &sig, TIMESTAMP, NONCE),
            Err(CryptError::BadSignature)
        ));
    }

    #[test]
    fn refuses_a_message_sealed_for_another_app_id() {
        let theirs = MsgCrypt::new(TOKEN, KEY, "wxsomeoneelse0000").unwrap();
        let (body, sig) = theirs.seal("hello", TIMESTAMP, NONCE).unwrap();
        let err = crypt()
            .open(body.as_bytes(), &sig, TIMESTAMP, NONCE)
            .unwrap_err();
        match &err {
            CryptError::WrongAppId { found } => assert_eq!(found, "wxsomeoneelse0000"),
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("`component_app_id`"));
        // A hostile app id is quoted short and escaped.
        let long = format!("\u{1b}]0;x\u{7}{}", "y".repeat(500));
        let theirs = MsgCrypt::new(TOKEN, KEY, &long).unwrap();
        let err = crypt().decrypt(&theirs.encrypt("m").unwrap()).unwrap_err();
        let text = err.to_string();
        assert!(!text.contains('\u{1b}') && text.len() < 400, "{text}");
    }

    #[test]
    fn refuses_keys_that_are_not_43_base64_characters() {
        for key in [
            "",
            "short",
            &KEY[..42],
            &format!("{KEY}H"),
            &format!("{KEY}="),
            "abcdefghijklmnopqrstuvwxyz0123456789ABCDEF!",
            "abcdefghijklmnopqrstuvwxyz0123456789ABCDEF中",
        ] {
            let err = MsgCrypt::new(TOKEN, key, APP).unwrap_err();
            assert!(matches!(err, CryptError::BadKey), "{key:?}: {err:?}");
        }
        assert!(matches!(
            MsgCrypt::new("", KEY, APP),
            Err(CryptError::EmptySetting("token"))
        ));
        assert!(matches!(
            MsgCrypt::new(TOKEN, KEY, ""),
            Err(CryptError::EmptySetting("component_app_id"))
        ));
    }

    #[test]
    fn refuses_bad_padding() {
        let c = crypt();
        let app = APP.as_bytes();
        // 16 + 4 + 2 + 18 = 40 bytes: 24 bytes of padding make one 64-byte plaintext.
        for (pad, value) in [(24usize, 0u8), (24, 33), (24, 23)] {
            let mut plain = plaintext(2, b"hi", app, pad, value);
            if value == 23 {
                // The right length in the last byte but not in the others.
                *plain.last_mut().unwrap() = 24;
            }
            let err = c.decrypt(&raw_ciphertext(&c, plain)).unwrap_err();
            assert!(matches!(err, CryptError::BadPadding), "{value}: {err:?}");
        }
        // The same message well padded opens.
        let good = plaintext(2, b"hi", app, 24, 24);
        assert_eq!(c.decrypt(&raw_ciphertext(&c, good)).unwrap(), "hi");
        // Another key's ciphertext fails before any content is trusted.
        let other =
            MsgCrypt::new(TOKEN, "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefg", APP).unwrap();
        assert!(c.decrypt(&other.encrypt("hello").unwrap()).is_err());
    }

    #[test]
    fn refuses_a_length_field_beyond_the_content() {
        let c = crypt();
        let app = APP.as_bytes();
        // Says 1000 bytes where 2 are.
        let long = plaintext(1000, b"hi", app, 24, 24);
        assert!(matches!(
            c.decrypt(&raw_ciphertext(&c, long)),
            Err(CryptError::BadLength)
        ));
        // No room for the length field: 16 bytes of prefix, then all padding.
        let mut short = vec![0u8; RANDOM_PREFIX + 2];
        short.extend(std::iter::repeat_n(14u8, 14));
        assert!(matches!(
            c.decrypt(&raw_ciphertext(&c, short)),
            Err(CryptError::BadLength)
        ));
        // A ciphertext cut short is not whole blocks; junk is not base64.
        let sealed = c.encrypt("hello").unwrap();
        let bytes = STANDARD.decode(&sealed).unwrap();
        let cut = STANDARD.encode(&bytes[..bytes.len() - 5]);
        assert!(matches!(c.decrypt(&cut), Err(CryptError::NotWholeBlocks)));
        assert!(matches!(c.decrypt(""), Err(CryptError::NotWholeBlocks)));
        assert!(matches!(c.decrypt("%%%"), Err(CryptError::BadBase64)));
    }

    #[test]
    fn refuses_bodies_over_64_kib() {
        let c = crypt();
        let big = format!("<xml><Encrypt>{}</Encrypt></xml>", "A".repeat(MAX_BODY));
        assert!(matches!(
            c.open(big.as_bytes(), "", TIMESTAMP, NONCE),
            Err(CryptError::TooLarge)
        ));
        assert!(matches!(
            c.decrypt(&"A".repeat(MAX_BODY + 4)),
            Err(CryptError::TooLarge)
        ));
        // Just under the limit is read (and then fails on its signature, as it is not sealed).
        let fits = format!(
            "<xml><Encrypt>{}</Encrypt></xml>",
            "A".repeat(MAX_BODY - 64)
        );
        assert!(matches!(
            c.open(fits.as_bytes(), "", TIMESTAMP, NONCE),
            Err(CryptError::BadSignature)
        ));
    }

    #[test]
    fn refuses_bodies_without_an_encrypt_element() {
        let c = crypt();
        for body in [
            &b"<xml><AppId>wx</AppId></xml>"[..],
            b"<xml><Encrypt></Encrypt></xml>",
        ] {
            assert!(matches!(
                c.open(body, "", TIMESTAMP, NONCE),
                Err(CryptError::MissingField("Encrypt"))
            ));
        }
        assert!(matches!(
            c.open(b"\xff\xfe", "", TIMESTAMP, NONCE),
            Err(CryptError::BadXml(_))
        ));
        assert!(matches!(
            c.open(b"not xml", "", TIMESTAMP, NONCE),
            Err(CryptError::BadXml(_))
        ));
    }

    #[test]
    fn debug_and_errors_print_no_key_token_or_ciphertext() {
        let c = crypt();
        let debug = format!("{c:?}");
        assert!(debug.contains(APP), "{debug}");
        assert!(!debug.contains(TOKEN) && !debug.contains(KEY), "{debug}");
        assert!(!debug.contains("97, 98"), "no key bytes: {debug}");
        let sealed = c.encrypt("secret payload").unwrap();
        for err in [
            c.decrypt(&sealed[4..]).unwrap_err(),
            MsgCrypt::new(TOKEN, "bad", APP).unwrap_err(),
            c.open(b"<xml><Encrypt>x</Encrypt></xml>", "", "", "")
                .unwrap_err(),
        ] {
            let text = format!("{err} {err:?}");
            for secret in [TOKEN, KEY, &sealed[4..], "secret payload"] {
                assert!(!text.contains(secret), "{text}");
            }
        }
    }
}
