//! Templates and personalisation, shared by the kinds that have `[[templates]]` (Official
//! Account, WeCom): a trigger names a template by its `id`; its `template_params` give every one of
//! the template's `fields` and nothing else; a value may hold `{{name}}` placeholders naming the
//! touchpoint's dynamic params, filled per recipient — refused where one message goes to many
//! recipients. Every problem is named at once (the API answers 422 with them).

use serde_json::{Map, Value};

use super::Message;
use crate::model::{DynamicParams, MessageTemplate};

/// The longest template field value accepted, in characters (a WeChat template field takes far
/// less; this bound keeps a trigger's stored form small).
pub const MAX_VALUE: usize = 4096;

/// The template a trigger names, after checking its message and params; every problem named.
/// `one_for_many` refuses placeholders (the channel sends one message to many recipients).
pub fn check<'t>(
    templates: &'t [MessageTemplate],
    message: &Message,
    params: &Map<String, Value>,
    dynamic: &DynamicParams,
    one_for_many: bool,
) -> Result<&'t MessageTemplate, Vec<String>> {
    let mut problems = Vec::new();
    for (field, given) in [
        ("title", &message.title),
        ("body", &message.body),
        ("payload", &message.payload),
    ] {
        if given.is_some() {
            problems.push(format!(
                "`{field}` is for app push touchpoints; give the text in the template's fields"
            ));
        }
    }
    let names: Vec<&str> = templates.iter().map(|t| t.id.as_str()).collect();
    let template = match &message.template {
        None => {
            problems.push(format!(
                "`template` is required: name one of this touchpoint's templates ({})",
                list(&names)
            ));
            None
        }
        Some(id) => match templates.iter().find(|t| &t.id == id) {
            Some(t) => Some(t),
            None => {
                let hint = match crate::load::did_you_mean(id, names.iter().copied()) {
                    Some(near) => format!("; did you mean `{near}`?"),
                    None => format!("; it has {}", list(&names)),
                };
                problems.push(format!(
                    "`template`: `{}` is not a template of this touchpoint{hint}",
                    crate::term::escape(id)
                ));
                None
            }
        },
    };
    if let Some(t) = template {
        problems.extend(check_fields(t, params, dynamic, one_for_many));
    }
    match template {
        Some(t) if problems.is_empty() => Ok(t),
        _ => Err(problems),
    }
}

fn list(names: &[&str]) -> String {
    if names.is_empty() {
        return "none is declared".into();
    }
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_fields(
    t: &MessageTemplate,
    params: &Map<String, Value>,
    dynamic: &DynamicParams,
    one_for_many: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    for field in &t.fields {
        match params.get(field) {
            None | Some(Value::Null) => problems.push(format!(
                "template `{}` needs field `{field}` in `template_params`",
                t.id
            )),
            Some(v) => match text(v) {
                None => problems.push(format!(
                    "field `{field}` must be text (a string, number or boolean)"
                )),
                Some(s) if s.chars().count() > MAX_VALUE => problems.push(format!(
                    "field `{field}` is longer than {MAX_VALUE} characters"
                )),
                Some(s) => {
                    for name in placeholders(&s) {
                        if one_for_many {
                            problems.push(format!(
                                "field `{field}` holds the placeholder `{{{{{}}}}}`, but this touchpoint sends one message to many recipients: placeholders cannot be filled per recipient here",
                                crate::term::escape(name)
                            ));
                        } else if !dynamic.contains_key(name) {
                            let hint =
                                crate::load::did_you_mean(name, dynamic.keys().map(String::as_str))
                                    .map(|n| format!("; did you mean `{n}`?"))
                                    .unwrap_or_default();
                            problems.push(format!(
                                "field `{field}`: placeholder `{{{{{}}}}}` names no dynamic param of this touchpoint{hint}",
                                crate::term::escape(name)
                            ));
                        }
                    }
                }
            },
        }
    }
    for name in params.keys().filter(|k| !t.fields.contains(k)) {
        let hint = crate::load::did_you_mean(name, t.fields.iter().map(String::as_str))
            .map(|n| format!("; did you mean `{n}`?"))
            .unwrap_or_else(|| {
                let fields: Vec<&str> = t.fields.iter().map(String::as_str).collect();
                format!("; its fields are {}", list(&fields))
            });
        problems.push(format!(
            "`{}` is not a field of template `{}`{hint}",
            crate::term::escape(name),
            t.id
        ));
    }
    problems
}

/// A field value as text: strings as they are, numbers and booleans written out.
pub fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The names of the `{{name}}` placeholders in `s`, in order (spaces inside the braces allowed).
pub fn placeholders(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        out.push(after[..end].trim());
        rest = &after[end + 2..];
    }
    out
}

/// `s` with each placeholder replaced by the recipient's value of that dynamic param (text as in
/// [`text`]; an absent optional param is empty).
pub fn fill(s: &str, recipient: &Map<String, Value>) -> String {
    if !s.contains("{{") {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        out.push_str(&rest[..start]);
        let name = after[..end].trim();
        if let Some(v) = recipient.get(name).and_then(text) {
            out.push_str(&v);
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ParamSource;
    use serde_json::json;

    fn templates() -> Vec<MessageTemplate> {
        vec![MessageTemplate {
            id: "order_shipped".into(),
            template_id: "TM1".into(),
            fields: vec!["first".into(), "keyword1".into()],
            url: None,
            mini_program: None,
        }]
    }

    fn dynamic() -> DynamicParams {
        let mut d = DynamicParams::new();
        d.insert(
            "openid".into(),
            ParamSource::Attribute("user.openid".into()),
        );
        d.insert("name".into(), ParamSource::Attribute("user.name".into()));
        d
    }

    fn msg(template: Option<&str>) -> Message {
        Message {
            template: template.map(str::to_string),
            ..Message::default()
        }
    }

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn a_trigger_must_name_a_known_template_and_give_exactly_its_fields() {
        let ts = templates();
        let ok = check(
            &ts,
            &msg(Some("order_shipped")),
            &map(json!({"first": "Hi {{name}}", "keyword1": 3})),
            &dynamic(),
            false,
        );
        assert_eq!(ok.unwrap().template_id, "TM1");
        let none = check(&ts, &msg(None), &Map::new(), &dynamic(), false).unwrap_err();
        assert_eq!(
            none,
            ["`template` is required: name one of this touchpoint's templates (`order_shipped`)"]
        );
        let typo = check(
            &ts,
            &msg(Some("order_shiped")),
            &Map::new(),
            &dynamic(),
            false,
        )
        .unwrap_err();
        assert_eq!(
            typo,
            [
                "`template`: `order_shiped` is not a template of this touchpoint; did you mean `order_shipped`?"
            ]
        );
        let fields = check(
            &ts,
            &msg(Some("order_shipped")),
            &map(json!({"first": "{{nmae}}", "keywrd1": "x", "extra": [1]})),
            &dynamic(),
            false,
        )
        .unwrap_err();
        assert_eq!(
            fields,
            [
                "field `first`: placeholder `{{nmae}}` names no dynamic param of this touchpoint; did you mean `name`?",
                "template `order_shipped` needs field `keyword1` in `template_params`",
                "`extra` is not a field of template `order_shipped`; its fields are `first`, `keyword1`",
                "`keywrd1` is not a field of template `order_shipped`; did you mean `keyword1`?",
            ]
        );
    }

    #[test]
    fn placeholders_are_refused_where_one_message_goes_to_many() {
        let problems = check(
            &templates(),
            &msg(Some("order_shipped")),
            &map(json!({"first": "Hi {{ name }}", "keyword1": "x"})),
            &dynamic(),
            true,
        )
        .unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("sends one message to many recipients"),
            "{problems:?}"
        );
    }

    #[test]
    fn placeholders_are_filled_per_recipient() {
        let r = map(json!({"user_id": "u1", "name": "小王", "points": 20}));
        assert_eq!(
            fill("Hi {{name}}, +{{ points }} ({{missing}})", &r),
            "Hi 小王, +20 ()"
        );
        assert_eq!(fill("no placeholders {{", &r), "no placeholders {{");
        assert_eq!(placeholders("{{a}}{{ b }}{{c"), ["a", "b"]);
    }
}
