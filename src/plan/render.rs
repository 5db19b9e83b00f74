//! Renders a plan for a terminal: a summary line, then each change with its fields, secrets only as
//! `(sensitive)`, long or multi-line strings as a line diff, and drift in a section of its own.
//! Everything that comes from a file or the registry (ids, file names, field paths with their
//! label keys, values) is escaped with [`crate::term::escape`] before it is painted, so a file
//! cannot send control sequences to a reviewer's terminal.

use std::fmt::Write;

use anstyle::{AnsiColor, Style};
use serde_json::Value;

use super::{Action, Change, FieldAction, FieldChange, Plan};
use crate::term::escape;

/// How to render text.
#[derive(Clone, Copy, Debug, Default)]
pub struct TextOptions {
    /// Use ANSI colours.
    pub color: bool,
}

/// How fields are drawn: in colour or not, and whether secret values were compared (by
/// fingerprint; not in a `--base` plan, which reads no secret).
pub(super) struct Paint {
    pub(super) color: bool,
    pub(super) values_known: bool,
}

impl Paint {
    fn paint(&self, color: AnsiColor, text: &str) -> String {
        if self.color {
            let style = Style::new().fg_color(Some(color.into()));
            format!("{style}{text}{style:#}")
        } else {
            text.to_string()
        }
    }

    fn bold(&self, text: &str) -> String {
        if self.color {
            let style = Style::new().bold();
            format!("{style}{text}{style:#}")
        } else {
            text.to_string()
        }
    }
}

/// Strings longer than this, or with a line break, are shown as a line diff.
const LONG: usize = 60;

/// The plan as text for a terminal or a log.
pub fn render_text(plan: &Plan, opts: TextOptions) -> String {
    let p = Paint {
        color: opts.color,
        values_known: plan.base.is_none(),
    };
    let mut out = String::new();
    if let Some(base) = &plan.base {
        let _ = writeln!(
            out,
            "Comparing the touchpoints at {} ({}) with the work tree{}.",
            escape(&base.rev),
            short(&base.commit),
            if plan.source.dirty {
                ", which has uncommitted changes"
            } else {
                ""
            }
        );
    }
    let s = &plan.summary;
    let _ = writeln!(
        out,
        "{} {} to create, {} to update, {} to delete, {} unchanged.",
        p.bold("Plan:"),
        s.create,
        s.update,
        s.delete,
        s.no_op
    );
    for c in plan.changes.iter().filter(|c| shown(c)) {
        out.push('\n');
        render_change(&mut out, &p, c, plan.base.is_none());
    }
    if !plan.drift.is_empty() {
        let _ = writeln!(
            out,
            "\n{} (changed outside of apply; apply restores the fields, a pause stays until resumed):",
            p.bold("Drift")
        );
        for d in &plan.drift {
            let mark = p.paint(AnsiColor::Magenta, "!");
            if d.paused {
                let _ = writeln!(
                    out,
                    "  {mark} {} ({}): paused through the admin API; not a change: apply keeps it paused",
                    escape(&d.id),
                    escape(&d.kind)
                );
            }
            for f in &d.fields {
                let _ = write!(out, "  {mark} {} ({}): ", escape(&d.id), escape(&d.kind));
                let mut line = String::new();
                field_line(&mut line, &p, f, "");
                out.push_str(line.trim_start());
            }
        }
    }
    if !plan.warnings.is_empty() {
        let _ = writeln!(
            out,
            "\n{} (plan --refresh checked the platforms; nothing above changes because of them):",
            p.bold("Warnings")
        );
        for w in &plan.warnings {
            let mark = p.paint(AnsiColor::Yellow, "!");
            if w.touchpoint.is_empty() {
                let _ = writeln!(out, "  {mark} {}", escape(&w.message));
            } else {
                let _ = writeln!(
                    out,
                    "  {mark} {}: {}",
                    escape(&w.touchpoint),
                    escape(&w.message)
                );
            }
        }
    }
    if !plan.checked.is_empty() {
        let _ = writeln!(out, "\n{} (plan --refresh):", p.bold("Checked live"));
        for c in &plan.checked {
            let mark = p.paint(AnsiColor::Green, "ok");
            let _ = writeln!(
                out,
                "  {mark} {}: {}",
                escape(&c.touchpoint),
                escape(&c.message)
            );
        }
    }
    if !plan.has_changes() {
        match &plan.base {
            Some(base) => {
                let _ = writeln!(
                    out,
                    "\nNo changes: the work tree matches {}.",
                    escape(&base.rev)
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "\nNo changes: the registry matches the files.{}",
                    paused_note(plan.summary.paused)
                );
            }
        }
    }
    out
}

/// What a plan without changes says of its paused touchpoints (nothing when there are none).
pub(super) fn paused_note(paused: usize) -> String {
    match paused {
        0 => String::new(),
        1 => " 1 touchpoint is paused through the admin API, which is not a change: apply keeps it paused.".into(),
        n => format!(
            " {n} touchpoints are paused through the admin API, which is not a change: apply keeps them paused."
        ),
    }
}

/// Whether a change is listed: every change, and unchanged touchpoints whose file moved.
pub(super) fn shown(c: &Change) -> bool {
    c.action != Action::NoOp || c.moved_from.is_some()
}

/// A commit id as people quote it.
pub(super) fn short(commit: &str) -> String {
    commit.chars().take(10).collect()
}

/// The mark, word and colour of an action.
pub(super) fn action_style(c: &Change) -> (&'static str, &'static str, AnsiColor) {
    match c.action {
        Action::Create => ("+", "create", AnsiColor::Green),
        Action::Update => ("~", "update", AnsiColor::Yellow),
        Action::Delete => ("-", "delete", AnsiColor::Red),
        Action::NoOp if c.moved_from.is_some() => ("→", "move", AnsiColor::Cyan),
        Action::NoOp => (" ", "no-op", AnsiColor::White),
    }
}

fn render_change(out: &mut String, p: &Paint, c: &Change, show_live_commit: bool) {
    let (mark, word, color) = action_style(c);
    let mut head = format!(
        "{} {} {} ({})",
        p.paint(color, mark),
        p.paint(color, word),
        p.bold(&escape(&c.id)),
        escape(&c.kind)
    );
    if let Some(file) = &c.file {
        let _ = write!(head, "  {}", escape(file));
    }
    if let Some(from) = &c.moved_from {
        let _ = write!(head, " (moved from {})", escape(from));
    }
    if show_live_commit
        && let Some(src) = &c.live_source
        && let Some(commit) = &src.commit
    {
        let _ = write!(
            head,
            "  [live from {}{}]",
            short(commit),
            if src.dirty { ", dirty tree" } else { "" }
        );
    }
    let _ = writeln!(out, "{head}");
    if c.action == Action::Delete {
        let why = if c.protected {
            p.paint(
                AnsiColor::Red,
                "its file is gone, but it is protected: apply will refuse to delete it",
            )
        } else {
            "its file is gone; apply deletes it with --allow-delete".to_string()
        };
        let _ = writeln!(out, "    {why}");
    }
    for f in &c.fields {
        field_line(out, p, f, "    ");
    }
}

fn show(v: Option<&Value>) -> String {
    match v {
        None => "(none)".into(),
        Some(v) => escape(&v.to_string()).into_owned(),
    }
}

fn show_ref(v: Option<&Value>) -> String {
    match v.and_then(Value::as_object).and_then(|m| m.iter().next()) {
        Some((k, val)) => format!("{{ {} = {} }}", escape(k), escape(&val.to_string())),
        None => "(none)".into(),
    }
}

fn is_long(v: Option<&Value>) -> bool {
    v.and_then(Value::as_str)
        .is_some_and(|s| s.contains('\n') || s.chars().count() > LONG)
}

/// One field change as a line (or, for long strings, a line diff), for text and markdown.
pub(super) fn field_line(out: &mut String, p: &Paint, f: &FieldChange, indent: &str) {
    let (mark, color) = match f.action {
        FieldAction::Add => ("+", AnsiColor::Green),
        FieldAction::Remove => ("-", AnsiColor::Red),
        FieldAction::Update => ("~", AnsiColor::Yellow),
    };
    let mark = p.paint(color, mark);
    let path = escape(&f.path);
    if f.sensitive {
        let text = match f.action {
            FieldAction::Add => format!("{} (sensitive)", show_ref(f.after.as_ref())),
            FieldAction::Remove => format!("{} (sensitive)", show_ref(f.before.as_ref())),
            FieldAction::Update if f.before == f.after => "(sensitive value changed)".to_string(),
            FieldAction::Update if !p.values_known => format!(
                "{} → {} (sensitive)",
                show_ref(f.before.as_ref()),
                show_ref(f.after.as_ref())
            ),
            FieldAction::Update => format!(
                "{} → {} ({})",
                show_ref(f.before.as_ref()),
                show_ref(f.after.as_ref()),
                if f.value_changed {
                    "sensitive value changed"
                } else {
                    "sensitive value unchanged"
                }
            ),
        };
        let _ = writeln!(out, "{indent}{mark} {path}: {text}");
        return;
    }
    if f.action == FieldAction::Update && (is_long(f.before.as_ref()) || is_long(f.after.as_ref()))
    {
        let old = f
            .before
            .as_ref()
            .and_then(Value::as_str)
            .unwrap_or_default();
        let new = f.after.as_ref().and_then(Value::as_str).unwrap_or_default();
        let _ = writeln!(out, "{indent}{mark} {path}:");
        // A final line without a newline is still the same line.
        let terminated = |s: &str| {
            if s.ends_with('\n') {
                s.to_string()
            } else {
                format!("{s}\n")
            }
        };
        let (old, new) = (terminated(old), terminated(new));
        let diff = similar::TextDiff::from_lines(&old, &new);
        for change in diff.iter_all_changes() {
            let line = escape(change.value().trim_end_matches('\n'));
            let row = match change.tag() {
                similar::ChangeTag::Delete => p.paint(AnsiColor::Red, &format!("- {line}")),
                similar::ChangeTag::Insert => p.paint(AnsiColor::Green, &format!("+ {line}")),
                similar::ChangeTag::Equal => format!("  {line}"),
            };
            let _ = writeln!(out, "{indent}    {row}");
        }
        return;
    }
    let text = match f.action {
        FieldAction::Add => format!("= {}", show(f.after.as_ref())),
        FieldAction::Remove => format!("{} → (removed)", show(f.before.as_ref())),
        FieldAction::Update => format!("{} → {}", show(f.before.as_ref()), show(f.after.as_ref())),
    };
    let sep = if f.action == FieldAction::Add {
        " "
    } else {
        ": "
    };
    let _ = writeln!(out, "{indent}{mark} {path}{sep}{text}");
}
