//! The open platform's message crypto against wechatpy's (`wechatpy.crypto.WeChatCrypto`), both
//! ways: what `touchctl::channel::open_platform::crypt` seals, wechatpy opens, and what wechatpy
//! seals, touchctl opens and reads as the event it was.

use serde_json::Value;
use touchctl::channel::open_platform::crypt::MsgCrypt;
use touchctl::channel::open_platform::event::{self, Event};

use crate::support::conformance;

const TOKEN: &str = "Tk9wPlatformToken";
/// Letters and digits as the console makes them; the last one carries bits beyond the 32 bytes.
const KEY: &str = "Q2f8ZkLm3Np7Rt1Vx5Bz9Cd4Gh6Jk0Ms2Pw8Ty3Ua7E";
const PLATFORM: &str = "wx5c0ffee5c0ffee01";
const TIMESTAMP: &str = "1767225600";
const NONCE: &str = "407315626";

#[test]
fn wechatpy_and_touchctl_open_each_others_sealed_pushes() {
    let crypt = MsgCrypt::new(TOKEN, KEY, PLATFORM).unwrap();
    // A ticket whose text needs the CDATA split, and non-ASCII text, so both sides see the same bytes.
    let push = event::render(
        &Event::VerifyTicket {
            ticket: "ticket@@@中文]]>end".to_string(),
            create_time: 1767225600,
        },
        PLATFORM,
    );
    let (body, signature) = crypt.seal(&push, TIMESTAMP, NONCE).unwrap();

    let Some(run) = conformance(
        "wechatpy_and_touchctl_open_each_others_sealed_pushes",
        "wechat_crypt_check.py",
        &[
            TOKEN, KEY, PLATFORM, TIMESTAMP, NONCE, &signature, &body, &push,
        ],
    ) else {
        return;
    };
    run.code(0)
        .stdout_has("ok wechatpy opens what touchctl sealed")
        .stdout_has("all checks passed");

    let sealed = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("sealed: "))
        .unwrap_or_else(|| panic!("no sealed line:\n{}", run.stdout));
    let sealed: Value = serde_json::from_str(sealed).unwrap();
    let (theirs, their_signature) = (
        sealed["body"].as_str().unwrap(),
        sealed["msg_signature"].as_str().unwrap(),
    );
    assert_ne!(theirs, body, "wechatpy sealed it itself");
    let opened = crypt
        .open(theirs.as_bytes(), their_signature, TIMESTAMP, NONCE)
        .unwrap();
    assert_eq!(opened, push);
    assert_eq!(
        event::parse(&opened, PLATFORM).unwrap(),
        Event::VerifyTicket {
            ticket: "ticket@@@中文]]>end".to_string(),
            create_time: 1767225600,
        }
    );
    // The same body under another timestamp is refused: the signature covers it.
    assert!(
        crypt
            .open(theirs.as_bytes(), their_signature, "1767225601", NONCE)
            .is_err()
    );
}
