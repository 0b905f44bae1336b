//! An independent comparator ("oracle") of a table and its index, for tests.
//!
//! It shares no code with the walsync crate: no codec, no document builder, no comparison core.
//! Everything it needs is reimplemented here from the documented contract (docs/events.md, "Types
//! as JSON", and the `_id` rule of src/sink/document.rs's module documentation), so a bug in
//! walsync's own code cannot hide by being on both sides of the comparison.
//!
//! - **The table side** is read with `SELECT row_to_json(t)::text FROM schema.table t` on a
//!   connection that pins the same session settings walsync's source pins (`DateStyle=ISO`,
//!   `IntervalStyle=iso_8601`, `TimeZone=UTC`, `extra_float_digits=3`, `bytea_output=hex`,
//!   `client_encoding=UTF8`). Column types come from `pg_attribute`/`pg_type` (domains through
//!   `typbasetype`, enums by `typtype = 'e'`, arrays through `typelem`), and each value
//!   `row_to_json` printed is mapped to the value the document must hold.
//! - **The index side** is read over plain HTTP (refresh, then a scroll over `_search` sorted by
//!   `_doc`), each `_source` kept as its raw text. The metadata field `walsync` is ignored, and a
//!   document whose `walsync.deleted` is `true` (a soft tombstone) counts as absent.
//!
//! Both sides are parsed by the small JSON reader below, which keeps every number as the text it
//! was written with. Numbers are compared as exact decimals (sign, significant digits, exponent),
//! never through `f64`: `0.9407462388099621` and `0.940746238809962` differ, `1.50` and `1.5`
//! are equal. A `numeric` column must appear as a string with exactly PostgreSQL's digits (`"19.90"`
//! is not `"19.9"`).
//!
//! The mapping, by the column's type (domains as their base type):
//!
//! | type | `row_to_json` prints | the document must hold |
//! |---|---|---|
//! | `bool` | `true` | the same boolean |
//! | `int2`, `int4`, `int8`, `oid` | a number (`oid`: a string) | a number, the same decimal |
//! | `float4`, `float8` | a number; `"NaN"`, `"Infinity"`, `"-Infinity"` | a number, the same decimal (and sign of zero); those three strings |
//! | `numeric` | a number; `"NaN"`, `"Infinity"`, `"-Infinity"` | a string of exactly those characters |
//! | `json`, `jsonb` | embedded JSON | structurally equal JSON, numbers as exact decimals, key order ignored |
//! | `date`, `timestamp` | `2024-01-02`, `2024-01-02T03:04:05.5`, `… BC` | the same, BC years astronomical (`-0043`), years past 9999 with `+` |
//! | `timestamptz` | `2024-01-02T03:04:05.5+00:00` | `2024-01-02T03:04:05.5Z` |
//! | `bytea` | `"\\x0a0b"` | standard padded base64 (`"Cgs="`) |
//! | arrays | JSON arrays (`numeric` elements as numbers) | JSON arrays, element by element by the element type (`numeric` elements as strings) |
//! | `interval` | ISO 8601 (`P1Y2M-3DT4H5M6.5S`, IntervalStyle `iso_8601`) | the same string: walsync passes the server's text through |
//! | everything else (text, enums, `uuid`, `time`, `timetz`, `money`, ranges, …) | a string | the same string |
//!
//! Composite columns (which `row_to_json` nests as objects while walsync writes their text) are
//! not supported. The table settings that shape a document (`key_columns`, `include_columns`,
//! `exclude_columns`, `rename`) are given to the oracle as a [`Shape`] of plain names and
//! applied here by their documented meaning (docs/configuration.md: include, then exclude, then
//! rename; the id from the key columns' values whether or not they are kept). Generated columns
//! are left out, as pgoutput leaves them out.
//!
//! Document ids: one key column gives the value's text (a string as is, a number as its digits,
//! a bytea key as its base64 text, an array key as its compact JSON); several give a compact JSON
//! array of the values in key order (`[7,"a-1"]`, strings escaped as serde_json escapes them); an
//! id over 512 bytes becomes `sha256:` and the 64 hex digits of its SHA-256.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use base64::Engine as _;
use elasticsearch::Elasticsearch;
use elasticsearch::http::Method;
use elasticsearch::http::headers::{CONTENT_TYPE, HeaderMap, HeaderValue};
use elasticsearch::http::transport::Transport;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::stack;

/// The session settings walsync's source connections pin (src/postgres/types.rs), set here by
/// hand so that the two sides print values the same way.
const SESSION_SQL: &str = "SET DateStyle = 'ISO'; SET IntervalStyle = 'iso_8601'; \
     SET TimeZone = 'UTC'; SET extra_float_digits = 3; SET bytea_output = 'hex'; \
     SET client_encoding = 'UTF8'";

/// Elasticsearch refuses longer `_id`s; walsync hashes them.
const MAX_ID_BYTES: usize = 512;

/// Examples a report prints at most.
const SHOWN_EXAMPLES: usize = 20;

/// Documents per scroll page.
const PAGE_SIZE: usize = 500;

// --- a JSON reader that keeps numbers as text -------------------------------------------------

/// A JSON value whose numbers are the exact text they were written with.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Number(String),
    String(String),
    Array(Vec<Json>),
    /// Members in the order they were written.
    Object(Vec<(String, Json)>),
}

impl Json {
    /// The value of member `name` of an object (the last one, if it repeats).
    pub fn get(&self, name: &str) -> Option<&Json> {
        match self {
            Json::Object(members) => members.iter().rev().find(|(n, _)| n == name).map(|m| &m.1),
            _ => None,
        }
    }
}

/// Compact JSON text: numbers exactly as read, strings escaped as serde_json escapes them.
impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        write_json(self, &mut out);
        f.write_str(&out)
    }
}

fn write_json(value: &Json, out: &mut String) {
    match value {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(text) => out.push_str(text),
        Json::String(text) => write_json_string(text, out),
        Json::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(item, out);
            }
            out.push(']');
        }
        Json::Object(members) => {
            out.push('{');
            for (i, (name, item)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_string(name, out);
                out.push(':');
                write_json(item, out);
            }
            out.push('}');
        }
    }
}

/// A JSON string literal, escaped the way serde_json writes one: `"` and `\` with a backslash,
/// `\b \t \n \f \r` short, other control characters below U+0020 as `\u00xx` (lower-case hex),
/// everything else (U+007F and all non-ASCII included) as is.
pub fn write_json_string(text: &str, out: &mut String) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Parses one JSON text (surrounding whitespace allowed).
pub fn parse_json(text: &str) -> Result<Json, String> {
    let mut reader = Reader {
        text,
        bytes: text.as_bytes(),
        position: 0,
    };
    reader.whitespace();
    let value = reader.value(0)?;
    reader.whitespace();
    if reader.position != reader.bytes.len() {
        return Err(reader.error("text after the value"));
    }
    Ok(value)
}

struct Reader<'a> {
    text: &'a str,
    bytes: &'a [u8],
    position: usize,
}

impl Reader<'_> {
    fn error(&self, what: &str) -> String {
        format!("invalid JSON at byte {}: {what}", self.position)
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.position).copied()
    }

    fn whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.position += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), String> {
        if self.peek() == Some(byte) {
            self.position += 1;
            Ok(())
        } else {
            Err(self.error(&format!("expected {:?}", byte as char)))
        }
    }

    fn literal(&mut self, word: &str, value: Json) -> Result<Json, String> {
        if self.text[self.position..].starts_with(word) {
            self.position += word.len();
            Ok(value)
        } else {
            Err(self.error(&format!("expected {word}")))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > 1_000 {
            return Err(self.error("nested too deeply"));
        }
        match self.peek() {
            Some(b'n') => self.literal("null", Json::Null),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'"') => Ok(Json::String(self.string()?)),
            Some(b'-' | b'0'..=b'9') => Ok(Json::Number(self.number()?)),
            Some(b'[') => {
                self.position += 1;
                let mut items = Vec::new();
                self.whitespace();
                if self.peek() == Some(b']') {
                    self.position += 1;
                    return Ok(Json::Array(items));
                }
                loop {
                    self.whitespace();
                    items.push(self.value(depth + 1)?);
                    self.whitespace();
                    match self.peek() {
                        Some(b',') => self.position += 1,
                        Some(b']') => {
                            self.position += 1;
                            return Ok(Json::Array(items));
                        }
                        _ => return Err(self.error("expected , or ]")),
                    }
                }
            }
            Some(b'{') => {
                self.position += 1;
                let mut members = Vec::new();
                self.whitespace();
                if self.peek() == Some(b'}') {
                    self.position += 1;
                    return Ok(Json::Object(members));
                }
                loop {
                    self.whitespace();
                    if self.peek() != Some(b'"') {
                        return Err(self.error("expected a member name"));
                    }
                    let name = self.string()?;
                    self.whitespace();
                    self.expect(b':')?;
                    self.whitespace();
                    let value = self.value(depth + 1)?;
                    members.push((name, value));
                    self.whitespace();
                    match self.peek() {
                        Some(b',') => self.position += 1,
                        Some(b'}') => {
                            self.position += 1;
                            return Ok(Json::Object(members));
                        }
                        _ => return Err(self.error("expected , or }")),
                    }
                }
            }
            _ => Err(self.error("expected a value")),
        }
    }

    /// A number by JSON's grammar, returned as its text.
    fn number(&mut self) -> Result<String, String> {
        let start = self.position;
        if self.peek() == Some(b'-') {
            self.position += 1;
        }
        match self.peek() {
            Some(b'0') => self.position += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.error("expected a digit")),
        }
        if self.peek() == Some(b'.') {
            self.position += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.error("expected a digit after ."));
            }
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.position += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.position += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.error("expected an exponent"));
            }
            self.digits();
        }
        Ok(self.text[start..self.position].to_owned())
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.position += 1;
        }
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let hex = self
            .text
            .get(self.position..self.position + 4)
            .ok_or_else(|| self.error("short \\u escape"))?;
        let value = u32::from_str_radix(hex, 16).map_err(|_| self.error("bad \\u escape"))?;
        self.position += 4;
        Ok(value)
    }

    fn string(&mut self) -> Result<String, String> {
        self.expect(b'"')?;
        let mut out = String::new();
        let mut run = self.position;
        loop {
            match self.peek() {
                None => return Err(self.error("unterminated string")),
                Some(b'"') => {
                    out.push_str(&self.text[run..self.position]);
                    self.position += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    out.push_str(&self.text[run..self.position]);
                    self.position += 1;
                    let escape = self.peek().ok_or_else(|| self.error("short escape"))?;
                    self.position += 1;
                    match escape {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let first = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&first) {
                                if !self.text[self.position..].starts_with("\\u") {
                                    return Err(self.error("lone high surrogate"));
                                }
                                self.position += 2;
                                let second = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&second) {
                                    return Err(self.error("bad low surrogate"));
                                }
                                0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
                            } else {
                                first
                            };
                            out.push(
                                char::from_u32(code)
                                    .ok_or_else(|| self.error("escape is not a character"))?,
                            );
                        }
                        _ => return Err(self.error("unknown escape")),
                    }
                    run = self.position;
                }
                Some(byte) if byte < 0x20 => {
                    return Err(self.error("control character in a string"));
                }
                Some(_) => self.position += 1,
            }
        }
    }
}

// --- exact decimals -----------------------------------------------------------------------------

/// A decimal number normalised: `value = (−1)^negative × 0.DIGITS × 10^exponent`, `digits`
/// without leading or trailing zeros. Zero is `digits == ""`, not negative, exponent 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decimal {
    pub negative: bool,
    pub digits: String,
    pub exponent: i128,
}

/// Normalises a number's text (`-12.50e+3`, `1E100`, `0.000`); `None` for anything else.
pub fn decimal(text: &str) -> Option<Decimal> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(at) => (&rest[..at], rest[at + 1..].parse::<i128>().ok()?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let all = format!("{int}{frac}");
    let significant = all.trim_start_matches('0');
    if significant.is_empty() {
        return Some(Decimal {
            negative: false,
            digits: String::new(),
            exponent: 0,
        });
    }
    let leading_zeros = (all.len() - significant.len()) as i128;
    Some(Decimal {
        negative,
        digits: significant.trim_end_matches('0').to_owned(),
        exponent: exponent.checked_add(int.len() as i128 - leading_zeros)?,
    })
}

/// Whether two number texts denote the same decimal value; texts that are not numbers are
/// compared as text.
pub fn same_decimal(a: &str, b: &str) -> bool {
    match (decimal(a), decimal(b)) {
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    }
}

/// The same float: the same decimal value, and the same sign when it is zero (`-0` is a
/// distinct float8).
pub fn same_float(a: &str, b: &str) -> bool {
    let negative_zero =
        |t: &str| t.starts_with('-') && decimal(t).is_some_and(|d| d.digits.is_empty());
    same_decimal(a, b) && negative_zero(a) == negative_zero(b)
}

/// Structural JSON equality: numbers as exact decimals, object members in any order.
pub fn same_json(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Null, Json::Null) => true,
        (Json::Bool(a), Json::Bool(b)) => a == b,
        (Json::Number(a), Json::Number(b)) => same_decimal(a, b),
        (Json::String(a), Json::String(b)) => a == b,
        (Json::Array(a), Json::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same_json(a, b))
        }
        (Json::Object(a), Json::Object(b)) => {
            // Repeated names (possible in `json`): the last one counts, as for most readers.
            let a: BTreeMap<&str, &Json> = a.iter().map(|(n, v)| (n.as_str(), v)).collect();
            let b: BTreeMap<&str, &Json> = b.iter().map(|(n, v)| (n.as_str(), v)).collect();
            a.len() == b.len()
                && a.iter()
                    .all(|(name, a)| b.get(name).is_some_and(|b| same_json(a, b)))
        }
        _ => false,
    }
}

// --- value mapping --------------------------------------------------------------------------------

/// How a column's values are mapped and compared (domains resolved to their base type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Integer,
    Float,
    Numeric,
    Json,
    Date,
    Timestamp,
    Timestamptz,
    Bytea,
    /// Everything printed as its text form: text types, enums, uuid, interval, time, …
    Text,
    Array(Box<Kind>),
    /// A composite type (named): not supported.
    Composite(String),
}

/// The kind of a base type of `pg_catalog` by its name.
pub fn base_kind(type_name: &str) -> Kind {
    match type_name {
        "bool" => Kind::Bool,
        "int2" | "int4" | "int8" | "oid" => Kind::Integer,
        "float4" | "float8" => Kind::Float,
        "numeric" => Kind::Numeric,
        "json" | "jsonb" => Kind::Json,
        "date" => Kind::Date,
        "timestamp" => Kind::Timestamp,
        "timestamptz" => Kind::Timestamptz,
        "bytea" => Kind::Bytea,
        _ => Kind::Text,
    }
}

/// The value a document must hold for a value `row_to_json` printed for a column of `kind`.
pub fn expected_value(kind: &Kind, row: &Json) -> Result<Json, String> {
    let unexpected = || Err(format!("row_to_json printed {row} for a {kind:?} column"));
    Ok(match (kind, row) {
        (_, Json::Null) => Json::Null,
        (Kind::Composite(name), _) => {
            return Err(format!(
                "composite type {name}: not supported by the oracle"
            ));
        }
        // Elements of a multi-dimensional array are arrays of the same kind.
        (Kind::Array(element), Json::Array(items)) => Json::Array(
            items
                .iter()
                .map(|item| match item {
                    Json::Array(_) => expected_value(kind, item),
                    _ => expected_value(element, item),
                })
                .collect::<Result<_, _>>()?,
        ),
        (Kind::Bool, Json::Bool(b)) => Json::Bool(*b),
        (Kind::Integer, Json::Number(text) | Json::String(text)) => Json::Number(text.clone()),
        (Kind::Float, Json::Number(text)) => Json::Number(text.clone()),
        (Kind::Float | Kind::Numeric, Json::String(text))
            if matches!(text.as_str(), "NaN" | "Infinity" | "-Infinity") =>
        {
            Json::String(text.clone())
        }
        (Kind::Numeric, Json::Number(text)) => Json::String(text.clone()),
        (Kind::Json, value) => value.clone(),
        (Kind::Date | Kind::Timestamp, Json::String(text)) => Json::String(iso_datetime(text)?),
        (Kind::Timestamptz, Json::String(text)) => Json::String(utc_timestamp(text)?),
        (Kind::Bytea, Json::String(text)) => Json::String(bytea_base64(text)?),
        (Kind::Text, Json::String(text)) => Json::String(text.clone()),
        _ => return unexpected(),
    })
}

/// Whether a document's field equals the expected value (from [`expected_value`]).
pub fn same_value(kind: &Kind, expected: &Json, actual: &Json) -> bool {
    match (kind, expected, actual) {
        (_, Json::Null, Json::Null) => true,
        (_, Json::Null, _) | (_, _, Json::Null) => false,
        (Kind::Array(element), Json::Array(expected), Json::Array(actual)) => {
            expected.len() == actual.len()
                && expected.iter().zip(actual).all(|(e, a)| match e {
                    Json::Array(_) => same_value(kind, e, a),
                    _ => same_value(element, e, a),
                })
        }
        (Kind::Array(_), _, _) => false,
        (Kind::Json, expected, actual) => same_json(expected, actual),
        (Kind::Bool, Json::Bool(e), Json::Bool(a)) => e == a,
        (Kind::Integer, Json::Number(e), Json::Number(a)) => same_decimal(e, a),
        (Kind::Float, Json::Number(e), Json::Number(a)) => same_float(e, a),
        // Numeric digit for digit; the non-finite float and numeric strings; every text form.
        (_, Json::String(e), Json::String(a)) => e == a,
        _ => false,
    }
}

/// A `date` or `timestamp` as `row_to_json` prints it (`0044-03-15 BC`, `10000-01-01`,
/// `infinity`) in ISO 8601 with astronomical, expanded years (`-0043-03-15`, `+10000-01-01`).
pub fn iso_datetime(text: &str) -> Result<String, String> {
    if matches!(text, "infinity" | "-infinity") {
        return Ok(text.to_owned());
    }
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(body) => (body, true),
        None => (text, false),
    };
    let dash = body
        .find('-')
        .ok_or_else(|| format!("not a date: {text:?}"))?;
    let year: i64 = body[..dash]
        .parse()
        .map_err(|_| format!("not a year in {text:?}"))?;
    let year = if bc { 1 - year } else { year };
    let year = if year < 0 {
        format!("-{:04}", -year)
    } else if year > 9999 {
        format!("+{year}")
    } else {
        format!("{year:04}")
    };
    Ok(format!("{year}{}", &body[dash..]))
}

/// A `timestamptz` as `row_to_json` prints it in a UTC session (`2024-01-02T03:04:05.5+00:00`)
/// as the document holds it (`2024-01-02T03:04:05.5Z`).
pub fn utc_timestamp(text: &str) -> Result<String, String> {
    if matches!(text, "infinity" | "-infinity") {
        return Ok(text.to_owned());
    }
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(body) => (body, " BC"),
        None => (text, ""),
    };
    let local = body
        .strip_suffix("+00:00")
        .ok_or_else(|| format!("timestamptz not in UTC: {text:?} (is TimeZone UTC?)"))?;
    Ok(format!("{}Z", iso_datetime(&format!("{local}{bc}"))?))
}

/// A `bytea` as `row_to_json` prints it with `bytea_output=hex` (`\x0a0b`) in standard padded
/// base64 (`Cgs=`).
pub fn bytea_base64(text: &str) -> Result<String, String> {
    let hex = text
        .strip_prefix("\\x")
        .ok_or_else(|| format!("bytea not in hex format: {text:?}"))?;
    if hex.len() % 2 != 0 {
        return Err(format!("odd number of hex digits in {text:?}"));
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| format!("not hex: {text:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The `_id` of the document of a row whose key columns hold `key` (document values, in key
/// order): see the module documentation.
pub fn document_id(key: &[Json]) -> Result<String, String> {
    fn check(value: &Json) -> Result<(), String> {
        match value {
            Json::Null => Err("a key column is null".to_owned()),
            Json::Object(_) => Err(format!("a key value is an object: {value}")),
            // An array key's id is its compact JSON; objects inside (jsonb[]) keep the source's
            // spacing, which this reader does not reproduce.
            Json::Array(items) if items.iter().any(|i| matches!(i, Json::Object(_))) => Err(
                format!("an array key holding objects is not supported by the oracle: {value}"),
            ),
            _ => Ok(()),
        }
    }
    let id = match key {
        [] => return Err("no key columns".to_owned()),
        [single] => {
            check(single)?;
            match single {
                Json::String(text) => text.clone(),
                other => other.to_string(),
            }
        }
        several => {
            for value in several {
                check(value)?;
            }
            Json::Array(several.to_vec()).to_string()
        }
    };
    if id.is_empty() {
        return Err("the key is an empty string".to_owned());
    }
    if id.len() <= MAX_ID_BYTES {
        return Ok(id);
    }
    let mut hashed = String::from("sha256:");
    for byte in Sha256::digest(id.as_bytes()).iter() {
        let _ = write!(hashed, "{byte:02x}");
    }
    Ok(hashed)
}

// --- the report -----------------------------------------------------------------------------------

/// One document that differs from its row: the first differing field (in column order, then
/// fields the table lacks) with both values as text, and every differing field's name.
#[derive(Debug, Clone)]
pub struct Difference {
    pub id: String,
    pub field: String,
    /// The value the document should hold (`<absent>` for a field the table lacks).
    pub expected: String,
    /// The document's value (`<absent>` when the field is missing).
    pub actual: String,
    pub fields: Vec<String>,
}

/// What the oracle found for one table.
#[derive(Debug, Clone, Default)]
pub struct OracleReport {
    pub table: String,
    pub alias: String,
    pub rows: usize,
    /// Documents that are not soft tombstones.
    pub documents: usize,
    pub tombstones: usize,
    /// Ids of rows without a document.
    pub missing: Vec<String>,
    /// Ids of documents without a row.
    pub extra: Vec<String>,
    pub differing: Vec<Difference>,
    /// A short excerpt of each missing row, by id (for the printed examples).
    pub missing_rows: BTreeMap<String, String>,
    /// A short excerpt of each extra document, by id.
    pub extra_documents: BTreeMap<String, String>,
}

impl OracleReport {
    pub fn is_equal(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.differing.is_empty()
    }

    /// For each field, the number of documents in which it differs, most frequent first.
    pub fn differing_fields(&self) -> Vec<(String, usize)> {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for difference in &self.differing {
            for field in &difference.fields {
                *counts.entry(field.as_str()).or_default() += 1;
            }
        }
        let mut counts: Vec<(String, usize)> =
            counts.into_iter().map(|(f, n)| (f.to_owned(), n)).collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        counts
    }

    /// Up to `limit` differences, taken in turn from each first differing field, so that every
    /// kind of difference shows.
    fn examples(&self, limit: usize) -> Vec<&Difference> {
        let mut by_field: BTreeMap<&str, Vec<&Difference>> = BTreeMap::new();
        for difference in &self.differing {
            by_field
                .entry(difference.field.as_str())
                .or_default()
                .push(difference);
        }
        let mut queues: Vec<std::vec::IntoIter<&Difference>> =
            by_field.into_values().map(Vec::into_iter).collect();
        let mut chosen = Vec::new();
        while chosen.len() < limit {
            let before = chosen.len();
            for queue in &mut queues {
                if chosen.len() < limit
                    && let Some(difference) = queue.next()
                {
                    chosen.push(difference);
                }
            }
            if chosen.len() == before {
                break;
            }
        }
        chosen
    }
}

fn shorten(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

impl fmt::Display for OracleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} vs index {}: {} rows, {} documents ({} soft tombstones ignored): ",
            self.table, self.alias, self.rows, self.documents, self.tombstones
        )?;
        if self.is_equal() {
            return writeln!(f, "equal");
        }
        writeln!(
            f,
            "{} missing, {} extra, {} differing",
            self.missing.len(),
            self.extra.len(),
            self.differing.len()
        )?;
        if !self.differing.is_empty() {
            let fields: Vec<String> = self
                .differing_fields()
                .iter()
                .map(|(field, n)| format!("{field} ×{n}"))
                .collect();
            writeln!(f, "  documents differing per field: {}", fields.join(", "))?;
        }
        // At most SHOWN_EXAMPLES examples, shared among missing, extra and differing.
        let missing = self.missing.len().min(SHOWN_EXAMPLES / 4);
        let extra = self.extra.len().min(SHOWN_EXAMPLES / 4);
        let differing = self.differing.len().min(SHOWN_EXAMPLES - missing - extra);
        for id in &self.missing[..missing] {
            let row = self.missing_rows.get(id).map(String::as_str).unwrap_or("");
            writeln!(f, "  missing  id={}: row {}", shorten(id, 80), row)?;
        }
        for id in &self.extra[..extra] {
            let doc = self
                .extra_documents
                .get(id)
                .map(String::as_str)
                .unwrap_or("");
            writeln!(f, "  extra    id={}: document {}", shorten(id, 80), doc)?;
        }
        for difference in self.examples(differing) {
            writeln!(
                f,
                "  differs  id={} field {}: table {} | index {}{}",
                shorten(&difference.id, 80),
                difference.field,
                shorten(&difference.expected, 160),
                shorten(&difference.actual, 160),
                if difference.fields.len() > 1 {
                    format!(" (fields differing: {})", difference.fields.join(", "))
                } else {
                    String::new()
                }
            )?;
        }
        let omitted = self.missing.len() + self.extra.len() + self.differing.len()
            - missing
            - extra
            - differing;
        if omitted > 0 {
            writeln!(f, "  … and {omitted} more")?;
        }
        Ok(())
    }
}

// --- reading both sides ---------------------------------------------------------------------------

/// How a table's rows become documents, as the table's settings say (all empty: every column
/// under its own name, the id from the primary key).
#[derive(Debug, Clone, Default)]
pub struct Shape {
    /// The columns the id is made of, in order; empty for the primary key.
    pub key: Vec<String>,
    /// Only these columns become fields (empty: all).
    pub include: BTreeSet<String>,
    pub exclude: BTreeSet<String>,
    /// Column → field name.
    pub rename: BTreeMap<String, String>,
}

impl Shape {
    fn keeps(&self, column: &str) -> bool {
        (self.include.is_empty() || self.include.contains(column)) && !self.exclude.contains(column)
    }

    fn field<'a>(&'a self, column: &'a str) -> &'a str {
        self.rename.get(column).map_or(column, String::as_str)
    }
}

/// A connection to each side; reusable for many comparisons.
pub struct Oracle {
    pg: tokio_postgres::Client,
    search: Elasticsearch,
}

/// One table as the oracle reads it.
struct TableSide {
    /// Columns in attribute order, with their kinds.
    columns: Vec<(String, Kind)>,
    /// Expected documents by id (field → expected value).
    rows: BTreeMap<String, BTreeMap<String, Json>>,
}

#[derive(Deserialize)]
struct SearchPage<'a> {
    #[serde(rename = "_scroll_id")]
    scroll_id: Option<String>,
    #[serde(borrow)]
    hits: Hits<'a>,
}

#[derive(Deserialize)]
struct Hits<'a> {
    #[serde(borrow)]
    hits: Vec<Hit<'a>>,
}

#[derive(Deserialize)]
struct Hit<'a> {
    #[serde(rename = "_id")]
    id: String,
    #[serde(rename = "_source", borrow)]
    source: &'a serde_json::value::RawValue,
}

impl Oracle {
    pub async fn connect() -> Self {
        let (pg, connection) = tokio_postgres::connect(&stack().pg_url, tokio_postgres::NoTls)
            .await
            .expect("the oracle connects to PostgreSQL");
        tokio::spawn(connection);
        pg.batch_execute(SESSION_SQL)
            .await
            .expect("the oracle pins its session settings");
        let transport =
            Transport::single_node(&stack().es_url).expect("a transport to the search server");
        Self {
            pg,
            search: Elasticsearch::new(transport),
        }
    }

    /// Compares `schema.table` with the index (or alias) `alias`, every column under its own
    /// name and the id from the primary key.
    pub async fn compare(
        &self,
        schema: &str,
        table: &str,
        alias: &str,
    ) -> Result<OracleReport, String> {
        self.compare_shaped(schema, table, alias, &Shape::default())
            .await
    }

    /// Compares `schema.table` with `alias`, the documents shaped by `shape`.
    pub async fn compare_shaped(
        &self,
        schema: &str,
        table: &str,
        alias: &str,
        shape: &Shape,
    ) -> Result<OracleReport, String> {
        // The index first: a row changed after the index was read may differ, but the sink
        // will catch up with it, and a caller that polls sees the two converge.
        let documents = self.read_index(alias).await?;
        let table_side = self.read_table(schema, table, shape).await?;
        let mut report = OracleReport {
            table: format!("{schema}.{table}"),
            alias: alias.to_owned(),
            rows: table_side.rows.len(),
            ..Default::default()
        };
        let mut live: BTreeMap<String, BTreeMap<String, Json>> = BTreeMap::new();
        for (id, source) in documents {
            let mut fields = match source {
                Json::Object(members) => members,
                other => return Err(format!("document {id}: _source is not an object: {other}")),
            };
            let metadata = fields
                .iter()
                .rposition(|(name, _)| name == "walsync")
                .map(|at| fields.remove(at).1);
            fields.retain(|(name, _)| name != "walsync");
            if metadata
                .as_ref()
                .and_then(|m| m.get("deleted"))
                .is_some_and(|deleted| *deleted == Json::Bool(true))
            {
                report.tombstones += 1;
                continue;
            }
            live.insert(id, fields.into_iter().collect());
        }
        report.documents = live.len();
        let column_names: BTreeSet<&str> =
            table_side.columns.iter().map(|(n, _)| n.as_str()).collect();
        for (id, row) in &table_side.rows {
            let Some(document) = live.get(id) else {
                report.missing.push(id.clone());
                report
                    .missing_rows
                    .insert(id.clone(), shorten(&excerpt(row), 240));
                continue;
            };
            let mut differing: Vec<(String, String, String)> = Vec::new();
            for (name, kind) in &table_side.columns {
                let expected = &row[name];
                match document.get(name) {
                    None => differing.push((name.clone(), expected.to_string(), "<absent>".into())),
                    Some(actual) if !same_value(kind, expected, actual) => {
                        differing.push((name.clone(), expected.to_string(), actual.to_string()));
                    }
                    Some(_) => {}
                }
            }
            for (name, actual) in document {
                if !column_names.contains(name.as_str()) {
                    differing.push((name.clone(), "<absent>".into(), actual.to_string()));
                }
            }
            if let Some((field, expected, actual)) = differing.first().cloned() {
                report.differing.push(Difference {
                    id: id.clone(),
                    field,
                    expected,
                    actual,
                    fields: differing.into_iter().map(|d| d.0).collect(),
                });
            }
        }
        for (id, document) in &live {
            if !table_side.rows.contains_key(id) {
                report.extra.push(id.clone());
                report
                    .extra_documents
                    .insert(id.clone(), shorten(&excerpt(document), 240));
            }
        }
        Ok(report)
    }

    async fn read_table(
        &self,
        schema: &str,
        table: &str,
        shape: &Shape,
    ) -> Result<TableSide, String> {
        let relation = format!("{}.{}", quote_ident(schema), quote_ident(table));
        let attributes = self
            .pg
            .query(
                "SELECT a.attname::text, a.atttypid FROM pg_attribute a
                  WHERE a.attrelid = $1::text::regclass AND a.attnum > 0
                    AND NOT a.attisdropped AND a.attgenerated = ''
                  ORDER BY a.attnum",
                &[&relation],
            )
            .await
            .map_err(|e| format!("{relation}: reading its columns: {e}"))?;
        let mut columns = Vec::new();
        for attribute in &attributes {
            let name: String = attribute.get(0);
            let type_oid: u32 = attribute.get(1);
            columns.push((name, self.kind_of(type_oid, 0).await?));
        }
        let primary_key: Vec<String> = self
            .pg
            .query(
                "SELECT a.attname::text FROM pg_index i
                   CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                  WHERE i.indrelid = $1::text::regclass AND i.indisprimary
                  ORDER BY k.position",
                &[&relation],
            )
            .await
            .map_err(|e| format!("{relation}: reading its primary key: {e}"))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let key = if shape.key.is_empty() {
            primary_key
        } else {
            shape.key.clone()
        };
        if key.is_empty() {
            return Err(format!("{relation} has no primary key"));
        }
        if let Some(missing) = key.iter().find(|k| !columns.iter().any(|(c, _)| c == *k)) {
            return Err(format!("{relation} has no key column {missing}"));
        }
        let texts = self
            .pg
            .query(
                &format!("SELECT row_to_json(t)::text FROM {relation} t"),
                &[],
            )
            .await
            .map_err(|e| format!("{relation}: reading its rows: {e}"))?;
        let mut rows = BTreeMap::new();
        for text in &texts {
            let text: &str = text.get(0);
            let row = parse_json(text).map_err(|e| format!("{relation}: {e} in {text}"))?;
            let mut expected = BTreeMap::new();
            for (name, kind) in &columns {
                let value = row
                    .get(name)
                    .ok_or_else(|| format!("{relation}: row_to_json lacks {name}"))?;
                let value =
                    expected_value(kind, value).map_err(|e| format!("{relation}.{name}: {e}"))?;
                expected.insert(name.clone(), value);
            }
            let key_values: Vec<Json> = key.iter().map(|k| expected[k].clone()).collect();
            let id = document_id(&key_values).map_err(|e| format!("{relation}: {e}"))?;
            let fields = expected
                .into_iter()
                .filter(|(column, _)| shape.keeps(column))
                .map(|(column, value)| (shape.field(&column).to_owned(), value))
                .collect();
            if rows.insert(id.clone(), fields).is_some() {
                return Err(format!("{relation}: two rows share the id {id}"));
            }
        }
        let columns = columns
            .into_iter()
            .filter(|(column, _)| shape.keeps(column))
            .map(|(column, kind)| (shape.field(&column).to_owned(), kind))
            .collect();
        Ok(TableSide { columns, rows })
    }

    /// The kind of type `oid`, following domains and arrays.
    fn kind_of(
        &self,
        oid: u32,
        depth: usize,
    ) -> Pin<Box<dyn Future<Output = Result<Kind, String>> + Send + '_>> {
        Box::pin(async move {
            if depth > 32 {
                return Err(format!("type {oid}: nested too deeply"));
            }
            let row = self
                .pg
                .query_one(
                    "SELECT t.typname::text, n.nspname::text, t.typtype::text, t.typbasetype,
                            t.typelem, t.typcategory::text
                       FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                      WHERE t.oid = $1",
                    &[&oid],
                )
                .await
                .map_err(|e| format!("type {oid}: {e}"))?;
            let name: String = row.get(0);
            let namespace: String = row.get(1);
            let typtype: String = row.get(2);
            let base: u32 = row.get(3);
            let element: u32 = row.get(4);
            let category: String = row.get(5);
            Ok(match typtype.as_str() {
                "d" => self.kind_of(base, depth + 1).await?,
                "e" => Kind::Text,
                "c" => Kind::Composite(format!("{namespace}.{name}")),
                _ if category == "A" && element != 0 => {
                    Kind::Array(Box::new(self.kind_of(element, depth + 1).await?))
                }
                _ if namespace == "pg_catalog" => base_kind(&name),
                _ => Kind::Text,
            })
        })
    }

    /// Every document of `alias` as (`_id`, parsed `_source`), after a refresh.
    async fn read_index(&self, alias: &str) -> Result<Vec<(String, Json)>, String> {
        let refresh = self
            .request(Method::Post, &format!("/{alias}/_refresh"), None)
            .await?;
        if refresh.0 != 200 {
            return Err(format!(
                "refresh {alias}: {} {}",
                refresh.0,
                shorten(&refresh.1, 300)
            ));
        }
        let mut documents = Vec::new();
        let first =
            format!(r#"{{"size":{PAGE_SIZE},"sort":["_doc"],"query":{{"match_all":{{}}}}}}"#);
        let (status, mut body) = self
            .request(
                Method::Post,
                &format!("/{alias}/_search?scroll=2m"),
                Some(first),
            )
            .await?;
        if status != 200 {
            return Err(format!("search {alias}: {status} {}", shorten(&body, 300)));
        }
        let mut scroll_id: Option<String>;
        loop {
            let page: SearchPage<'_> = serde_json::from_str(&body)
                .map_err(|e| format!("search {alias}: unreadable page: {e}"))?;
            scroll_id = page.scroll_id.clone();
            if page.hits.hits.is_empty() {
                break;
            }
            for hit in &page.hits.hits {
                let source = parse_json(hit.source.get())
                    .map_err(|e| format!("document {}: {e}", hit.id))?;
                documents.push((hit.id.clone(), source));
            }
            let Some(id) = &scroll_id else { break };
            let mut next = String::from(r#"{"scroll":"2m","scroll_id":"#);
            write_json_string(id, &mut next);
            next.push('}');
            let (status, text) = self
                .request(Method::Post, "/_search/scroll", Some(next))
                .await?;
            if status != 200 {
                return Err(format!("scroll {alias}: {status} {}", shorten(&text, 300)));
            }
            body = text;
        }
        if let Some(id) = scroll_id {
            let mut clear = String::from(r#"{"scroll_id":["#);
            write_json_string(&id, &mut clear);
            clear.push_str("]}");
            let _ = self
                .request(Method::Delete, "/_search/scroll", Some(clear))
                .await;
        }
        Ok(documents)
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(u16, String), String> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let response = self
            .search
            .send(
                method,
                path,
                headers,
                Option::<&()>::None,
                body,
                Some(Duration::from_secs(60)),
            )
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        let status = response.status_code().as_u16();
        let text = response.text().await.map_err(|e| format!("{path}: {e}"))?;
        Ok((status, text))
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn excerpt(fields: &BTreeMap<String, Json>) -> String {
    let members: Vec<(String, Json)> = fields
        .iter()
        .map(|(name, value)| {
            let value = match value {
                Json::String(text) if text.len() > 40 => Json::String(shorten(text, 24)),
                other => other.clone(),
            };
            (name.clone(), value)
        })
        .collect();
    Json::Object(members).to_string()
}

/// Compares `schema.table` with `alias` once, with fresh connections.
pub async fn compare_table(schema: &str, table: &str, alias: &str) -> Result<OracleReport, String> {
    Oracle::connect().await.compare(schema, table, alias).await
}

/// Polls until the index equals the table and returns the (equal) report; panics with the last
/// report (or error) when `deadline` passes first.
pub async fn wait_oracle_equal(
    schema: &str,
    table: &str,
    alias: &str,
    deadline: Duration,
) -> OracleReport {
    let oracle = Oracle::connect().await;
    let start = Instant::now();
    loop {
        let last = oracle.compare(schema, table, alias).await;
        if let Ok(report) = &last
            && report.is_equal()
        {
            return report.clone();
        }
        if start.elapsed() > deadline {
            match last {
                Ok(report) => {
                    panic!("the index never equalled the table within {deadline:?}:\n{report}")
                }
                Err(error) => panic!("no comparison succeeded within {deadline:?}: {error}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> Json {
        parse_json(text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    #[test]
    fn decimals_are_compared_digit_for_digit_never_through_floats() {
        assert!(!same_decimal("0.9407462388099621", "0.940746238809962"));
        assert!(!same_decimal(
            "123456789012345678901234567890",
            "1.2345678901234568e29"
        ));
        assert!(!same_decimal(
            "0.90372028726197960001",
            "0.9037202872619796"
        ));
        // The same f64, other digits: still not the digits PostgreSQL printed.
        assert!(!same_decimal("5e-324", "4.9406564584124654e-324"));
        assert!(!same_decimal("1", "-1"));
        assert!(!same_decimal("10", "1"));
        assert!(same_decimal("1.50", "1.5"));
        assert!(same_decimal("1e+100", "1E100"));
        assert!(same_decimal("10e99", "1e100"));
        assert!(same_decimal("0.00100", "1e-3"));
        assert!(same_decimal("-0", "0.000"));
        assert!(same_decimal(
            "1.7976931348623157e+308",
            "1.7976931348623157e308"
        ));
        assert_eq!(
            decimal("-012.3400e+2"),
            Some(Decimal {
                negative: true,
                digits: "1234".into(),
                exponent: 4
            })
        );
        assert_eq!(decimal("1.2.3"), None);
        assert_eq!(decimal("NaN"), None);
        // Floats: -0 is its own value.
        assert!(!same_float("-0", "0"));
        assert!(same_float("-0", "-0.0"));
        assert!(!same_float("0.9407462388099621", "0.940746238809962"));
    }

    #[test]
    fn json_values_compare_structurally_with_exact_numbers() {
        assert!(same_json(
            &json(r#"{"w": 1.50, "n": [1, 2.0]}"#),
            &json(r#"{"n":[1,2],"w":1.5}"#)
        ));
        assert!(!same_json(
            &json(r#"{"n": 0.90372028726197960001}"#),
            &json(r#"{"n": 0.9037202872619796}"#)
        ));
        assert!(!same_json(
            &json(r#"{"big": 123456789012345678901234567890}"#),
            &json(r#"{"big": 1.2345678901234568e+29}"#)
        ));
        assert!(!same_json(
            &json(r#"{"a": 1}"#),
            &json(r#"{"a": 1, "b": 2}"#)
        ));
        assert!(!same_json(&json(r#"[1, 2]"#), &json(r#"[2, 1]"#)));
        assert!(!same_json(&json(r#""1""#), &json("1")));
        assert!(same_json(
            &json(r#""\u00e9\ud83d\ude00""#),
            &json("\"é😀\"")
        ));
    }

    #[test]
    fn the_reader_keeps_number_text_and_decodes_strings() {
        assert_eq!(
            json(r#" {"a" : [0.10, -1e+5, true, null], "b": "x\"\\\n\u0001"} "#),
            Json::Object(vec![
                (
                    "a".into(),
                    Json::Array(vec![
                        Json::Number("0.10".into()),
                        Json::Number("-1e+5".into()),
                        Json::Bool(true),
                        Json::Null
                    ])
                ),
                ("b".into(), Json::String("x\"\\\n\u{1}".into())),
            ])
        );
        for bad in [
            "01",
            "1.",
            "[1,]",
            "{\"a\" 1}",
            "\"\u{1}\"",
            "1 2",
            "-",
            "\"\\x\"",
        ] {
            assert!(parse_json(bad).is_err(), "{bad} is not JSON");
        }
        let text = r#"{"s":"a\"b\\c\n\u0007\u007f é"}"#;
        assert_eq!(
            json(text).to_string(),
            "{\"s\":\"a\\\"b\\\\c\\n\\u0007\u{7f} é\"}"
        );
    }

    #[test]
    fn numerics_must_be_strings_of_exactly_the_digits() {
        let expected = expected_value(&Kind::Numeric, &json("19.90")).unwrap();
        assert_eq!(expected, Json::String("19.90".into()));
        assert!(same_value(&Kind::Numeric, &expected, &json(r#""19.90""#)));
        assert!(!same_value(&Kind::Numeric, &expected, &json(r#""19.9""#)));
        assert!(!same_value(&Kind::Numeric, &expected, &json("19.90")));
        let nan = expected_value(&Kind::Numeric, &json(r#""NaN""#)).unwrap();
        assert!(same_value(&Kind::Numeric, &nan, &json(r#""NaN""#)));
        // Array elements: numbers in row_to_json, strings in the document.
        let kind = Kind::Array(Box::new(Kind::Numeric));
        let expected = expected_value(&kind, &json(r#"[1.10, null, "NaN"]"#)).unwrap();
        assert!(same_value(
            &kind,
            &expected,
            &json(r#"["1.10", null, "NaN"]"#)
        ));
        assert!(!same_value(
            &kind,
            &expected,
            &json(r#"["1.1", null, "NaN"]"#)
        ));
        assert!(!same_value(&kind, &expected, &json(r#"["1.10", "NaN"]"#)));
    }

    #[test]
    fn floats_keep_their_value_and_non_finite_ones_are_strings() {
        let expected = expected_value(&Kind::Float, &json("0.9407462388099621")).unwrap();
        assert!(same_value(
            &Kind::Float,
            &expected,
            &json("0.9407462388099621")
        ));
        assert!(!same_value(
            &Kind::Float,
            &expected,
            &json("0.940746238809962")
        ));
        assert!(!same_value(
            &Kind::Float,
            &expected,
            &json(r#""0.9407462388099621""#)
        ));
        let infinity = expected_value(&Kind::Float, &json(r#""-Infinity""#)).unwrap();
        assert!(same_value(&Kind::Float, &infinity, &json(r#""-Infinity""#)));
        assert!(!same_value(&Kind::Float, &infinity, &json("null")));
        assert!(expected_value(&Kind::Float, &json(r#""1.5""#)).is_err());
        // Nested arrays of integers.
        let kind = Kind::Array(Box::new(Kind::Integer));
        let expected = expected_value(&kind, &json("[[1,2],[3,null]]")).unwrap();
        assert!(same_value(&kind, &expected, &json("[[1,2],[3,null]]")));
        assert!(!same_value(&kind, &expected, &json("[[1,2],[3,4]]")));
    }

    #[test]
    fn bytea_becomes_padded_standard_base64() {
        assert_eq!(bytea_base64(r"\x0a0b").unwrap(), "Cgs=");
        assert_eq!(bytea_base64(r"\x48656c6c6f").unwrap(), "SGVsbG8=");
        assert_eq!(bytea_base64(r"\x").unwrap(), "");
        assert_eq!(bytea_base64(r"\xfbff").unwrap(), "+/8=");
        assert!(bytea_base64("0a0b").is_err());
        assert!(bytea_base64(r"\x0a0").is_err());
        // Through row_to_json's escaping.
        let expected = expected_value(&Kind::Bytea, &json(r#""\\x00ff""#)).unwrap();
        assert_eq!(expected, Json::String("AP8=".into()));
    }

    #[test]
    fn timestamps_become_iso_8601_with_z_and_astronomical_years() {
        assert_eq!(
            utc_timestamp("2024-01-02T01:04:05.5+00:00").unwrap(),
            "2024-01-02T01:04:05.5Z"
        );
        assert_eq!(
            utc_timestamp("0044-03-15T12:00:00+00:00 BC").unwrap(),
            "-0043-03-15T12:00:00Z"
        );
        assert_eq!(utc_timestamp("infinity").unwrap(), "infinity");
        assert!(utc_timestamp("2024-01-02T03:04:05+02:00").is_err());
        assert_eq!(iso_datetime("0044-03-15 BC").unwrap(), "-0043-03-15");
        assert_eq!(iso_datetime("0001-12-31 BC").unwrap(), "0000-12-31");
        assert_eq!(iso_datetime("10000-01-01").unwrap(), "+10000-01-01");
        assert_eq!(
            iso_datetime("2024-01-02T03:04:05.123456").unwrap(),
            "2024-01-02T03:04:05.123456"
        );
    }

    #[test]
    fn ids_follow_the_documented_rule() {
        assert_eq!(document_id(&[json("42")]).unwrap(), "42");
        assert_eq!(document_id(&[json(r#""a-1""#)]).unwrap(), "a-1");
        assert_eq!(document_id(&[json("true")]).unwrap(), "true");
        assert_eq!(
            document_id(&[json("7"), json(r#""a \"b\" \\ é""#)]).unwrap(),
            r#"[7,"a \"b\" \\ é"]"#
        );
        assert_eq!(
            document_id(&[json("-9223372036854775808"), json(r#""x\ny""#)]).unwrap(),
            r#"[-9223372036854775808,"x\ny"]"#
        );
        // A bytea key: its base64 text.
        let key = expected_value(&Kind::Bytea, &json(r#""\\x0a0b""#)).unwrap();
        assert_eq!(document_id(&[key]).unwrap(), "Cgs=");
        // Exactly 512 bytes stay, 513 are hashed (SHA-256 of "a" × 513, checked with sha256sum).
        let long = "a".repeat(512);
        assert_eq!(document_id(&[Json::String(long.clone())]).unwrap(), long);
        assert_eq!(
            document_id(&[Json::String("a".repeat(513))]).unwrap(),
            "sha256:02425c0f5b0dabf3d2b9115f3f7723a02ad8bcfb1534a0d231614fd42b8188f6"
        );
        // An array key: its compact JSON, elements as the document holds them.
        let kind = Kind::Array(Box::new(Kind::Numeric));
        let key = expected_value(&kind, &json("[1.10, null]")).unwrap();
        assert_eq!(document_id(&[key]).unwrap(), r#"["1.10",null]"#);
        assert_eq!(
            document_id(&[json("1"), json("[2, 3]")]).unwrap(),
            "[1,[2,3]]"
        );
        assert!(document_id(&[Json::Null]).is_err());
        assert!(document_id(&[Json::String(String::new())]).is_err());
        assert!(document_id(&[json("1"), json(r#"{"a": 1}"#)]).is_err());
    }
}
