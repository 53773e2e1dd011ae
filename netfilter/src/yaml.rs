//! The one YAML reader of Enclave's inputs (zone policies, inventories): one parser
//! (`yaml-rust2`) read once, giving both the value (as `serde_json::Value`, typed by serde
//! afterwards) and where every field stands, so that every error names its line and column —
//! a typed field's error too, at the place it is used (an alias at its use, not its anchor).
//!
//! Hostile input is bounded: aliases may not expand the document past [`MAX_NODES`] values
//! (the "billion laughs"), a mapping may not repeat a key, and there is one document. Size
//! and nesting are bounded by the caller before parsing (`policy::load`).

use crate::policy::span::{SpanBuilder, SpanIndex};
use crate::policy::Pos;
use serde_json::{Map, Number, Value};
use std::collections::HashMap;
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// The most values a document may hold once aliases are expanded (a policy of 10,000 rules
/// is about 100,000).
pub const MAX_NODES: usize = 2_000_000;

/// A parsed document and where its fields stand.
#[derive(Debug)]
pub struct Document {
    /// The value.
    pub value: Value,
    /// Field path → position.
    pub spans: SpanIndex,
}

/// Why a document could not be read, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    /// Where.
    pub pos: Pos,
    /// The field path (`spec.rules[2].ports`), or `(document)`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for YamlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.pos.line, self.pos.col, self.field, self.message
        )
    }
}

fn pos(m: &Marker) -> Pos {
    Pos {
        line: m.line(),
        col: m.col() + 1,
    }
}

fn doc_error(m: &Marker, message: impl Into<String>) -> YamlError {
    YamlError {
        pos: pos(m),
        field: "(document)".into(),
        message: message.into(),
    }
}

enum Frame {
    Map {
        map: Map<String, Value>,
        key: Option<(String, Marker)>,
        anchor: usize,
    },
    Seq {
        items: Vec<Value>,
        anchor: usize,
    },
}

/// Parses one YAML document.
pub fn parse(src: &str) -> Result<Document, YamlError> {
    let mut parser = Parser::new_from_str(src);
    let mut spans = SpanBuilder::default();
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, (Value, usize)> = HashMap::new();
    let mut root: Option<Value> = None;
    let mut nodes = 0usize;
    let mut documents = 0usize;
    loop {
        let (ev, m) = parser.next_token().map_err(|e| YamlError {
            pos: pos(e.marker()),
            field: "(document)".into(),
            message: format!("YAML syntax: {}", e.info()),
        })?;
        spans.on_event(&ev, m);
        // A finished value, its anchor (0: none), and how many values it adds (an alias
        // adds every value it repeats).
        let done: Option<(Value, usize, usize)> = match ev {
            Event::StreamEnd => break,
            Event::DocumentStart => {
                documents += 1;
                if documents > 1 {
                    return Err(doc_error(
                        &m,
                        "more than one YAML document; a file holds one",
                    ));
                }
                None
            }
            Event::Scalar(text, style, anchor, tag) => {
                Some((scalar(text, style, tag.as_ref()), anchor, 1))
            }
            Event::Alias(id) => match anchors.get(&id) {
                Some((v, n)) => Some((v.clone(), 0, *n)),
                None => return Err(doc_error(&m, "an alias to an anchor not defined before it")),
            },
            Event::SequenceStart(anchor, _) => {
                stack.push(Frame::Seq {
                    items: Vec::new(),
                    anchor,
                });
                None
            }
            Event::MappingStart(anchor, _) => {
                stack.push(Frame::Map {
                    map: Map::new(),
                    key: None,
                    anchor,
                });
                None
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Frame::Seq { items, anchor }) => Some((Value::Array(items), anchor, 1)),
                Some(Frame::Map { map, anchor, .. }) => Some((Value::Object(map), anchor, 1)),
                None => None,
            },
            _ => None,
        };
        let Some((value, anchor, added)) = done else {
            continue;
        };
        nodes = nodes.saturating_add(added);
        if nodes > MAX_NODES {
            return Err(doc_error(
                &m,
                format!("the document expands to more than {MAX_NODES} values (aliases repeated too often); refused"),
            ));
        }
        if anchor != 0 {
            let n = size(&value);
            anchors.insert(anchor, (value.clone(), n));
        }
        match stack.last_mut() {
            None => root = Some(value),
            Some(Frame::Seq { items, .. }) => items.push(value),
            Some(Frame::Map { map, key, .. }) => match key.take() {
                None => {
                    let k = match value {
                        Value::String(s) => s,
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        Value::Null => "null".into(),
                        _ => return Err(doc_error(&m, "a mapping key must be a scalar")),
                    };
                    if map.contains_key(&k) {
                        return Err(YamlError {
                            pos: pos(&m),
                            field: "(document)".into(),
                            message: format!("duplicate key `{}`", short(&k)),
                        });
                    }
                    *key = Some((k, m));
                }
                Some((k, _)) => {
                    map.insert(k, value);
                }
            },
        }
    }
    Ok(Document {
        value: root.unwrap_or(Value::Null),
        spans: spans.finish(),
    })
}

fn size(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + count(a),
        Value::Object(o) => 1 + o.values().map(size).sum::<usize>(),
        _ => 1,
    }
}

fn count(items: &[Value]) -> usize {
    items.iter().map(size).sum()
}

fn short(s: &str) -> String {
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s.to_string()
    }
}

/// A scalar as the YAML 1.2 core schema reads it: quoted and block scalars are strings;
/// plain ones may be null, a boolean, an integer or a float.
fn scalar(text: String, style: TScalarStyle, tag: Option<&yaml_rust2::parser::Tag>) -> Value {
    if let Some(t) = tag {
        if t.suffix == "str" {
            return Value::String(text);
        }
    }
    if style != TScalarStyle::Plain {
        return Value::String(text);
    }
    match text.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let (neg, digits) = match text.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, text.strip_prefix('+').unwrap_or(&text)),
    };
    let int = if let Some(h) = digits.strip_prefix("0x") {
        u64::from_str_radix(h, 16).ok()
    } else if let Some(o) = digits.strip_prefix("0o") {
        u64::from_str_radix(o, 8).ok()
    } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse::<u64>().ok()
    } else {
        None
    };
    if let Some(i) = int {
        if !neg {
            return Value::Number(i.into());
        }
        if let Some(n) = i64::try_from(i).ok().and_then(|n| n.checked_neg()) {
            return Value::Number(n.into());
        }
    }
    let looks_float = text
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
        && text.bytes().any(|b| b.is_ascii_digit());
    if looks_float {
        if let Some(n) = text.parse::<f64>().ok().and_then(Number::from_f64) {
            return Value::Number(n);
        }
    }
    Value::String(text)
}

/// Reads `src` as a `T`; every error located.
pub fn from_str<T: serde::de::DeserializeOwned>(src: &str) -> Result<T, YamlError> {
    typed(&parse(src)?)
}

/// Types a parsed document; a type error names the field and where it stands.
pub fn typed<T: serde::de::DeserializeOwned>(doc: &Document) -> Result<T, YamlError> {
    serde_path_to_error::deserialize(&doc.value).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." {
            "(document)".into()
        } else {
            field
        };
        let message = e.inner().to_string();
        let pos = if message.starts_with("unknown field") {
            doc.spans.locate_key(&field)
        } else {
            doc.spans.locate(&field)
        };
        YamlError {
            pos,
            message,
            field,
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn scalars_follow_the_core_schema() {
        let d = parse("a: 1\nb: '1'\nc: -7\nd: 0x1f\ne: 1.5\nf: true\ng: ~\nh: yes\ni: 8000-8080\nj: !!str 5\n").unwrap();
        let v = d.value;
        assert_eq!(v["a"], 1);
        assert_eq!(v["b"], "1");
        assert_eq!(v["c"], -7);
        assert_eq!(v["d"], 31);
        assert_eq!(v["e"], 1.5);
        assert_eq!(v["f"], true);
        assert!(v["g"].is_null());
        assert_eq!(v["h"], "yes");
        assert_eq!(v["i"], "8000-8080");
        assert_eq!(v["j"], "5");
    }

    #[test]
    fn aliases_expand_within_a_bound_and_duplicate_keys_are_refused() {
        let d = parse("base: &b {x: 1}\nuse: *b\nlist: [*b, *b]\n").unwrap();
        assert_eq!(d.value["use"]["x"], 1);
        assert_eq!(d.value["list"][1]["x"], 1);
        // Nine levels of tenfold aliases: a billion values.
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        // Refused by the bound on expanded values (what the message names), not by running
        // out of memory; how fast is the policy benchmark's business, not a test's.
        let e = parse(&bomb).unwrap_err();
        assert!(e.message.contains("aliases repeated too often"), "{e}");
        let e = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!((e.pos.line, e.message.as_str()), (3, "duplicate key `a`"));
        assert!(parse("a: 1\n---\nb: 2\n").is_err());
    }

    #[test]
    fn a_type_error_is_located_at_the_use_of_an_alias() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct T {
            name: String,
            ports: Vec<u16>,
        }
        let e =
            from_str::<Vec<T>>("- name: a\n  ports: &p [x]\n- name: b\n  ports: *p\n").unwrap_err();
        // The first use fails first: at the anchor's own line.
        assert_eq!(e.field, "[0].ports[0]");
        assert_eq!(e.pos.line, 2);
        let e = from_str::<Vec<T>>(
            "- name: a\n  ports: [80]\n- {name: b, bad: &p [x]}\n- name: c\n  ports: *p\n",
        )
        .unwrap_err();
        assert_eq!((e.field.as_str(), e.pos.line), ("[1]", 3));
        assert!(e.message.contains("missing field `ports`"), "{e}");
        let ok: Vec<T> = from_str("- name: a\n  ports: &p [80]\n- name: b\n  ports: *p\n").unwrap();
        assert_eq!(ok[1].ports, vec![80]);
        let e = from_str::<Vec<T>>(
            "- name: a\n  ports: &p [80, 90]\n- name: b\n  ports: *p\n- name: c\n  ports: 7\n",
        )
        .unwrap_err();
        assert_eq!((e.field.as_str(), e.pos.line), ("[2].ports", 6));
    }
}
