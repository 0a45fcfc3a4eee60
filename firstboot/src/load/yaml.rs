//! A small YAML reader for the cloud-init files on the boot partition: a tree of mappings,
//! sequences and scalars, each with its line and column, built from saphyr-parser's events.
//!
//! The files are hostile input, so the tree is bounded: aliases are refused (no "billion
//! laughs"), at most [`MAX_NODES`] nodes and [`MAX_DEPTH`] levels. Scalars stay strings with
//! their style; the readers decide what a `true` or a number means (cloud-init uses YAML 1.1,
//! where `yes`/`on` are booleans too).

use std::fmt;

use saphyr_parser::{Event, Parser, ScalarStyle};

pub const MAX_NODES: usize = 20_000;
pub const MAX_DEPTH: usize = 32;

/// Where a node starts: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A scalar; `plain` when written without quotes (only then is `true` a boolean or
    /// `null` a null).
    Scalar {
        text: String,
        plain: bool,
        pos: Pos,
    },
    Seq {
        items: Vec<Node>,
        pos: Pos,
    },
    /// Keys in file order (cloud-init files are small; a later duplicate wins, as in PyYAML).
    Map {
        entries: Vec<(Node, Node)>,
        pos: Pos,
    },
}

impl Node {
    pub fn pos(&self) -> Pos {
        match self {
            Node::Scalar { pos, .. } | Node::Seq { pos, .. } | Node::Map { pos, .. } => *pos,
        }
    }

    /// The entries of a mapping with scalar keys, in order (later duplicates win when looked
    /// up with [`Node::get`]).
    pub fn entries(&self) -> Option<Vec<(&str, &Node)>> {
        match self {
            Node::Map { entries, .. } => Some(
                entries
                    .iter()
                    .filter_map(|(k, v)| k.as_str().map(|k| (k, v)))
                    .collect(),
            ),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map { entries, .. } => entries
                .iter()
                .rev()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// A scalar's text (any style).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// `null`, `~` or an empty plain scalar.
    pub fn is_null(&self) -> bool {
        matches!(self, Node::Scalar { text, plain: true, .. }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// A YAML 1.1 boolean, as cloud-init's PyYAML reads it.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Node::Scalar {
                text, plain: true, ..
            } => match text.to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "y" => Some(true),
                "false" | "no" | "off" | "n" => Some(false),
                _ => None,
            },
            _ => None,
        }
    }

    /// A short name of the node's kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Node::Scalar { .. } if self.is_null() => "null",
            Node::Scalar { .. } => "a scalar",
            Node::Seq { .. } => "a list",
            Node::Map { .. } => "a mapping",
        }
    }
}

/// Why a YAML file could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    pub pos: Pos,
    pub message: String,
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.pos, self.message)
    }
}

/// Parses the first document of `text`; `None` for an empty file (comments only).
pub fn parse(text: &str) -> Result<Option<Node>, YamlError> {
    let mut b = Builder {
        events: Parser::new_from_str(text),
        nodes: 0,
    };
    loop {
        let (ev, pos) = b.next()?;
        match ev {
            Event::StreamStart | Event::DocumentStart(_) | Event::Nothing => {}
            Event::StreamEnd | Event::DocumentEnd => return Ok(None),
            other => return b.node(other, pos, 0).map(Some),
        }
    }
}

struct Builder<'a> {
    events: Parser<'a, saphyr_parser::StrInput<'a>>,
    nodes: usize,
}

impl<'a> Builder<'a> {
    fn next(&mut self) -> Result<(Event<'a>, Pos), YamlError> {
        match self.events.next_event() {
            Some(Ok((ev, span))) => Ok((
                ev,
                Pos {
                    line: span.start.line(),
                    col: span.start.col() + 1,
                },
            )),
            Some(Err(e)) => Err(YamlError {
                pos: Pos {
                    line: e.marker().line(),
                    col: e.marker().col() + 1,
                },
                message: e.info().to_string(),
            }),
            None => Err(YamlError {
                pos: Pos::default(),
                message: "unexpected end of the file".into(),
            }),
        }
    }

    fn node(&mut self, ev: Event<'a>, pos: Pos, depth: usize) -> Result<Node, YamlError> {
        self.nodes += 1;
        let err = |message: String| Err(YamlError { pos, message });
        if self.nodes > MAX_NODES {
            return err(format!(
                "more than {MAX_NODES} values; not a file Imager writes"
            ));
        }
        if depth > MAX_DEPTH {
            return err(format!("nested deeper than {MAX_DEPTH} levels"));
        }
        match ev {
            Event::Scalar(text, style, _, _) => Ok(Node::Scalar {
                text: text.into_owned(),
                plain: style == ScalarStyle::Plain,
                pos,
            }),
            Event::SequenceStart(_, _) => {
                let mut items = Vec::new();
                loop {
                    let (ev, p) = self.next()?;
                    if ev == Event::SequenceEnd {
                        return Ok(Node::Seq { items, pos });
                    }
                    items.push(self.node(ev, p, depth + 1)?);
                }
            }
            Event::MappingStart(_, _) => {
                let mut entries = Vec::new();
                loop {
                    let (ev, p) = self.next()?;
                    if ev == Event::MappingEnd {
                        return Ok(Node::Map { entries, pos });
                    }
                    let key = self.node(ev, p, depth + 1)?;
                    let (ev, p) = self.next()?;
                    let value = self.node(ev, p, depth + 1)?;
                    entries.push((key, value));
                }
            }
            Event::Alias(_) => {
                err("aliases (`*name`) are not accepted in boot-partition files".into())
            }
            other => err(format!("unexpected YAML event {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_lists_and_positions() {
        let t = "#cloud-config\nhostname: pi\nusers:\n  - name: bob\n    lock_passwd: false\n";
        let n = parse(t).unwrap().unwrap();
        assert_eq!(n.get("hostname").unwrap().as_str(), Some("pi"));
        let users = n.get("users").unwrap();
        let Node::Seq { items, .. } = users else {
            panic!("{users:?}")
        };
        assert_eq!(
            items[0].get("name").unwrap().pos(),
            Pos { line: 4, col: 11 }
        );
        assert_eq!(items[0].get("lock_passwd").unwrap().as_bool(), Some(false));
    }

    #[test]
    fn quoted_true_is_a_string_and_yaml11_booleans_count() {
        let n = parse("a: \"true\"\nb: yes\nc: ~\n").unwrap().unwrap();
        assert_eq!(n.get("a").unwrap().as_bool(), None);
        assert_eq!(n.get("b").unwrap().as_bool(), Some(true));
        assert!(n.get("c").unwrap().is_null());
    }

    #[test]
    fn empty_aliases_and_errors() {
        assert_eq!(parse("# nothing\n").unwrap(), None);
        assert_eq!(parse("   \n\n").unwrap(), None);
        let e = parse("a: &x [1, 2]\nb: *x\n").unwrap_err();
        assert!(e.message.contains("aliases"), "{e}");
        assert_eq!(e.pos.line, 2);
        let e = parse("a: [1, 2\n").unwrap_err();
        assert!(e.pos.line >= 1, "{e}");
        let deep = "a: ".to_string() + &"[".repeat(40) + &"]".repeat(40);
        assert!(parse(&deep).unwrap_err().message.contains("deeper"));
    }
}
