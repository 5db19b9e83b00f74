//! Renders a plan as a pull-request comment: a summary table a reviewer reads in seconds (touchpoint,
//! kind, action, risk), then each change folded in `<details>`, secrets only as references. The
//! comment stays under [`MARKDOWN_LIMIT`] characters; what does not fit is named as cut.
//!
//! Text from files or the registry is escaped twice over: control and bidi characters with
//! [`crate::term::escape`] (a comment is read in terminals and in `gh` too, and a bidi control
//! would reorder what the reviewer sees), then for the markdown around it: no backtick can close
//! an inline code span, no `|` a table cell, no `<` open a tag in a summary, and a diff's fence is
//! longer than any run of backticks in it.

use std::fmt::Write;

use super::render::{Paint, action_style, field_line, short, shown};
use super::{Action, Change, Plan};
use crate::term::escape;

/// The most characters a rendered comment has (GitHub refuses comments over 65,536).
pub const MARKDOWN_LIMIT: usize = 65_000;

/// Characters kept free for the closing note about what was cut.
const FOOTER_RESERVE: usize = 600;

/// The plan as a markdown pull-request comment of at most [`MARKDOWN_LIMIT`] characters.
pub fn render_markdown(plan: &Plan) -> String {
    render_limited(plan, MARKDOWN_LIMIT)
}

/// Builds the comment piece by piece, counting characters, so that it never passes `limit`.
struct Budget {
    out: String,
    used: usize,
    limit: usize,
}

impl Budget {
    /// Appends `piece` if it fits (keeping the footer's reserve free); says whether it did.
    fn push(&mut self, piece: &str) -> bool {
        let n = piece.chars().count();
        if self.used + n + FOOTER_RESERVE > self.limit {
            return false;
        }
        self.out.push_str(piece);
        self.used += n;
        true
    }
}

fn render_limited(plan: &Plan, limit: usize) -> String {
    let mut b = Budget {
        out: String::new(),
        used: 0,
        limit,
    };
    let s = &plan.summary;
    let mut head = format!(
        "### touchctl plan: {} to create, {} to update, {} to delete, {} unchanged\n\n",
        s.create, s.update, s.delete, s.no_op
    );
    let tree = match &plan.source.commit {
        Some(commit) if plan.source.dirty => {
            format!("the files at `{}` with uncommitted changes", short(commit))
        }
        Some(commit) => format!("the files at `{}`", short(commit)),
        None => "the files".to_string(),
    };
    match (&plan.base, &plan.registry) {
        (Some(base), _) => {
            let _ = writeln!(
                head,
                "Comparing `{}` (`{}`) with {tree}. Secrets are compared by reference only.\n",
                code_safe(&base.rev),
                short(&base.commit)
            );
        }
        (None, Some(registry)) => {
            let _ = writeln!(
                head,
                "Comparing the registry (`{}`) with {tree}.\n",
                code_safe(&registry.backend)
            );
        }
        (None, None) => {}
    }
    let listed: Vec<&Change> = plan.changes.iter().filter(|c| shown(c)).collect();
    let risky = listed.iter().filter(|c| !c.risks.is_empty()).count();
    if risky > 0 {
        let _ = writeln!(
            head,
            "⚠️ **{risky} risky change(s)**: deletes, new touchpoints (where they deliver and the secrets they send), or changes to where deliveries go, credentials or batch size. Review them before merging.\n"
        );
    }
    if listed.is_empty() {
        let _ = writeln!(
            head,
            "**No changes.**{}",
            super::render::paused_note(plan.summary.paused)
        );
    }
    b.push(&head);

    let mut rows_cut = 0;
    if !listed.is_empty() {
        b.push("| touchpoint | kind | action | risk |\n|---|---|---|---|\n");
        for (i, c) in listed.iter().enumerate() {
            if !b.push(&table_row(c)) {
                rows_cut = listed.len() - i;
                let _ = b.push(&format!("| … | | | {rows_cut} more not shown |\n"));
                break;
            }
        }
        b.push("\n");
    }

    let p = Paint {
        color: false,
        values_known: plan.base.is_none(),
    };
    let mut details_cut = 0;
    let with_details: Vec<&&Change> = listed
        .iter()
        .filter(|c| !c.fields.is_empty() || c.action == Action::Delete)
        .collect();
    for (i, c) in with_details.iter().enumerate() {
        if !b.push(&details(c, &p, plan.base.is_none())) {
            details_cut = with_details.len() - i;
            break;
        }
    }

    if !plan.warnings.is_empty() {
        let mut warnings =
            String::from("#### Warnings (`plan --refresh` checked the platforms)\n\n");
        for w in &plan.warnings {
            if w.touchpoint.is_empty() {
                let _ = writeln!(warnings, "- {}", html(&w.message));
            } else {
                let _ = writeln!(
                    warnings,
                    "- `{}`: {}",
                    code_safe(&w.touchpoint),
                    html(&w.message)
                );
            }
        }
        warnings.push('\n');
        b.push(&warnings);
    }

    if !plan.checked.is_empty() {
        let mut checked = String::from("#### Checked live (`plan --refresh`)\n\n");
        for c in &plan.checked {
            let _ = writeln!(
                checked,
                "- `{}`: {}",
                code_safe(&c.touchpoint),
                html(&c.message)
            );
        }
        checked.push('\n');
        b.push(&checked);
    }

    if !plan.drift.is_empty() {
        let mut drift = String::from("#### Drift (changed outside of apply)\n\n");
        for d in &plan.drift {
            if d.paused {
                let _ = writeln!(
                    drift,
                    "- `{}` ({}): paused through the admin API; not a change: apply keeps it paused",
                    code_safe(&d.id),
                    html(&d.kind)
                );
            }
            for f in &d.fields {
                let _ = writeln!(
                    drift,
                    "- `{}` ({}): `{}` changed",
                    code_safe(&d.id),
                    html(&d.kind),
                    code_safe(&f.path)
                );
            }
        }
        drift.push('\n');
        if !b.push(&drift) {
            let _ = b.push(&format!(
                "#### Drift\n\n{} touchpoint(s) drifted; run the plan locally to see them.\n\n",
                plan.drift.len()
            ));
        }
    }

    let mut out = b.out;
    if rows_cut > 0 || details_cut > 0 {
        let command = match &plan.base {
            Some(base) => format!("touchctl plan --base {}", base.rev),
            None => "touchctl plan".to_string(),
        };
        let _ = writeln!(
            out,
            "> ✂️ **Cut to fit one comment ({limit} characters):** {}{}{}. Run `{}` for the whole plan.\n",
            if rows_cut > 0 {
                format!("{rows_cut} touchpoint(s) left out of the table")
            } else {
                String::new()
            },
            if rows_cut > 0 && details_cut > 0 {
                "; "
            } else {
                ""
            },
            if details_cut > 0 {
                format!("the details of {details_cut} touchpoint(s) left out")
            } else {
                String::new()
            },
            code_safe(&command)
        );
    }
    let _ = writeln!(
        out,
        "<sub>touchctl {} · plan format {}</sub>",
        plan.touchctl_version, plan.format_version
    );
    out
}

fn table_row(c: &Change) -> String {
    let (_, word, _) = action_style(c);
    let action = match &c.moved_from {
        Some(from) => format!("{word} (from `{}`)", cell(from)),
        None => word.to_string(),
    };
    let risk = if c.risks.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = c.risks.iter().map(|r| format!("`{}`", cell(r))).collect();
        format!("⚠️ {}", list.join(", "))
    };
    format!(
        "| `{}` | {} | {action} | {risk} |\n",
        cell(&c.id),
        html(&c.kind).replace('|', "\\|")
    )
}

fn details(c: &Change, p: &Paint, show_live_commit: bool) -> String {
    let (mark, word, _) = action_style(c);
    let mut summary = format!(
        "{mark} {word} <code>{}</code> ({})",
        html(&c.id),
        html(&c.kind)
    );
    if !c.fields.is_empty() {
        let _ = write!(summary, ", {} field(s)", c.fields.len());
    }
    if !c.risks.is_empty() {
        let _ = write!(summary, ", ⚠️ {}", html(&c.risks.join(", ")));
    }
    let mut about = Vec::new();
    if let Some(file) = &c.file {
        about.push(format!("file `{}`", code_safe(file)));
    }
    if let Some(from) = &c.moved_from {
        about.push(format!("moved from `{}`", code_safe(from)));
    }
    if show_live_commit
        && let Some(src) = &c.live_source
        && let Some(commit) = &src.commit
    {
        about.push(format!(
            "live from `{}`{}",
            short(commit),
            if src.dirty { " (a dirty tree)" } else { "" }
        ));
    }
    if c.action == Action::Delete {
        about.push(
            if c.protected {
                "its file is gone, but it is **protected**: apply will refuse to delete it"
            } else {
                "its file is gone; apply deletes it with `--allow-delete`"
            }
            .to_string(),
        );
    }
    let mut out = format!("<details><summary>{summary}</summary>\n\n");
    if !about.is_empty() {
        let mut line = about.join(" · ");
        if let Some(first) = line.get(..1) {
            line = first.to_uppercase() + &line[1..];
        }
        let _ = writeln!(out, "{line}\n");
    }
    if !c.fields.is_empty() {
        let mut body = String::new();
        for f in &c.fields {
            field_line(&mut body, p, f, "");
        }
        let fence = fence_for(&body);
        let _ = writeln!(out, "{fence}diff\n{body}{fence}\n");
    }
    out.push_str("</details>\n\n");
    out
}

/// A code fence longer than any run of backticks in `body`, so no value can close it.
fn fence_for(body: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for ch in body.chars() {
        if ch == '`' {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    "`".repeat((longest + 1).max(3))
}

/// Text for inside `<summary>` or plain markdown text.
fn html(s: &str) -> String {
    escape(s)
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Text for inside a table cell's inline code.
fn cell(s: &str) -> String {
    code_safe(s).replace('|', "\\|")
}

/// Text for inside single-backtick inline code (line breaks are escaped).
fn code_safe(s: &str) -> String {
    escape(s).replace('`', "'")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::samples::{self, plan};
    use serde_json::json;

    fn change(id: &str, action: Action, description: &str) -> Change {
        let mut c = samples::change(id, "description", json!("old"), json!(description));
        c.action = action;
        c
    }

    #[test]
    fn long_plans_are_cut_under_the_limit_and_say_so() {
        let long = "x".repeat(2_000);
        let changes = (0..100)
            .map(|i| change(&format!("tp-{i:03}"), Action::Update, &long))
            .collect();
        let out = render_limited(&plan(changes), 20_000);
        assert!(
            out.chars().count() <= 20_000,
            "{} chars",
            out.chars().count()
        );
        assert!(out.contains("| `tp-099` |"), "every row fits the table");
        assert!(out.contains("Cut to fit one comment"));
        assert!(out.contains("the details of"));
        assert!(!out.contains("<code>tp-099</code>"));
    }

    #[test]
    fn short_plans_are_whole() {
        let out = render_limited(&plan(vec![change("a", Action::Update, "new")]), 20_000);
        assert!(!out.contains("Cut to fit"));
        assert!(out.contains("<code>a</code>"));
        assert!(out.contains("~ description: \"old\" → \"new\""));
    }

    #[test]
    fn terminal_escapes_in_file_names_cannot_break_out_of_a_table_cell_or_code_span() {
        let mut moved = change("a", Action::NoOp, "same");
        moved.fields.clear();
        moved.moved_from = Some("x|y`z\x1b[2J\n| injected | row |\u{202e}.toml".into());
        let mut updated = change("b", Action::Update, "new \x1b]0;pwned\x07 \u{9b}");
        updated.file = Some("touchpoints/\x1b]0;pwned\x07.toml".into());
        updated.risks = vec!["url`|\x1b".into()];
        let out = render_limited(&plan(vec![moved, updated]), 20_000);
        assert!(
            !out.chars()
                .any(|c| c.is_control() && c != '\n' || c == '\u{202e}'),
            "{}",
            out.escape_debug()
        );
        let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("| `")).collect();
        assert_eq!(rows.len(), 2, "{out}");
        for row in rows {
            let cells = row.split('|').count() - row.matches("\\|").count();
            assert_eq!(cells, 6, "four cells in {row}");
            assert_eq!(
                row.matches('`').count() % 2,
                0,
                "code spans closed in {row}"
            );
        }
        assert!(
            out.contains("(from `x\\|y'z\\x1b[2J\\n\\| injected \\| row \\|\\u{202e}.toml`)"),
            "{out}"
        );
        assert!(
            out.contains("File `touchpoints/\\x1b]0;pwned\\x07.toml`"),
            "{out}"
        );
        assert!(
            out.contains("→ \"new \\u001b]0;pwned\\u0007 \\x9b\""),
            "{out}"
        );
    }

    #[test]
    fn values_cannot_close_the_fence() {
        let out = render_limited(
            &plan(vec![change("a", Action::Update, "```\n# injected")]),
            20_000,
        );
        assert!(out.contains("````diff\n"), "{out}");
    }
}
