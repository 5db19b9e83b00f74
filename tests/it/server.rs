//! The daemon's server against hostile input: endpoints behind IPv6 forms of private addresses,
//! connection floods at a low open-file limit, many large triggers at once, weak API tokens.

use serde_json::json;

use crate::daemon_support::{custom_touchpoint, users};
use crate::support::Project;

const ENV: [(&str, &str); 1] = [("SINK_TOKEN", "sink-token-value")];

/// Each IPv6 form of a private IPv4 address in a touchpoint's URL (an IP literal, which the HTTP
/// client connects to without asking its resolver) is refused before any request, saying why.
#[test]
fn ipv6_forms_of_private_addresses_are_refused() {
    let forms = [
        ("compat", "[::127.0.0.1]"),
        ("translated", "[::ffff:0:127.0.0.1]"),
        ("nat64", "[64:ff9b::127.0.0.1]"),
        ("sixtofour", "[2002:7f00:1::]"),
        ("mapped", "[::ffff:127.0.0.1]"),
    ];
    let p = Project::empty();
    for (id, host) in forms {
        p.write(
            &format!("touchpoints/{id}.toml"),
            &custom_touchpoint(id, &format!("http://{host}:9"), 100, ""),
        );
    }
    p.run_env(&["apply", "--auto-approve"], &ENV).code(0);
    let d = p.start_daemon(&["--insecure-no-auth"], &ENV);
    for (id, host) in forms {
        let (code, r) = d.dispatch(&json!({
            "touchpoint": id,
            "campaign": "c",
            "template_params": {"text": "hi"},
            "users": users(2),
        }));
        assert_eq!(code, 202, "{r}");
        let s = d.wait_finished(r["dispatch_id"].as_str().unwrap());
        assert_eq!(s["dead"], 2, "{id}: {s}");
        let list = p.run(&["deliveries", "list", "--touchpoint", id, "--format", "json"]);
        let batches: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
        let batch = &batches[0];
        assert_eq!(
            batch["attempts"], 1,
            "{id}: refused at once, not retried: {batch}"
        );
        let error = batch["last_error"].as_str().unwrap_or_default();
        let bare = host.trim_matches(['[', ']']);
        assert!(
            error.starts_with("refused: [") && error.contains("--allow-private-network"),
            "{id} ({bare}): {error}"
        );
    }
}
