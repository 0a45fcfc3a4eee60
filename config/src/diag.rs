//! Turning TOML text into typed config with errors that name `file:line:col` and the key.
//!
//! Deserialisation goes through `serde_path_to_error`, so every error knows the key path
//! (`storage.loopback[0].size`); the location comes from toml's own span when it has one,
//! else from looking the key path up in toml's span-preserving document tree. Checks that
//! run after deserialisation (cross-field rules) report a key path and get the same treatment.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue};

/// One segment of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A key path such as `storage.loopback[0].size`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    pub fn root() -> Self {
        KeyPath(Vec::new())
    }
    pub fn key(mut self, k: &str) -> Self {
        self.0.push(Seg::Key(k.to_string()));
        self
    }
    pub fn index(mut self, i: usize) -> Self {
        self.0.push(Seg::Index(i));
        self
    }
    /// Parses the dotted form used in code (`"cluster.servers"`, `"storage.loopback[1].name"`).
    pub fn parse(s: &str) -> Self {
        let mut p = KeyPath::root();
        for part in s.split('.').filter(|p| !p.is_empty()) {
            let mut rest = part;
            if let Some(i) = rest.find('[') {
                p = p.key(&rest[..i]);
                rest = &rest[i..];
                while let Some(end) = rest.find(']') {
                    if let Ok(n) = rest[1..end].parse() {
                        p = p.index(n);
                    }
                    rest = &rest[end + 1..];
                }
            } else {
                p = p.key(rest);
            }
        }
        p
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for s in &self.0 {
            match s {
                Seg::Key(k) => {
                    if !first {
                        f.write_str(".")?;
                    }
                    f.write_str(k)?;
                }
                Seg::Index(i) => write!(f, "[{i}]")?,
            }
            first = false;
        }
        Ok(())
    }
}

/// A located config error: `file:line:col: key: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.col)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Diagnostic {}

/// A rule broken after deserialisation: which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: KeyPath,
    pub message: String,
}

impl Invalid {
    pub fn new(key: &str, message: impl Into<String>) -> Self {
        Invalid {
            key: KeyPath::parse(key),
            message: message.into(),
        }
    }
    pub fn at(key: KeyPath, message: impl Into<String>) -> Self {
        Invalid {
            key,
            message: message.into(),
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let col = text[line_start..offset].chars().count() + 1;
    (line, col)
}

/// Byte span of the value at `path` (or of the key itself, when `want_key`).
fn span_of(text: &str, path: &KeyPath, want_key: bool) -> Option<Range<usize>> {
    let doc = DeTable::parse(text).ok()?;
    let mut table: &DeTable<'_> = doc.get_ref();
    let mut value: Option<&toml::Spanned<DeValue<'_>>> = None;
    let mut key_span = None;
    for seg in &path.0 {
        match seg {
            Seg::Key(k) => {
                if let Some(v) = value {
                    match v.get_ref() {
                        DeValue::Table(t) => table = t,
                        _ => return Some(v.span()),
                    }
                }
                let (kk, vv) = table.iter().find(|(kk, _)| kk.get_ref().as_ref() == k)?;
                key_span = Some(kk.span());
                value = Some(vv);
            }
            Seg::Index(i) => {
                let v = value?;
                match v.get_ref() {
                    DeValue::Array(a) => {
                        let item = a.get(*i)?;
                        key_span = Some(item.span());
                        value = Some(item);
                    }
                    _ => return Some(v.span()),
                }
            }
        }
    }
    if want_key {
        key_span
    } else {
        value.map(|v| v.span())
    }
}

/// Locates a post-deserialisation error: the value's span if the key is present, else the
/// nearest enclosing table that is, else the start of the file.
pub fn locate(file: &Path, text: &str, inv: Invalid) -> Diagnostic {
    let mut path = inv.key.clone();
    let span = loop {
        if let Some(s) = span_of(text, &path, false) {
            break s;
        }
        if path.0.pop().is_none() {
            break 0..0;
        }
    };
    let (line, col) = line_col(text, span.start);
    Diagnostic {
        file: file.to_path_buf(),
        line,
        col,
        key: inv.key.to_string(),
        message: inv.message,
    }
}

fn path_from_serde(p: &serde_path_to_error::Path) -> KeyPath {
    use serde_path_to_error::Segment;
    let mut kp = KeyPath::root();
    for s in p.iter() {
        match s {
            Segment::Seq { index } => kp = kp.index(*index),
            Segment::Map { key } => kp = kp.key(key),
            Segment::Enum { variant } => kp = kp.key(variant),
            Segment::Unknown => {}
        }
    }
    kp
}

/// Parses `text` (read from `file`) into `T`; any error is located.
pub fn parse_toml<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, Diagnostic> {
    let de = match toml::Deserializer::parse(text) {
        Ok(de) => de,
        Err(e) => return Err(from_toml_error(file, text, KeyPath::root(), &e)),
    };
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = path_from_serde(e.path());
        from_toml_error(file, text, path, e.inner())
    })
}

fn from_toml_error(file: &Path, text: &str, mut path: KeyPath, e: &toml::de::Error) -> Diagnostic {
    let message = e.message().trim().to_string();
    // For an unknown key the path stops at its table; name the key itself.
    let mut want_key = false;
    if let Some(rest) = message.strip_prefix("missing field `") {
        // A missing key has no span of its own: name it, and point at its table.
        if let Some(end) = rest.find('`') {
            let table = path.clone();
            path = path.key(&rest[..end]);
            let span = span_of(text, &table, false).unwrap_or(0..0);
            let (line, col) = line_col(text, span.start);
            return Diagnostic {
                file: file.to_path_buf(),
                line,
                col,
                key: path.to_string(),
                message,
            };
        }
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some(end) = rest.find('`') {
            let key = &rest[..end];
            // serde_path_to_error may already have put the unknown key on the path.
            if path.0.last() != Some(&Seg::Key(key.to_string())) {
                path = path.key(key);
            }
            want_key = true;
        }
    }
    let span = e
        .span()
        .or_else(|| span_of(text, &path, want_key))
        .unwrap_or(0..0);
    let (line, col) = line_col(text, span.start);
    Diagnostic {
        file: file.to_path_buf(),
        line,
        col,
        key: path.to_string(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_chars() {
        let t = "a = 1\nbé = 2\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 6), (2, 1));
        // "bé " is 4 bytes, 3 chars
        assert_eq!(line_col(t, 10), (2, 4));
    }

    #[test]
    fn keypath_round_trip() {
        let p = KeyPath::parse("storage.loopback[1].name");
        assert_eq!(p.to_string(), "storage.loopback[1].name");
        assert_eq!(p.0.len(), 4);
    }

    #[test]
    fn locate_finds_nested_array_value() {
        let t =
            "[storage]\n[[storage.loopback]]\nname = \"a\"\n[[storage.loopback]]\nname = \"b\"\n";
        let d = locate(
            Path::new("x.toml"),
            t,
            Invalid::new("storage.loopback[1].name", "dup"),
        );
        assert_eq!((d.line, d.col), (5, 8));
        assert_eq!(d.to_string(), "x.toml:5:8: storage.loopback[1].name: dup");
    }

    #[test]
    fn locate_falls_back_to_enclosing_table() {
        let t = "version = 1\n[cluster]\nname = \"x\"\n";
        let d = locate(
            Path::new("c.toml"),
            t,
            Invalid::new("cluster.token", "missing"),
        );
        assert_eq!(d.key, "cluster.token");
        assert_eq!(d.line, 2, "points at the [cluster] header: {d}");
    }
}
