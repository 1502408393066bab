//! The TOML side of config loading: parsing with spans, the unknown- and
//! missing-key checks, deserialisation, and turning a problem found anywhere
//! (parser, serde or the validation rules) into a [`ConfigError`] that names
//! the file line and the key.

use std::fmt;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use serde::de::{self, Visitor};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{
    ConfigError, DiskConfig, Document, HandlersConfig, NetConfig, NodeConfig, ResourceConfig,
    SyncConfig,
};

/// Required keys. The other keys of each section have defaults; serde enforces
/// the same on its own, this list only gives the error its wording and line.
const RESOURCE_REQUIRED: &[&str] = &["name"];
const NODE_REQUIRED: &[&str] = &["name", "address", "disk", "nbd", "control"];

/// The error for a resource without nodes.
pub(super) const NO_NODES: &str = "no [[node]] entries (a resource has one or two)";

/// One step of the way to a value: a table key or an array position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

/// The way from the document root to a value, e.g. `node`, `1`, `nbd`.
pub(super) type KeyPath = Vec<Seg>;

/// The path of `key` in the top-level table `section`.
pub(super) fn section_key(section: &str, key: &str) -> KeyPath {
    vec![Seg::Key(section.to_owned()), Seg::Key(key.to_owned())]
}

/// The path of the `index`th `[[node]]`, or of `key` in it.
pub(super) fn node_path(index: usize, key: Option<&str>) -> KeyPath {
    let mut path = vec![Seg::Key("node".to_owned()), Seg::Index(index)];
    path.extend(key.map(|key| Seg::Key(key.to_owned())));
    path
}

/// How a message names where it is: `[net] ping-timeout`, `[[node]] nbd`,
/// `[[node]]`, or a top-level key.
fn label(path: &[Seg]) -> String {
    let key = |segs: &[Seg]| {
        segs.iter()
            .map(|seg| match seg {
                Seg::Key(key) => key.clone(),
                Seg::Index(index) => index.to_string(),
            })
            .collect::<Vec<_>>()
            .join(".")
    };
    let (section, rest) = match path {
        [Seg::Key(node), Seg::Index(_), rest @ ..] if node == "node" => {
            ("[[node]]".to_owned(), rest)
        }
        [Seg::Key(section), rest @ ..] if !rest.is_empty() => (format!("[{section}]"), rest),
        _ => (String::new(), path),
    };
    match (section.is_empty(), rest.is_empty()) {
        (true, _) => key(rest),
        (false, true) => section,
        (false, false) => format!("{section} {}", key(rest)),
    }
}

/// Where a problem is in the file.
#[derive(Debug)]
enum At {
    /// A byte offset into the text.
    Offset(usize),
    /// A key; if the file does not spell it out (a default), its table.
    Key(KeyPath),
    /// Nowhere in particular (something is missing).
    Nowhere,
}

/// A problem with the config, before the file line is known.
#[derive(Debug)]
pub(super) struct Problem {
    at: At,
    message: String,
}

impl Problem {
    /// A problem with the value at `path`; the message is prefixed with the
    /// section and key.
    pub(super) fn at_key(path: KeyPath, what: impl fmt::Display) -> Self {
        let message = format!("{}: {what}", label(&path));
        Self {
            at: At::Key(path),
            message,
        }
    }

    /// A problem with no place in the file, such as a missing section.
    pub(super) fn nowhere(message: impl Into<String>) -> Self {
        Self {
            at: At::Nowhere,
            message: message.into(),
        }
    }

    fn at_offset(offset: usize, message: impl Into<String>) -> Self {
        Self {
            at: At::Offset(offset),
            message: message.into(),
        }
    }

    /// Where in the text the problem is, if anywhere.
    fn offset(&self, index: &KeyIndex) -> Option<usize> {
        match &self.at {
            At::Offset(offset) => Some(*offset),
            At::Key(path) => index.offset_of(path),
            At::Nowhere => None,
        }
    }
}

/// Where every key and value of the document is, by path.
struct KeyIndex {
    entries: Vec<Entry>,
}

struct Entry {
    path: KeyPath,
    key: Range<usize>,
    value: Range<usize>,
}

impl KeyIndex {
    fn new(root: &DeTable<'_>) -> Self {
        let mut entries = Vec::new();
        Self::add_table(root, &mut Vec::new(), &mut entries);
        Self { entries }
    }

    fn add_table(table: &DeTable<'_>, prefix: &mut KeyPath, entries: &mut Vec<Entry>) {
        for (key, value) in table {
            prefix.push(Seg::Key(key.get_ref().to_string()));
            entries.push(Entry {
                path: prefix.clone(),
                key: key.span(),
                value: value.span(),
            });
            Self::add_value(value.get_ref(), prefix, entries);
            prefix.pop();
        }
    }

    fn add_value(value: &DeValue<'_>, prefix: &mut KeyPath, entries: &mut Vec<Entry>) {
        match value {
            DeValue::Table(table) => Self::add_table(table, prefix, entries),
            DeValue::Array(array) => {
                for (index, element) in array.iter().enumerate() {
                    prefix.push(Seg::Index(index));
                    entries.push(Entry {
                        path: prefix.clone(),
                        key: element.span(),
                        value: element.span(),
                    });
                    Self::add_value(element.get_ref(), prefix, entries);
                    prefix.pop();
                }
            }
            _ => {}
        }
    }

    /// Where `path` is written; for a key the file leaves out, where its
    /// nearest written ancestor is.
    fn offset_of(&self, path: &[Seg]) -> Option<usize> {
        (1..=path.len()).rev().find_map(|len| {
            self.entries
                .iter()
                .find(|entry| entry.path == path[..len])
                .map(|entry| entry.key.start)
        })
    }

    /// The most deeply nested key whose key or value covers `offset`.
    fn path_at(&self, offset: usize) -> Option<&KeyPath> {
        self.entries
            .iter()
            .filter(|entry| entry.key.contains(&offset) || entry.value.contains(&offset))
            .max_by_key(|entry| entry.path.len())
            .map(|entry| &entry.path)
    }
}

/// A config file's text and path, and where its keys are: what it takes to
/// give a problem its file line.
pub(super) struct Source<'a> {
    path: &'a Path,
    text: &'a str,
    index: KeyIndex,
}

impl<'a> Source<'a> {
    /// Parses `text`, checks that it has exactly the known keys and the
    /// required ones, and deserialises it.
    pub(super) fn read(text: &'a str, path: &'a Path) -> Result<(Document, Self), ConfigError> {
        let root = DeTable::parse(text).map_err(|error| syntax_error(text, path, &error))?;
        let source = Self {
            path,
            text,
            index: KeyIndex::new(root.get_ref()),
        };
        let mut problems = KeyProblems::default();
        check_document(root.get_ref(), &mut problems);
        // A misspelt key is also a missing one: the misspelling says more.
        source.first_error(problems.unknown)?;
        source.first_error(problems.missing)?;
        let document = Document::deserialize(toml::de::Deserializer::from(root))
            .map_err(|error| source.error(source.serde_problem(&error)))?;
        Ok((document, source))
    }

    /// Names the key a serde error is about.
    fn serde_problem(&self, error: &toml::de::Error) -> Problem {
        let Some(span) = error.span() else {
            return Problem::nowhere(error.message());
        };
        let message = match self.index.path_at(span.start) {
            Some(path) => format!("{}: {}", label(path), error.message()),
            None => error.message().to_owned(),
        };
        Problem::at_offset(span.start, message)
    }

    /// Fails with the problem that comes first in the file, if there is one.
    pub(super) fn first_error(&self, problems: Vec<Problem>) -> Result<(), ConfigError> {
        // Problems without a place in the file come after all others.
        let order = |problem: &Problem| problem.offset(&self.index).unwrap_or(usize::MAX);
        match problems.into_iter().min_by_key(order) {
            Some(first) => Err(self.error(first)),
            None => Ok(()),
        }
    }

    /// The error for `problem`, with the line it is on.
    fn error(&self, problem: Problem) -> ConfigError {
        let line = problem
            .offset(&self.index)
            .map(|offset| line_at(self.text, offset));
        ConfigError::invalid(self.path, line, &problem.message)
    }
}

/// A TOML syntax error, quoting the offending text when it is short.
fn syntax_error(text: &str, path: &Path, error: &toml::de::Error) -> ConfigError {
    let span = error.span();
    let line = span.clone().map(|span| line_at(text, span.start));
    let near = span
        .and_then(|span| text.get(span))
        .filter(|near| !near.trim().is_empty() && near.len() <= 40 && !near.contains('\n'))
        .map(|near| format!(" (at `{near}`)"))
        .unwrap_or_default();
    let message = format!("not valid TOML: {}{near}", error.message());
    ConfigError::invalid(path, line, &message)
}

/// The 1-based line that byte `offset` of `text` is on.
fn line_at(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    1 + text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

/// What the key checks found.
#[derive(Default)]
struct KeyProblems {
    /// Unknown keys and sections of the wrong shape.
    unknown: Vec<Problem>,
    /// Required keys and sections that are not there.
    missing: Vec<Problem>,
}

/// Collects every unknown key, misshapen section and missing required key.
fn check_document(root: &DeTable<'_>, problems: &mut KeyProblems) {
    let sections = fields_of::<Document>();
    for (key, value) in root {
        let name: &str = key.get_ref();
        let offset = key.span().start;
        let fields = match name {
            "resource" => fields_of::<ResourceConfig>(),
            "net" => fields_of::<NetConfig>(),
            "sync" => fields_of::<SyncConfig>(),
            "disk" => fields_of::<DiskConfig>(),
            "handlers" => fields_of::<HandlersConfig>(),
            "node" => {
                check_nodes(value, problems);
                continue;
            }
            _ => {
                let problem = unknown_section(name, value.get_ref(), offset, sections);
                problems.unknown.push(problem);
                continue;
            }
        };
        match value.get_ref() {
            DeValue::Table(table) => {
                let required = if name == "resource" {
                    RESOURCE_REQUIRED
                } else {
                    &[]
                };
                let section = format!("[{name}]");
                check_table(
                    table,
                    value.span().start,
                    &section,
                    fields,
                    required,
                    problems,
                );
            }
            DeValue::Array(_) => problems.unknown.push(Problem::at_offset(
                offset,
                format!("[{name}] is a single table: write [{name}], not [[{name}]]"),
            )),
            other => problems.unknown.push(Problem::at_offset(
                offset,
                format!(
                    "`{name}` must be the table [{name}], not {}",
                    describe_type(other)
                ),
            )),
        }
    }
    if !root.contains_key("resource") {
        problems.missing.push(Problem::nowhere(
            "missing [resource] section (it must set at least `name`)",
        ));
    }
    if !root.contains_key("node") {
        problems.missing.push(Problem::nowhere(NO_NODES));
    }
}

fn check_nodes(value: &Spanned<DeValue<'_>>, problems: &mut KeyProblems) {
    let misshapen = || {
        Problem::at_offset(
            value.span().start,
            "`node` must be written as [[node]] entries, one per node",
        )
    };
    let DeValue::Array(nodes) = value.get_ref() else {
        problems.unknown.push(misshapen());
        return;
    };
    let fields = fields_of::<NodeConfig>();
    for node in nodes.iter() {
        match node.get_ref() {
            DeValue::Table(table) => check_table(
                table,
                node.span().start,
                "[[node]]",
                fields,
                NODE_REQUIRED,
                problems,
            ),
            _ => problems.unknown.push(misshapen()),
        }
    }
}

/// Checks the keys of one section table that starts at `start`.
fn check_table(
    table: &DeTable<'_>,
    start: usize,
    section: &str,
    fields: &[&str],
    required: &[&str],
    problems: &mut KeyProblems,
) {
    for key in table.keys() {
        let name: &str = key.get_ref();
        if fields.contains(&name) {
            continue;
        }
        let dashed = name.replace('_', "-");
        let hint = if fields.contains(&dashed.as_str()) {
            format!("did you mean `{dashed}`? keys use dashes")
        } else {
            format!("expected one of: {}", fields.join(", "))
        };
        problems.unknown.push(Problem::at_offset(
            key.span().start,
            format!(
                "unknown key `{}` in {section} ({hint})",
                name.escape_debug()
            ),
        ));
    }
    for name in required {
        if !table.contains_key(*name) {
            problems.missing.push(Problem::at_offset(
                start,
                format!("{section} is missing the required key `{name}`"),
            ));
        }
    }
}

fn unknown_section(name: &str, value: &DeValue<'_>, offset: usize, sections: &[&str]) -> Problem {
    let expected = sections
        .iter()
        .map(|&section| match section {
            "node" => "[[node]]".to_owned(),
            _ => format!("[{section}]"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let name = name.escape_debug();
    let what = match value {
        DeValue::Table(_) => format!("unknown section [{name}]"),
        DeValue::Array(array) if array.iter().all(|e| e.get_ref().is_table()) => {
            format!("unknown section [[{name}]]")
        }
        _ => format!("unknown key `{name}` at the top level"),
    };
    Problem::at_offset(offset, format!("{what} (expected one of: {expected})"))
}

fn describe_type(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// The keys a derived `Deserialize` accepts, asked of serde itself (it passes
/// them to `deserialize_struct`), so that the unknown-key check cannot drift
/// from the structs.
fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    // The probe always fails after recording the field names.
    let _ = T::deserialize(FieldProbe(&mut fields));
    fields
}

struct FieldProbe<'a>(&'a mut &'static [&'static str]);

impl<'de> de::Deserializer<'de> for FieldProbe<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("only structs can be probed"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("probed"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}
