//! Maps field paths (`spec.rules[2].ports[0]`) to where they stand in the YAML source.
//!
//! serde tells us *what* is wrong with a field only while deserializing; semantic checks run
//! later on plain data. This index, built from the parser's marked events, lets those checks
//! point at the line and column of the field they complain about.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::Marker;

/// A line and column, both 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub col: usize,
}

/// Field path → position of its value (and of its key, for mapping entries).
#[derive(Debug, Default)]
pub struct SpanIndex {
    values: HashMap<String, Pos>,
}

impl SpanIndex {
    /// Indexes `src`. A document that does not parse yields what was indexed before the
    /// error.
    pub fn build(src: &str) -> SpanIndex {
        let mut b = SpanBuilder::default();
        let mut parser = Parser::new_from_str(src);
        while let Ok((ev, m)) = parser.next_token() {
            let end = matches!(ev, Event::StreamEnd);
            b.on_event(&ev, m);
            if end {
                break;
            }
        }
        b.finish()
    }

    /// Where the key of mapping entry `path` stands (for an error about the key itself,
    /// like an unknown field), else as [`SpanIndex::locate`].
    pub fn locate_key(&self, path: &str) -> Pos {
        match self.values.get(&format!("{path}#key")) {
            Some(p) => *p,
            None => self.locate(path),
        }
    }

    /// The position of `path` (its key, for a mapping entry), or of its nearest indexed
    /// ancestor.
    pub fn locate(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            // The value itself; for a block value, where its key stands.
            if let Some(pos) = self
                .values
                .get(p)
                .or_else(|| self.values.get(&format!("{p}#key")))
            {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => {
                    return self
                        .values
                        .get("")
                        .copied()
                        .unwrap_or(Pos { line: 1, col: 1 })
                }
            }
        }
    }
}

enum Frame {
    Map {
        path: String,
        key: Option<String>,
        located: bool,
    },
    Seq {
        path: String,
        next: usize,
    },
}

/// Builds a [`SpanIndex`] from parser events, one at a time (the YAML reader feeds it the
/// events it builds the value from).
#[derive(Default)]
pub struct SpanBuilder {
    stack: Vec<Frame>,
    index: SpanIndex,
}

impl SpanBuilder {
    /// The index.
    pub fn finish(self) -> SpanIndex {
        self.index
    }

    /// The path of the value about to be read, advancing the parent's cursor.
    fn child_path(&mut self) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { key: None, .. }) => None,
            Some(Frame::Map { path, key, .. }) => {
                let k = key.take().unwrap_or_default();
                Some(if path.is_empty() {
                    k
                } else {
                    format!("{path}.{k}")
                })
            }
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some(p)
            }
        }
    }

    fn record(&mut self, path: &str, m: Marker) {
        self.index.values.entry(path.to_string()).or_insert(Pos {
            line: m.line(),
            col: m.col() + 1,
        });
    }
}

impl SpanBuilder {
    /// Takes the next event.
    pub fn on_event(&mut self, ev: &Event, m: Marker) {
        let scalar = match ev {
            Event::Scalar(v, ..) => Some(v.clone()),
            // An alias stands where it is used, like a scalar (as a key: its anchor's
            // text is unknown here, so it names no path).
            Event::Alias(_) => Some(String::from("*")),
            _ => None,
        };
        match ev {
            Event::Scalar(..) | Event::Alias(_) => match self.child_path() {
                // A mapping key: remember it; its value comes next.
                None => {
                    let pos = Pos {
                        line: m.line(),
                        col: m.col() + 1,
                    };
                    if let Some(Frame::Map { path, key, located }) = self.stack.last_mut() {
                        // A mapping is located at its first key (the parser's mapping-start
                        // mark points past it).
                        if !*located {
                            *located = true;
                            self.index.values.entry(path.clone()).or_insert(pos);
                        }
                        let v = scalar.unwrap_or_default();
                        let full = if path.is_empty() {
                            v.clone()
                        } else {
                            format!("{path}.{v}")
                        };
                        *key = Some(v);
                        self.index
                            .values
                            .entry(format!("{full}#key"))
                            .or_insert(Pos {
                                line: m.line(),
                                col: m.col() + 1,
                            });
                    }
                }
                Some(p) => self.record(&p, m),
            },
            Event::MappingStart(..) => {
                let p = self.child_path().unwrap_or_default();
                self.stack.push(Frame::Map {
                    path: p,
                    key: None,
                    located: false,
                });
            }
            Event::SequenceStart(..) => {
                let p = self.child_path().unwrap_or_default();
                self.record(&p, m);
                self.stack.push(Frame::Seq { path: p, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_nested_sequence_items_and_falls_back_to_parent() {
        let src = "spec:\n  rules:\n    - name: a\n      ports: [80, 443]\n    - name: b\n";
        let ix = SpanIndex::build(src);
        // A scalar is located at its value.
        assert_eq!(ix.locate("spec.rules[1].name"), Pos { line: 5, col: 13 });
        assert_eq!(
            ix.locate("spec.rules[0].ports[1]"),
            Pos { line: 4, col: 19 }
        );
        // Not present: the nearest ancestor that is (a sequence item, at its first key).
        assert_eq!(ix.locate("spec.rules[1].app"), Pos { line: 5, col: 7 });
        assert_eq!(ix.locate("spec.rules[0]"), Pos { line: 3, col: 7 });
    }
}
