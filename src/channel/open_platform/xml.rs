//! The flat XML documents WeChat sends and expects: one root element (`<xml>`) whose children
//! each hold one value, as text or CDATA. Reading keeps the direct children's values by name
//! (nested elements are skipped, surrounding whitespace is not part of a value); writing puts every
//! string in CDATA, split where the value itself holds `]]>`.

use std::borrow::Cow;

use quick_xml::events::Event;
use quick_xml::reader::Reader;

use super::crypt::CryptError;

/// The values of a document's direct children, in document order.
#[derive(Debug, Default)]
pub(super) struct Fields(Vec<(String, String)>);

impl Fields {
    /// The value of the child named `name`, if the document has it.
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of the child named `name`, which must be there and not be empty.
    pub(super) fn require(&self, name: &'static str) -> Result<&str, CryptError> {
        match self.get(name) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(CryptError::MissingField(name)),
        }
    }
}

fn bad(what: impl std::fmt::Display) -> CryptError {
    CryptError::BadXml(what.to_string())
}

/// The text an entity reference (`&amp;`, `&#x4e2d;`) stands for.
fn entity(r: &quick_xml::events::BytesRef<'_>) -> Result<Cow<'static, str>, CryptError> {
    if let Some(c) = r.resolve_char_ref().map_err(bad)? {
        return Ok(Cow::Owned(c.to_string()));
    }
    let text = match r.xml10_content().as_ref() {
        "lt" => "<",
        "gt" => ">",
        "amp" => "&",
        "apos" => "'",
        "quot" => "\"",
        other => return Err(bad(format_args!("unknown entity `&{other};`"))),
    };
    Ok(Cow::Borrowed(text))
}

/// Reads the values of the root element's direct children. The caller bounds the input's size.
pub(super) fn read(xml: &str) -> Result<Fields, CryptError> {
    let mut reader = Reader::from_str(xml);
    let mut fields = Fields::default();
    // 0: before the root; 1: inside the root; 2: inside a child; more: nested deeper.
    let mut depth = 0usize;
    let mut name = String::new();
    let mut value = String::new();
    loop {
        match reader.read_event().map_err(bad)? {
            Event::Start(start) => {
                if depth == 1 {
                    name = start.local_name().as_ref().to_string();
                    value.clear();
                }
                depth = depth.saturating_add(1);
            }
            Event::Empty(start) => match depth {
                0 => return Ok(fields),
                1 => {
                    push(
                        &mut fields,
                        start.local_name().as_ref().to_string(),
                        String::new(),
                    )?;
                }
                _ => {}
            },
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                match depth {
                    0 => return Ok(fields),
                    1 => push(
                        &mut fields,
                        std::mem::take(&mut name),
                        value.trim().to_string(),
                    )?,
                    _ => {}
                }
            }
            Event::Text(text) if depth == 2 => value.push_str(&text.xml10_content()),
            Event::CData(cdata) if depth == 2 => value.push_str(&cdata.into_inner()),
            Event::GeneralRef(r) => {
                let text = entity(&r)?;
                if depth == 2 {
                    value.push_str(&text);
                }
            }
            Event::Text(text) if depth == 0 && !text.xml10_content().trim().is_empty() => {
                return Err(bad("text before the root element"));
            }
            Event::DocType(_) => return Err(bad("a DOCTYPE, which WeChat never sends")),
            Event::Eof if depth == 0 => return Err(bad("no root element")),
            Event::Eof => return Err(bad("the document ends inside an element")),
            _ => {}
        }
    }
}

fn push(fields: &mut Fields, name: String, value: String) -> Result<(), CryptError> {
    if fields.get(&name).is_some() {
        return Err(bad(format_args!("the element `{name}` appears twice")));
    }
    fields.0.push((name, value));
    Ok(())
}

/// `value` as CDATA: a value holding `]]>` is split into two sections between `]]` and `>`.
pub(super) fn cdata(value: &str) -> String {
    format!("<![CDATA[{}]]>", value.replace("]]>", "]]]]><![CDATA[>"))
}

/// `<Name><![CDATA[value]]></Name>` appended to `out`.
pub(super) fn push_cdata(out: &mut String, name: &str, value: &str) {
    out.push('<');
    out.push_str(name);
    out.push('>');
    out.push_str(&cdata(value));
    out.push_str("</");
    out.push_str(name);
    out.push('>');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_text_cdata_and_entities_of_direct_children() {
        let f = read(
            "<?xml version=\"1.0\"?>\n<xml>\n  <A><![CDATA[x]]]]><![CDATA[>y]]></A>\n  <B> 12 </B>\n  \
             <C>a&amp;b&#x4e2d;</C><D/><E><F>nested</F></E>\n</xml>",
        )
        .unwrap();
        assert_eq!(f.get("A"), Some("x]]>y"));
        assert_eq!(f.get("B"), Some("12"));
        assert_eq!(f.get("C"), Some("a&b中"));
        assert_eq!(f.get("D"), Some(""));
        assert_eq!(f.get("E"), Some(""));
        assert_eq!(f.get("F"), None);
        assert!(matches!(f.require("D"), Err(CryptError::MissingField("D"))));
    }

    #[test]
    fn refuses_what_is_not_a_flat_document() {
        for xml in [
            "",
            "just text",
            "<xml><A>1</A>",
            "<xml><A>1</B></xml>",
            "<xml><A>1</A><A>2</A></xml>",
            "<!DOCTYPE x [<!ENTITY e \"boom\">]><xml><A>&e;</A></xml>",
            "<xml><A>&e;</A></xml>",
        ] {
            assert!(
                matches!(read(xml), Err(CryptError::BadXml(_))),
                "{xml:?} was read"
            );
        }
    }

    #[test]
    fn cdata_splits_the_terminator_and_reads_back() {
        for v in ["plain", "]]>", "a]]>b]]>c", "]]]>>", "<&>\"'"] {
            let mut doc = "<xml>".to_string();
            push_cdata(&mut doc, "V", v);
            doc.push_str("</xml>");
            assert_eq!(read(&doc).unwrap().get("V"), Some(v), "{doc}");
        }
    }
}
