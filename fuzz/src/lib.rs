//! The checks the fuzz targets run on each input (`fuzz_targets/` holds one thin file per target).
//!
//! Beyond "no panic", each target checks what the rest of touchctl relies on:
//! - a touchpoint file that loads gives a canonical spec that reads back the same and passes the
//!   check a saved plan's specs get before apply; a file that does not load gives diagnostics
//!   inside the file;
//! - a trigger's users are each accepted or rejected (with a reason), their recipients and the
//!   request body are JSON, and their stored form reads back as the same users;
//! - a stored batch that reads gives users whose stored form reads back the same.
//!
//! "JSON" is the grammar (RFC 8259): attribute values are forwarded as the trigger wrote them, so
//! a number beyond what a 64-bit float holds (`1e999`) is sent as written, as valid JSON that
//! some parsers refuse (serde_json's `Value` among them). The checks read JSON without
//! converting numbers (`IgnoredAny`, and a recipient type that reads only `user_id`) for that
//! reason.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde::Deserialize;
use serde::de::IgnoredAny;
use touchctl::channel::custom::check_template_params;
use touchctl::channel::custom::{self, Envelope};
use touchctl::dispatch::recipient::{Mapping, recipients};
use touchctl::dispatch::stored;
use touchctl::dispatch::trigger::{RawTrigger, UserRef, screen};
use touchctl::load::{self, LoadError};
use touchctl::model::{CustomSpec, KindSpec, SpecJson, Touchpoint};

/// Loads one file's bytes as a tree of that one file, and checks what comes out.
pub fn check_toml(data: &[u8]) {
    // Nothing is read beside the file: secret references resolve against a folder that is not
    // there.
    let dir = PathBuf::from("touchctl-fuzz-no-such-folder");
    let source = load::source_from_bytes("fuzz.toml".into(), dir, data.to_vec());
    match load::load_sources(vec![source]) {
        Ok(desired) => {
            for loaded in &desired.touchpoints {
                let value = loaded.spec.value();
                let again = Touchpoint::from_json(value.clone())
                    .unwrap_or_else(|e| panic!("the canonical spec does not read back: {e}"));
                assert!(
                    SpecJson::of(&again) == loaded.spec,
                    "the canonical spec changed when read back"
                );
                if let Err(e) = load::check_spec(&value) {
                    panic!("a saved plan of a valid file would be refused: {e}");
                }
            }
        }
        Err(LoadError::Invalid(diagnostics)) => {
            assert!(!diagnostics.is_empty(), "refused without a diagnostic");
            let text = String::from_utf8_lossy(data);
            let lines = text.split('\n').count();
            for d in &diagnostics {
                assert!(d.line >= 1 && d.column >= 1, "{d}");
                assert!(d.line <= lines, "{d}: past the file's {lines} line(s)");
                assert!(!d.message.is_empty(), "{d}");
                let _ = d.to_string();
            }
        }
        Err(e) => panic!("a file given as text failed otherwise: {e}"),
    }
}

/// A custom touchpoint with a required, an optional nested and a plain dynamic param, and two
/// template params: the intake's checks have something to check against.
fn spec() -> &'static CustomSpec {
    static SPEC: OnceLock<CustomSpec> = OnceLock::new();
    SPEC.get_or_init(|| {
        let text = r#"
id = "sms"
name = "SMS"
kind = "custom"
category = "notification"
url = "https://sms.example.com/hook"
auth_token = { env = "SMS_TOKEN" }
batch_size = 3

[dynamic_params]
phone = "user.phone"
member_id = "user.member_id"
city = { from = "user.address.city", optional = true }

[[template_params]]
name = "text"
type = "string"
required = true
max_length = 70

[[template_params]]
name = "points"
type = "integer"
"#;
        let source =
            load::source_from_bytes("sms.toml".into(), PathBuf::from("."), text.into()).unwrap();
        let desired = load::load_sources(vec![Ok(source)]).expect("the fixed touchpoint loads");
        match &desired.touchpoints[0].touchpoint.spec {
            KindSpec::Custom(spec) => spec.clone(),
            _ => unreachable!("the fixed touchpoint is custom"),
        }
    })
}

fn mapping() -> &'static Mapping {
    static MAPPING: OnceLock<Mapping> = OnceLock::new();
    MAPPING.get_or_init(|| Mapping::new(&spec().dynamic_params))
}

/// Takes a trigger through what the intake and the sender do with it.
pub fn check_trigger(trigger: &RawTrigger<'_>) {
    let spec = spec();
    if let Err(problems) =
        check_template_params(&spec.template_params, &trigger.head.template_params)
    {
        assert!(!problems.is_empty(), "refused without a problem named");
    }
    let (accepted, rejected) = screen(&trigger.users, mapping());
    assert_eq!(
        accepted.len() + rejected.len(),
        trigger.users.len(),
        "every user is accepted or rejected"
    );
    assert!(rejected.iter().all(|r| !r.reason.is_empty()));
    let recipients = recipients(&accepted, mapping());
    let listed = json_list(&recipients);
    assert_eq!(listed.len(), accepted.len());
    for (recipient, user) in listed.iter().zip(&accepted) {
        assert_eq!(recipient.user_id, user.id.as_ref());
    }
    let template = serde_json::to_string(&trigger.head.template_params).unwrap();
    let env = Envelope {
        touchpoint: &trigger.head.touchpoint,
        campaign: &trigger.head.campaign,
        dispatch_id: "dsp_fuzz",
        index: 0,
        count: 1,
        template: &template,
    };
    let body = custom::body_with(&env, &recipients);
    if let Err(e) = serde_json::from_slice::<IgnoredAny>(&body) {
        panic!(
            "the request body is not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        );
    }
    let stored = stored::store(accepted.iter().copied());
    let back = stored::parse_stored(&stored).expect("a stored batch reads back");
    assert_same_users(accepted.iter().copied(), &back);
}

/// Reads a stored batch; what reads is stored again and must read back the same.
pub fn check_stored(data: &[u8]) {
    let Ok(users) = stored::parse_stored(data) else {
        return;
    };
    let stored = stored::store(users.iter());
    let back = stored::parse_stored(&stored).expect("what store wrote reads back");
    assert_same_users(users.iter(), &back);
    assert_eq!(
        stored::store(back.iter()),
        stored,
        "stored twice, differently"
    );
    let env = Envelope {
        touchpoint: "sms",
        campaign: "c",
        dispatch_id: "dsp_fuzz",
        index: 0,
        count: 1,
        template: "{}",
    };
    let refs: Vec<&UserRef<'_>> = users.iter().collect();
    let body = custom::body_with(&env, &recipients(&refs, mapping()));
    // Batches stored by this version or the one before carry their values as the JSON they
    // were received as; the oldest form is a JSON array, parsed here: its body must be JSON.
    if !matches!(data.first(), Some(1 | 2))
        && let Err(e) = serde_json::from_slice::<IgnoredAny>(&body)
    {
        panic!(
            "the request body is not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        );
    }
}

/// A recipient's `user_id`; its other fields are read as JSON and left.
#[derive(Deserialize)]
struct Recipient {
    user_id: String,
}

fn json_list(recipients: &[u8]) -> Vec<Recipient> {
    let mut list = b"[".to_vec();
    list.extend_from_slice(recipients);
    list.push(b']');
    serde_json::from_slice(&list).unwrap_or_else(|e| {
        panic!(
            "the recipients are not a JSON list ({e}): {}",
            String::from_utf8_lossy(&list)
        )
    })
}

fn assert_same_users<'a, 'b: 'a>(
    users: impl ExactSizeIterator<Item = &'a UserRef<'b>>,
    back: &[UserRef<'_>],
) {
    assert_eq!(users.len(), back.len(), "users lost or added");
    for (a, b) in users.zip(back) {
        // The debug form shows the id and every attribute, name and raw value, in order.
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }
}
