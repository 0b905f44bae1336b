//! The type codec: Postgres text-format values to JSON, by type OID.
//!
//! One codec for streaming and snapshots, with pinned session settings, so a value never
//! differs between the two paths. Numbers keep their precision, timestamps are UTC ISO 8601,
//! bytea is base64, and any type it does not know passes through as Postgres's text form.
//!
//! # Input
//!
//! The input is a value's text form exactly as the type's output function printed it: what
//! pgoutput sends for a text-format column, or one field of `COPY … TO STDOUT` after COPY's own
//! escaping (`\\`, `\n`, `\t`, `\N`, …) has been undone by the caller. The codec never sees SQL
//! NULL: the caller writes `null` for it.
//!
//! # Session settings
//!
//! Several output functions depend on session settings, so every connection whose values reach
//! the codec (the replication connection and the snapshot connection) must pin
//! [`SESSION_SETTINGS`]:
//!
//! | setting              | value      | what the codec relies on                               |
//! |----------------------|------------|--------------------------------------------------------|
//! | `DateStyle`          | `ISO`      | dates as `YYYY-MM-DD`, timestamps as `YYYY-MM-DD hh:mm:ss` |
//! | `IntervalStyle`      | `iso_8601` | intervals as `P1Y2M3DT4H5M6S`                          |
//! | `TimeZone`           | `UTC`      | `timestamptz` printed with offset `+00`, emitted as `Z` |
//! | `extra_float_digits` | `3`        | floats printed with the shortest exact digits          |
//! | `bytea_output`       | `hex`      | bytea as `\x48656c6c6f`                                |
//! | `client_encoding`    | `UTF8`     | all text is UTF-8; anything else is an error           |
//!
//! # Output
//!
//! | Postgres type                                   | JSON                                      |
//! |-------------------------------------------------|-------------------------------------------|
//! | `bool`                                          | `true` / `false`                          |
//! | `int2`, `int4`, `int8`, `oid`                   | number, Postgres's digits                 |
//! | `float4`, `float8`                              | number, Postgres's digits; `"NaN"`, `"Infinity"`, `"-Infinity"` as strings |
//! | `numeric`                                       | string of the exact digits (or a number with the same digits, see [`NumericRepresentation`]); `"NaN"`, `"Infinity"`, `"-Infinity"` always strings |
//! | `json`, `jsonb`                                 | embedded as JSON, byte for byte           |
//! | `date`                                          | `"2024-01-02"`                            |
//! | `timestamp`                                     | `"2024-01-02T03:04:05.123456"` (no zone)  |
//! | `timestamptz`                                   | `"2024-01-02T03:04:05.123456Z"`           |
//! | `interval`                                      | `"P1Y2M3DT4H5M6S"`                        |
//! | `bytea`                                         | base64 (standard alphabet, padded)        |
//! | arrays                                          | JSON arrays (nested for more dimensions), bounds dropped, elements by their own type |
//! | enums                                           | string                                    |
//! | domains                                         | as their base type                        |
//! | text types, `uuid`, `time`, `timetz`, `money`, `bit`, `xml`, … | string of the text form    |
//! | composites, ranges, anything else               | string of Postgres's text form            |
//!
//! Dates and timestamps outside 0001..9999 AD follow ISO 8601's expanded years with
//! astronomical year numbering: 1 BC is year `0000`, 44 BC is `-0043`, and 10000 AD is
//! `+10000`. The special values `infinity` and `-infinity` become the strings `"infinity"` and
//! `"-infinity"`.
//!
//! `json`/`jsonb` text and numerics emitted as numbers are copied digit for digit, so they may
//! hold numbers beyond a 64-bit float's range or precision; consumers that parse them into
//! floats lose exactly that.

use std::borrow::Cow;
use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

/// The session settings both the replication and the snapshot connection must pin, as
/// `(name, value)` pairs: the codec reads text in exactly these formats (see the module doc).
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("DateStyle", "ISO"),
    ("IntervalStyle", "iso_8601"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("client_encoding", "UTF8"),
];

/// How `numeric` values appear in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NumericRepresentation {
    /// A JSON string of Postgres's exact digits: no consumer can round it by accident.
    #[default]
    String,
    /// A JSON number with exactly Postgres's digits. `NaN` and `±Infinity` stay strings, which
    /// JSON numbers cannot express.
    Number,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CodecOptions {
    pub numeric: NumericRepresentation,
}

/// What the source learned from `pg_type` about a type, by `typtype` (checked in this order):
/// `e` is `Enum`, `d` is `Domain { base_oid: typbasetype }`, `c` is `Composite`, `r` and `m` are
/// `Range`; then `typcategory = 'A'` is `Array { element_oid: typelem, delimiter }` with the
/// element type's `typdelim`; anything else is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeKind {
    Enum,
    /// Encoded as its base type (which may itself be a domain).
    Domain {
        base_oid: u32,
    },
    /// `pg_type.typelem` and the element type's `typdelim`.
    Array {
        element_oid: u32,
        delimiter: u8,
    },
    Composite,
    Range,
    Other,
}

/// Why a value could not be encoded. Errors name the type and the problem, never the value,
/// which may be personal data that must not reach logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error(
        "type {type_oid}: the text is not valid UTF-8 (first bad byte at offset {valid_up_to})"
    )]
    InvalidUtf8 { type_oid: u32, valid_up_to: usize },
    #[error("type {type_oid}: malformed {format} text: {reason}")]
    Malformed {
        type_oid: u32,
        /// The text format the codec expected, such as "integer" or "array literal".
        format: &'static str,
        reason: &'static str,
    },
    #[error(
        "type {type_oid}: type definitions nest more than {limit} levels deep (a domain cycle?)"
    )]
    NestedTooDeep { type_oid: u32, limit: usize },
}

/// Domains over domains, arrays of domains over arrays…: real schemas stay far below this, and
/// a cycle in the registry must end in an error, not a stack overflow.
const MAX_TYPE_NESTING: usize = 32;

/// Postgres's own limit on array dimensions (`MAXDIM`).
const MAX_ARRAY_DIMENSIONS: usize = 6;

const BOX_ARRAY_OID: u32 = 1020;

/// Postgres text values to JSON. Cheap to share: `write_json` takes `&self`.
#[derive(Debug, Clone, Default)]
pub struct Codec {
    options: CodecOptions,
    registered: HashMap<u32, TypeKind>,
}

impl Codec {
    pub fn new(options: CodecOptions) -> Self {
        Self {
            options,
            registered: HashMap::new(),
        }
    }

    /// Teach the codec a type it does not know by OID. Types in its built-in table keep their
    /// built-in encoding, so the source registers every row of `pg_type`: catalog row types and
    /// `information_schema` domains get their OIDs at initdb and differ between versions.
    pub fn register(&mut self, oid: u32, kind: TypeKind) {
        if builtin_shape(oid).is_none() {
            self.registered.insert(oid, kind);
        }
    }

    /// Whether the codec knows how to encode `oid`: a built-in type or one registered.
    pub fn knows(&self, oid: u32) -> bool {
        builtin_shape(oid).is_some() || self.registered.contains_key(&oid)
    }

    /// Append the JSON for one non-NULL value of type `type_oid`, given its text form, to `out`.
    /// On error `out` is left as it was.
    pub fn write_json(
        &self,
        out: &mut Vec<u8>,
        type_oid: u32,
        text: &[u8],
    ) -> Result<(), CodecError> {
        let start = out.len();
        let result = self.write_value(out, type_oid, text, 0);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn write_value(
        &self,
        out: &mut Vec<u8>,
        type_oid: u32,
        text: &[u8],
        nesting: usize,
    ) -> Result<(), CodecError> {
        if nesting > MAX_TYPE_NESTING {
            return Err(CodecError::NestedTooDeep {
                type_oid,
                limit: MAX_TYPE_NESTING,
            });
        }
        match self.resolve(type_oid)? {
            Shape::Scalar(scalar) => self.write_scalar(out, type_oid, scalar, text),
            Shape::Array {
                element_oid,
                delimiter,
            } => {
                let array = ArrayType {
                    array_oid: type_oid,
                    element_oid,
                    delimiter,
                };
                self.write_array(out, array, text, nesting)
            }
        }
    }

    /// The PostgreSQL input text of a JSON value this codec wrote for type `type_oid`: the
    /// inverse of [`Codec::write_json`], for binding a record key's values as parameters (the
    /// sink's TOAST re-read). `Ok(None)` is SQL NULL. The text reads back, through the type's
    /// input function, as the value that was written: strings are PostgreSQL's text form,
    /// numbers keep their digits, base64 becomes `\x` hex, ISO years become ` BC` where
    /// needed, and JSON arrays become array literals with every element quoted.
    pub fn postgres_text(&self, type_oid: u32, json: &str) -> Result<Option<String>, CodecError> {
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|_| malformed(type_oid, "JSON value", "not valid JSON"))?;
        if value.is_null() {
            return Ok(None);
        }
        self.text_of(type_oid, json, &value, 0).map(Some)
    }

    fn text_of(
        &self,
        type_oid: u32,
        raw: &str,
        value: &serde_json::Value,
        nesting: usize,
    ) -> Result<String, CodecError> {
        use serde_json::Value;
        if nesting > MAX_TYPE_NESTING {
            return Err(CodecError::NestedTooDeep {
                type_oid,
                limit: MAX_TYPE_NESTING,
            });
        }
        match (self.resolve(type_oid)?, value) {
            (Shape::Array { element_oid, .. }, Value::Array(_)) => {
                let mut literal = String::new();
                self.array_literal(&mut literal, element_oid, raw, nesting)?;
                Ok(literal)
            }
            (Shape::Scalar(Scalar::Bytea), Value::String(base64)) => {
                let bytes = BASE64
                    .decode(base64)
                    .map_err(|_| malformed(type_oid, "base64", "not standard padded base64"))?;
                let mut hex = String::with_capacity(2 + bytes.len() * 2);
                hex.push_str("\\x");
                for byte in bytes {
                    use std::fmt::Write as _;
                    let _ = write!(hex, "{byte:02x}");
                }
                Ok(hex)
            }
            (
                Shape::Scalar(Scalar::Date | Scalar::Timestamp | Scalar::TimestampTz),
                Value::String(iso),
            ) => Ok(iso_to_postgres(iso)),
            (Shape::Scalar(Scalar::Json), _) => Ok(raw.trim().to_owned()),
            (_, Value::String(text)) => Ok(text.clone()),
            (_, Value::Bool(flag)) => Ok(if *flag { "t" } else { "f" }.to_owned()),
            // Numbers keep the digits the source printed.
            (_, Value::Number(_)) => Ok(raw.trim().to_owned()),
            _ => Err(malformed(
                type_oid,
                "JSON value",
                "a value of another shape than this type's",
            )),
        }
    }

    /// Appends the array literal of the JSON array `raw` (elements of type `element_oid`).
    fn array_literal(
        &self,
        out: &mut String,
        element_oid: u32,
        raw: &str,
        nesting: usize,
    ) -> Result<(), CodecError> {
        let elements: Vec<&serde_json::value::RawValue> = serde_json::from_str(raw)
            .map_err(|_| malformed(element_oid, "JSON array", "not valid JSON"))?;
        out.push('{');
        for (position, element) in elements.iter().enumerate() {
            if position > 0 {
                out.push(',');
            }
            let value: serde_json::Value = serde_json::from_str(element.get())
                .map_err(|_| malformed(element_oid, "JSON value", "not valid JSON"))?;
            match &value {
                serde_json::Value::Null => out.push_str("NULL"),
                // A deeper dimension, unless the element type is itself an array type.
                serde_json::Value::Array(_)
                    if !matches!(self.resolve(element_oid)?, Shape::Array { .. }) =>
                {
                    self.array_literal(out, element_oid, element.get(), nesting + 1)?
                }
                _ => {
                    let text = self.text_of(element_oid, element.get(), &value, nesting + 1)?;
                    out.push('"');
                    for character in text.chars() {
                        if matches!(character, '"' | '\\') {
                            out.push('\\');
                        }
                        out.push(character);
                    }
                    out.push('"');
                }
            }
        }
        out.push('}');
        Ok(())
    }

    /// Follow domains down to a built-in or registered shape; unknown types are strings.
    fn resolve(&self, type_oid: u32) -> Result<Shape, CodecError> {
        let mut current = type_oid;
        for _ in 0..=MAX_TYPE_NESTING {
            if let Some(shape) = builtin_shape(current) {
                return Ok(shape);
            }
            match self.registered.get(&current) {
                Some(TypeKind::Domain { base_oid }) => current = *base_oid,
                Some(TypeKind::Array {
                    element_oid,
                    delimiter,
                }) => {
                    return Ok(Shape::Array {
                        element_oid: *element_oid,
                        delimiter: *delimiter,
                    });
                }
                Some(TypeKind::Enum | TypeKind::Composite | TypeKind::Range | TypeKind::Other)
                | None => return Ok(Shape::Scalar(Scalar::String)),
            }
        }
        Err(CodecError::NestedTooDeep {
            type_oid,
            limit: MAX_TYPE_NESTING,
        })
    }

    fn write_scalar(
        &self,
        out: &mut Vec<u8>,
        type_oid: u32,
        scalar: Scalar,
        text: &[u8],
    ) -> Result<(), CodecError> {
        match scalar {
            Scalar::Bool => write_bool(out, type_oid, text),
            Scalar::Integer => write_integer(out, type_oid, text),
            Scalar::Float => write_float(out, type_oid, text),
            Scalar::Numeric => write_numeric(out, type_oid, text, self.options.numeric),
            Scalar::String => write_string(out, type_oid, text),
            Scalar::Json => write_embedded_json(out, type_oid, text),
            Scalar::Date => write_date(out, type_oid, text),
            Scalar::Timestamp => write_timestamp(out, type_oid, text, Zone::Without),
            Scalar::TimestampTz => write_timestamp(out, type_oid, text, Zone::With),
            Scalar::Bytea => write_bytea(out, type_oid, text),
        }
    }

    fn write_array(
        &self,
        out: &mut Vec<u8>,
        array: ArrayType,
        text: &[u8],
        nesting: usize,
    ) -> Result<(), CodecError> {
        let mut cursor = ArrayCursor {
            text,
            position: 0,
            array,
        };
        cursor.skip_whitespace();
        cursor.skip_bounds()?;
        cursor.skip_whitespace();
        self.write_array_dimension(out, &mut cursor, 1, nesting)?;
        cursor.skip_whitespace();
        if cursor.peek().is_some() {
            return Err(cursor.malformed("text after the closing brace"));
        }
        Ok(())
    }

    /// One `{…}` level of an array literal, whose elements are values or deeper levels.
    fn write_array_dimension(
        &self,
        out: &mut Vec<u8>,
        cursor: &mut ArrayCursor<'_>,
        dimension: usize,
        nesting: usize,
    ) -> Result<(), CodecError> {
        if !cursor.eat(b'{') {
            return Err(cursor.malformed("expected '{'"));
        }
        out.push(b'[');
        cursor.skip_whitespace();
        if cursor.eat(b'}') {
            out.push(b']');
            return Ok(());
        }
        let mut first = true;
        loop {
            if !first {
                out.push(b',');
            }
            first = false;
            cursor.skip_whitespace();
            if cursor.peek() == Some(b'{') {
                if dimension >= MAX_ARRAY_DIMENSIONS {
                    return Err(cursor.malformed("more than 6 dimensions"));
                }
                self.write_array_dimension(out, cursor, dimension + 1, nesting)?;
            } else {
                match cursor.element()? {
                    ArrayElement::Null => out.extend_from_slice(b"null"),
                    ArrayElement::Text(element) => {
                        self.write_value(out, cursor.array.element_oid, &element, nesting + 1)?
                    }
                }
            }
            cursor.skip_whitespace();
            match cursor.next_byte() {
                Some(byte) if byte == cursor.array.delimiter => continue,
                Some(b'}') => break,
                _ => return Err(cursor.malformed("expected a delimiter or '}' after an element")),
            }
        }
        out.push(b']');
        Ok(())
    }
}

/// How a type's text is encoded, once domains are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Scalar(Scalar),
    Array { element_oid: u32, delimiter: u8 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scalar {
    Bool,
    Integer,
    Float,
    Numeric,
    String,
    Json,
    Date,
    Timestamp,
    TimestampTz,
    Bytea,
}

fn builtin_shape(oid: u32) -> Option<Shape> {
    let scalar = match oid {
        16 => Scalar::Bool,
        // int8, int2, int4, oid
        20 | 21 | 23 | 26 => Scalar::Integer,
        // float4, float8
        700 | 701 => Scalar::Float,
        1700 => Scalar::Numeric,
        // json, jsonb
        114 | 3802 => Scalar::Json,
        1082 => Scalar::Date,
        1114 => Scalar::Timestamp,
        1184 => Scalar::TimestampTz,
        17 => Scalar::Bytea,
        // "char", name, text, xml, money, bpchar, varchar, time, interval, timetz, bit, varbit,
        // uuid: their text form is the value.
        18 | 19 | 25 | 142 | 790 | 1042 | 1043 | 1083 | 1186 | 1266 | 1560 | 1562 | 2950 => {
            Scalar::String
        }
        _ => {
            return builtin_array_element(oid).map(|element_oid| Shape::Array {
                element_oid,
                delimiter: if oid == BOX_ARRAY_OID { b';' } else { b',' },
            });
        }
    };
    Some(Shape::Scalar(scalar))
}

/// The element type of each built-in array type (`pg_type.typelem` where `typcategory = 'A'`).
/// `int2vector` and `oidvector` are not here: their text is space-separated, not `{…}`.
fn builtin_array_element(array_oid: u32) -> Option<u32> {
    let element_oid = match array_oid {
        143 => 142,   // xml
        199 => 114,   // json
        271 => 5069,  // xid8
        629 => 628,   // line
        651 => 650,   // cidr
        719 => 718,   // circle
        775 => 774,   // macaddr8
        791 => 790,   // money
        1000 => 16,   // bool
        1001 => 17,   // bytea
        1002 => 18,   // "char"
        1003 => 19,   // name
        1005 => 21,   // int2
        1006 => 22,   // int2vector
        1007 => 23,   // int4
        1008 => 24,   // regproc
        1009 => 25,   // text
        1010 => 27,   // tid
        1011 => 28,   // xid
        1012 => 29,   // cid
        1013 => 30,   // oidvector
        1014 => 1042, // bpchar
        1015 => 1043, // varchar
        1016 => 20,   // int8
        1017 => 600,  // point
        1018 => 601,  // lseg
        1019 => 602,  // path
        1020 => 603,  // box
        1021 => 700,  // float4
        1022 => 701,  // float8
        1027 => 604,  // polygon
        1028 => 26,   // oid
        1034 => 1033, // aclitem
        1040 => 829,  // macaddr
        1041 => 869,  // inet
        1115 => 1114, // timestamp
        1182 => 1082, // date
        1183 => 1083, // time
        1185 => 1184, // timestamptz
        1187 => 1186, // interval
        1231 => 1700, // numeric
        1263 => 2275, // cstring
        1270 => 1266, // timetz
        1561 => 1560, // bit
        1563 => 1562, // varbit
        2201 => 1790, // refcursor
        2207 => 2202, // regprocedure
        2208 => 2203, // regoper
        2209 => 2204, // regoperator
        2210 => 2205, // regclass
        2211 => 2206, // regtype
        2287 => 2249, // record
        2949 => 2970, // txid_snapshot
        2951 => 2950, // uuid
        3221 => 3220, // pg_lsn
        3643 => 3614, // tsvector
        3644 => 3642, // gtsvector
        3645 => 3615, // tsquery
        3735 => 3734, // regconfig
        3770 => 3769, // regdictionary
        3807 => 3802, // jsonb
        3905 => 3904, // int4range
        3907 => 3906, // numrange
        3909 => 3908, // tsrange
        3911 => 3910, // tstzrange
        3913 => 3912, // daterange
        3927 => 3926, // int8range
        4073 => 4072, // jsonpath
        4090 => 4089, // regnamespace
        4097 => 4096, // regrole
        4192 => 4191, // regcollation
        5039 => 5038, // pg_snapshot
        6150 => 4451, // int4multirange
        6151 => 4532, // nummultirange
        6152 => 4533, // tsmultirange
        6153 => 4534, // tstzmultirange
        6155 => 4535, // datemultirange
        6157 => 4536, // int8multirange
        _ => return None,
    };
    Some(element_oid)
}

fn malformed(type_oid: u32, format: &'static str, reason: &'static str) -> CodecError {
    CodecError::Malformed {
        type_oid,
        format,
        reason,
    }
}

fn utf8(type_oid: u32, text: &[u8]) -> Result<&str, CodecError> {
    std::str::from_utf8(text).map_err(|error| CodecError::InvalidUtf8 {
        type_oid,
        valid_up_to: error.valid_up_to(),
    })
}

/// A JSON string of `text`, escaped by serde_json.
fn write_string(out: &mut Vec<u8>, type_oid: u32, text: &[u8]) -> Result<(), CodecError> {
    let text = utf8(type_oid, text)?;
    serde_json::to_writer(&mut *out, text).expect("serializing a str into a Vec cannot fail");
    Ok(())
}

/// A JSON string of text already known to need no escaping (validated ASCII digits and signs).
fn write_plain_string(out: &mut Vec<u8>, text: &[u8]) {
    out.push(b'"');
    out.extend_from_slice(text);
    out.push(b'"');
}

fn write_bool(out: &mut Vec<u8>, type_oid: u32, text: &[u8]) -> Result<(), CodecError> {
    let json: &[u8] = match text {
        b"t" => b"true",
        b"f" => b"false",
        _ => return Err(malformed(type_oid, "boolean", "expected 't' or 'f'")),
    };
    out.extend_from_slice(json);
    Ok(())
}

fn write_integer(out: &mut Vec<u8>, type_oid: u32, text: &[u8]) -> Result<(), CodecError> {
    let is_json_integer = json_number_length(text, NumberSyntax::INTEGER) == Some(text.len());
    // Every Postgres integer type fits in an i64 (oid is a u32); the parse is the range check.
    let in_range = is_json_integer
        && std::str::from_utf8(text)
            .ok()
            .and_then(|digits| digits.parse::<i64>().ok())
            .is_some();
    if !in_range {
        return Err(malformed(type_oid, "integer", "not an integer in range"));
    }
    out.extend_from_slice(text);
    Ok(())
}

/// Floats keep Postgres's digits: with `extra_float_digits=3` they are the shortest text that
/// reads back to the same value, so re-formatting could only lose information.
fn write_float(out: &mut Vec<u8>, type_oid: u32, text: &[u8]) -> Result<(), CodecError> {
    if let Some(special) = non_finite_number(text) {
        write_plain_string(out, special);
        return Ok(());
    }
    let is_json_number = json_number_length(text, NumberSyntax::FLOAT) == Some(text.len());
    // A finite float's text always reads back as a finite f64: this rejects "1e999", which no
    // float4/float8 prints and which JSON parsers reject as out of range.
    let is_finite = is_json_number
        && std::str::from_utf8(text)
            .ok()
            .and_then(|digits| digits.parse::<f64>().ok())
            .is_some_and(f64::is_finite);
    if !is_finite {
        return Err(malformed(type_oid, "float", "not a finite number"));
    }
    out.extend_from_slice(text);
    Ok(())
}

fn write_numeric(
    out: &mut Vec<u8>,
    type_oid: u32,
    text: &[u8],
    representation: NumericRepresentation,
) -> Result<(), CodecError> {
    if let Some(special) = non_finite_number(text) {
        write_plain_string(out, special);
        return Ok(());
    }
    // numeric_out never uses an exponent.
    if json_number_length(text, NumberSyntax::DECIMAL) != Some(text.len()) {
        return Err(malformed(type_oid, "numeric", "not a decimal number"));
    }
    match representation {
        NumericRepresentation::String => write_plain_string(out, text),
        NumericRepresentation::Number => out.extend_from_slice(text),
    }
    Ok(())
}

/// The spellings float and numeric output use for values JSON numbers cannot hold.
fn non_finite_number(text: &[u8]) -> Option<&[u8]> {
    matches!(text, b"NaN" | b"Infinity" | b"-Infinity").then_some(text)
}

#[derive(Debug, Clone, Copy)]
struct NumberSyntax {
    fraction: bool,
    exponent: bool,
}

impl NumberSyntax {
    const INTEGER: Self = Self {
        fraction: false,
        exponent: false,
    };
    const DECIMAL: Self = Self {
        fraction: true,
        exponent: false,
    };
    const FLOAT: Self = Self {
        fraction: true,
        exponent: true,
    };
}

/// The length of the JSON number (RFC 8259 grammar, restricted by `syntax`) at the start of
/// `text`, or `None` when `text` does not start with one.
fn json_number_length(text: &[u8], syntax: NumberSyntax) -> Option<usize> {
    let digits_from = |start: usize| {
        text[start..]
            .iter()
            .take_while(|byte| byte.is_ascii_digit())
            .count()
    };
    let mut position = usize::from(text.first() == Some(&b'-'));
    let integer_digits = digits_from(position);
    // JSON forbids leading zeros, which Postgres never prints either.
    if integer_digits == 0 || (integer_digits > 1 && text[position] == b'0') {
        return None;
    }
    position += integer_digits;
    if syntax.fraction && text.get(position) == Some(&b'.') {
        let fraction_digits = digits_from(position + 1);
        if fraction_digits == 0 {
            return None;
        }
        position += 1 + fraction_digits;
    }
    if syntax.exponent && matches!(text.get(position), Some(b'e' | b'E')) {
        position += 1;
        if matches!(text.get(position), Some(b'+' | b'-')) {
            position += 1;
        }
        let exponent_digits = digits_from(position);
        if exponent_digits == 0 {
            return None;
        }
        position += exponent_digits;
    }
    Some(position)
}

/// json and jsonb text is embedded byte for byte, which keeps every number's digits. Postgres
/// only ever prints valid JSON; the check costs one pass and guarantees that a mislabelled
/// value fails on its own instead of corrupting the whole event it is part of.
fn write_embedded_json(out: &mut Vec<u8>, type_oid: u32, text: &[u8]) -> Result<(), CodecError> {
    utf8(type_oid, text)?;
    validate_json(text).map_err(|reason| malformed(type_oid, "json", reason))?;
    out.extend_from_slice(text);
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Array,
    Object,
}

/// An RFC 8259 syntax check without recursion, so any nesting depth Postgres accepts is fine.
fn validate_json(text: &[u8]) -> Result<(), &'static str> {
    let mut scanner = JsonScanner { text, position: 0 };
    let mut open: Vec<Container> = Vec::new();
    scanner.skip_whitespace();
    'value: loop {
        match scanner.peek() {
            Some(b'{') => {
                scanner.position += 1;
                scanner.skip_whitespace();
                if !scanner.eat(b'}') {
                    open.push(Container::Object);
                    scanner.member_name()?;
                    continue 'value;
                }
            }
            Some(b'[') => {
                scanner.position += 1;
                scanner.skip_whitespace();
                if !scanner.eat(b']') {
                    open.push(Container::Array);
                    continue 'value;
                }
            }
            Some(b'"') => scanner.string()?,
            Some(b't') => scanner.keyword(b"true")?,
            Some(b'f') => scanner.keyword(b"false")?,
            Some(b'n') => scanner.keyword(b"null")?,
            Some(b'-' | b'0'..=b'9') => scanner.number()?,
            _ => return Err("expected a value"),
        }
        // A value ended: close containers until one continues with another value.
        loop {
            scanner.skip_whitespace();
            let Some(&container) = open.last() else {
                return match scanner.peek() {
                    None => Ok(()),
                    Some(_) => Err("text after the value"),
                };
            };
            match (container, scanner.next_byte()) {
                (Container::Array, Some(b',')) => {
                    scanner.skip_whitespace();
                    continue 'value;
                }
                (Container::Object, Some(b',')) => {
                    scanner.skip_whitespace();
                    scanner.member_name()?;
                    continue 'value;
                }
                (Container::Array, Some(b']')) | (Container::Object, Some(b'}')) => {
                    open.pop();
                }
                (Container::Array, _) => return Err("expected ',' or ']'"),
                (Container::Object, _) => return Err("expected ',' or '}'"),
            }
        }
    }
}

struct JsonScanner<'a> {
    text: &'a [u8],
    position: usize,
}

impl JsonScanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.position).copied()
    }

    fn next_byte(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.position += 1;
        Some(byte)
    }

    fn eat(&mut self, expected: u8) -> bool {
        let matched = self.peek() == Some(expected);
        if matched {
            self.position += 1;
        }
        matched
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.position += 1;
        }
    }

    fn keyword(&mut self, word: &[u8]) -> Result<(), &'static str> {
        if !self.text[self.position..].starts_with(word) {
            return Err("unknown keyword");
        }
        self.position += word.len();
        Ok(())
    }

    fn number(&mut self) -> Result<(), &'static str> {
        let length = json_number_length(&self.text[self.position..], NumberSyntax::FLOAT)
            .ok_or("malformed number")?;
        self.position += length;
        Ok(())
    }

    /// `"name"` and the `:` after it, leaving the scanner at the member's value.
    fn member_name(&mut self) -> Result<(), &'static str> {
        if self.peek() != Some(b'"') {
            return Err("expected a member name");
        }
        self.string()?;
        self.skip_whitespace();
        if !self.eat(b':') {
            return Err("expected ':'");
        }
        self.skip_whitespace();
        Ok(())
    }

    fn string(&mut self) -> Result<(), &'static str> {
        self.position += 1; // the opening quote
        loop {
            match self.next_byte() {
                None => return Err("unterminated string"),
                Some(b'"') => return Ok(()),
                Some(b'\\') => self.escape()?,
                Some(0x00..=0x1f) => return Err("unescaped control character in a string"),
                Some(_) => {}
            }
        }
    }

    fn escape(&mut self) -> Result<(), &'static str> {
        match self.next_byte() {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(()),
            Some(b'u') => self.unicode_escape(),
            _ => Err("invalid escape in a string"),
        }
    }

    /// `\uXXXX`, where UTF-16 surrogates must come in high-low pairs (Postgres checks that
    /// too, and strict parsers reject lone ones).
    fn unicode_escape(&mut self) -> Result<(), &'static str> {
        let unit = self.hex4()?;
        match unit {
            0xD800..=0xDBFF => {
                let low = if self.eat(b'\\') && self.eat(b'u') {
                    self.hex4()?
                } else {
                    0
                };
                if (0xDC00..=0xDFFF).contains(&low) {
                    Ok(())
                } else {
                    Err("unpaired surrogate in a \\u escape")
                }
            }
            0xDC00..=0xDFFF => Err("unpaired surrogate in a \\u escape"),
            _ => Ok(()),
        }
    }

    fn hex4(&mut self) -> Result<u16, &'static str> {
        let mut unit = 0u16;
        for _ in 0..4 {
            let digit = self
                .next_byte()
                .and_then(hex_digit_value)
                .ok_or("invalid \\u escape")?;
            unit = unit << 4 | u16::from(digit);
        }
        Ok(unit)
    }
}

fn hex_digit_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// The special values of date, timestamp and timestamptz, kept as the strings Postgres uses.
fn write_if_infinity(out: &mut Vec<u8>, text: &[u8]) -> bool {
    let is_infinity = matches!(text, b"infinity" | b"-infinity");
    if is_infinity {
        write_plain_string(out, text);
    }
    is_infinity
}

/// Postgres marks BC values with a trailing ` BC` (after the time and offset, if any).
fn split_era(text: &[u8]) -> (&[u8], Era) {
    match text.strip_suffix(b" BC") {
        Some(body) => (body, Era::BeforeChrist),
        None => (text, Era::AnnoDomini),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Era {
    AnnoDomini,
    BeforeChrist,
}

fn write_date(out: &mut Vec<u8>, type_oid: u32, text: &[u8]) -> Result<(), CodecError> {
    if write_if_infinity(out, text) {
        return Ok(());
    }
    let (body, era) = split_era(text);
    let date = IsoDate::parse(body).ok_or_else(|| malformed(type_oid, "date", DATE_SHAPE))?;
    out.push(b'"');
    date.write(out, era)
        .map_err(|reason| malformed(type_oid, "date", reason))?;
    out.push(b'"');
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zone {
    Without,
    With,
}

fn write_timestamp(
    out: &mut Vec<u8>,
    type_oid: u32,
    text: &[u8],
    zone: Zone,
) -> Result<(), CodecError> {
    let format = match zone {
        Zone::Without => "timestamp",
        Zone::With => "timestamptz",
    };
    if write_if_infinity(out, text) {
        return Ok(());
    }
    let (body, era) = split_era(text);
    let space = body
        .iter()
        .position(|&byte| byte == b' ')
        .ok_or_else(|| malformed(type_oid, format, "expected a space between date and time"))?;
    let date =
        IsoDate::parse(&body[..space]).ok_or_else(|| malformed(type_oid, format, DATE_SHAPE))?;
    let time_and_offset = &body[space + 1..];
    let clock_length = clock_length(time_and_offset)
        .ok_or_else(|| malformed(type_oid, format, "expected a time as hh:mm:ss[.ffffff]"))?;
    let (clock, offset) = time_and_offset.split_at(clock_length);

    out.push(b'"');
    date.write(out, era)
        .map_err(|reason| malformed(type_oid, format, reason))?;
    out.push(b'T');
    out.extend_from_slice(clock);
    match zone {
        Zone::Without if offset.is_empty() => {}
        Zone::Without => {
            return Err(malformed(
                type_oid,
                format,
                "unexpected text after the time",
            ));
        }
        Zone::With => write_utc_offset(out, offset)
            .ok_or_else(|| malformed(type_oid, format, "expected an offset as ±hh[:mm[:ss]]"))?,
    }
    out.push(b'"');
    Ok(())
}

const DATE_SHAPE: &str = "expected a date as yyyy-mm-dd";

/// A date as ISO DateStyle prints it: a year of four or more digits, `-mm-dd`.
struct IsoDate<'a> {
    year: u32,
    month_and_day: &'a [u8],
}

impl<'a> IsoDate<'a> {
    fn parse(text: &'a [u8]) -> Option<Self> {
        let dash = text.iter().position(|&byte| byte == b'-')?;
        let (year_digits, month_and_day) = text.split_at(dash);
        // Postgres pads years to four digits; nine digits is far beyond its range and safe in
        // a u32.
        if !(4..=9).contains(&year_digits.len()) || !all_digits(year_digits) {
            return None;
        }
        let year = year_digits
            .iter()
            .fold(0u32, |year, digit| year * 10 + u32::from(digit - b'0'));
        matches_pattern(month_and_day, b"-00-00").then_some(Self {
            year,
            month_and_day,
        })
    }

    /// ISO 8601 with astronomical years: 1 BC is 0000, 44 BC is -0043, and years past 9999
    /// take a `+` (the expanded representation).
    fn write(&self, out: &mut Vec<u8>, era: Era) -> Result<(), &'static str> {
        match era {
            Era::AnnoDomini if self.year > 9999 => {
                out.push(b'+');
                push_padded_decimal(out, self.year, 4);
            }
            Era::AnnoDomini => push_padded_decimal(out, self.year, 4),
            Era::BeforeChrist if self.year == 0 => return Err("there is no year 0 BC"),
            Era::BeforeChrist if self.year == 1 => push_padded_decimal(out, 0, 4),
            Era::BeforeChrist => {
                out.push(b'-');
                push_padded_decimal(out, self.year - 1, 4);
            }
        }
        out.extend_from_slice(self.month_and_day);
        Ok(())
    }
}

/// An ISO 8601 date or timestamp the codec wrote, back in PostgreSQL's own output form (which
/// its input reads): `T` becomes a space, `Z` becomes `+00`, astronomical years at or below 0
/// become ` BC` years (0000 is 1 BC, -0043 is 44 BC), and a leading `+` goes.
fn iso_to_postgres(iso: &str) -> String {
    let iso = iso.replacen('T', " ", 1);
    let iso = match iso.strip_suffix('Z') {
        Some(utc) => format!("{utc}+00"),
        None => iso,
    };
    let iso = iso.as_str();
    let (negative, rest) = match iso.as_bytes().first() {
        Some(b'-') if iso != "-infinity" => (true, &iso[1..]),
        Some(b'+') => (false, &iso[1..]),
        _ => (false, iso),
    };
    let year_digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let Ok(year) = rest[..year_digits].parse::<u32>() else {
        return iso.to_owned();
    };
    if !negative && year > 0 {
        return rest.to_owned();
    }
    // Astronomical year 0 is 1 BC, -N is N + 1 BC.
    let bc_year = if negative { year + 1 } else { 1 };
    format!("{bc_year:04}{} BC", &rest[year_digits..])
}

fn push_padded_decimal(out: &mut Vec<u8>, value: u32, width: usize) {
    let mut digits = [0u8; 10];
    let mut remaining = value;
    let mut count = 0;
    loop {
        digits[count] = b'0' + (remaining % 10) as u8;
        count += 1;
        remaining /= 10;
        if remaining == 0 {
            break;
        }
    }
    out.extend(std::iter::repeat_n(b'0', width.saturating_sub(count)));
    out.extend(digits[..count].iter().rev());
}

fn all_digits(text: &[u8]) -> bool {
    text.iter().all(u8::is_ascii_digit)
}

/// `pattern` uses `0` for "any digit"; every other byte must match exactly.
fn matches_pattern(text: &[u8], pattern: &[u8]) -> bool {
    text.len() == pattern.len()
        && text
            .iter()
            .zip(pattern)
            .all(|(&byte, &expected)| match expected {
                b'0' => byte.is_ascii_digit(),
                _ => byte == expected,
            })
}

/// The length of `hh:mm:ss[.fraction]` at the start of `text`.
fn clock_length(text: &[u8]) -> Option<usize> {
    const HMS: &[u8] = b"00:00:00";
    if !matches_pattern(text.get(..HMS.len())?, HMS) {
        return None;
    }
    match text.get(HMS.len()) {
        Some(b'.') => {
            let fraction_digits = text[HMS.len() + 1..]
                .iter()
                .take_while(|byte| byte.is_ascii_digit())
                .count();
            (fraction_digits > 0).then_some(HMS.len() + 1 + fraction_digits)
        }
        _ => Some(HMS.len()),
    }
}

/// With TimeZone=UTC the offset is always `+00`, written `Z`. Any other offset (a connection
/// that did not pin TimeZone) still names the same instant, written `±hh:mm[:ss]`.
fn write_utc_offset(out: &mut Vec<u8>, offset: &[u8]) -> Option<()> {
    let (sign, hours_and_more) = offset.split_first()?;
    let patterns: [&[u8]; 3] = [b"00", b"00:00", b"00:00:00"];
    let valid = matches!(sign, b'+' | b'-')
        && patterns
            .iter()
            .any(|pattern| matches_pattern(hours_and_more, pattern));
    if !valid {
        return None;
    }
    if hours_and_more
        .iter()
        .all(|&byte| matches!(byte, b'0' | b':'))
    {
        out.push(b'Z');
    } else {
        out.extend_from_slice(offset);
        if hours_and_more.len() == 2 {
            out.extend_from_slice(b":00");
        }
    }
    Some(())
}

/// Hex bytea to padded standard base64, decoded and encoded in chunks on the stack.
fn write_bytea(out: &mut Vec<u8>, type_oid: u32, text: &[u8]) -> Result<(), CodecError> {
    // A multiple of three, so no chunk but the last needs base64 padding.
    const CHUNK_BYTES: usize = 3 * 256;
    let hex = text
        .strip_prefix(b"\\x")
        .ok_or_else(|| malformed(type_oid, "bytea", "expected hex format starting with \\x"))?;
    if hex.len() % 2 != 0 {
        return Err(malformed(type_oid, "bytea", "odd number of hex digits"));
    }
    let mut decoded = [0u8; CHUNK_BYTES];
    out.push(b'"');
    for hex_chunk in hex.chunks(CHUNK_BYTES * 2) {
        let bytes = &mut decoded[..hex_chunk.len() / 2];
        for (byte, pair) in bytes.iter_mut().zip(hex_chunk.chunks_exact(2)) {
            let high = hex_digit_value(pair[0]);
            let low = hex_digit_value(pair[1]);
            let (Some(high), Some(low)) = (high, low) else {
                return Err(malformed(type_oid, "bytea", "invalid hex digit"));
            };
            *byte = high << 4 | low;
        }
        append_base64(out, bytes);
    }
    out.push(b'"');
    Ok(())
}

fn append_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    let start = out.len();
    let encoded_length =
        base64::encoded_len(bytes.len(), true).expect("a bytea chunk's base64 length fits usize");
    out.resize(start + encoded_length, 0);
    BASE64
        .encode_slice(bytes, &mut out[start..])
        .expect("the buffer is sized by encoded_len");
}

#[derive(Debug, Clone, Copy)]
struct ArrayType {
    array_oid: u32,
    element_oid: u32,
    delimiter: u8,
}

enum ArrayElement<'a> {
    Null,
    /// Borrowed from the literal unless backslash escapes had to be removed.
    Text(Cow<'a, [u8]>),
}

/// A position in an array literal as `array_out` prints it (and `array_in` reads it).
struct ArrayCursor<'a> {
    text: &'a [u8],
    position: usize,
    array: ArrayType,
}

impl<'a> ArrayCursor<'a> {
    fn malformed(&self, reason: &'static str) -> CodecError {
        malformed(self.array.array_oid, "array literal", reason)
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.position).copied()
    }

    fn next_byte(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.position += 1;
        Some(byte)
    }

    fn eat(&mut self, expected: u8) -> bool {
        let matched = self.peek() == Some(expected);
        if matched {
            self.position += 1;
        }
        matched
    }

    fn is_whitespace(&self, byte: u8) -> bool {
        byte != self.array.delimiter && matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
    }

    fn skip_whitespace(&mut self) {
        while self.peek().is_some_and(|byte| self.is_whitespace(byte)) {
            self.position += 1;
        }
    }

    /// Postgres prints `[lower:upper]…=` before the braces when a lower bound is not 1. JSON
    /// arrays have no bounds, so they are checked for shape and dropped.
    fn skip_bounds(&mut self) -> Result<(), CodecError> {
        if self.peek() != Some(b'[') {
            return Ok(());
        }
        let equals = self.text[self.position..]
            .iter()
            .position(|&byte| byte == b'=')
            .ok_or_else(|| self.malformed("dimension bounds without '='"))?;
        let bounds = &self.text[self.position..self.position + equals];
        let plausible = bounds.iter().all(|&byte| {
            byte.is_ascii_digit() || matches!(byte, b'[' | b']' | b':' | b'-' | b'+' | b' ')
        });
        if !plausible {
            return Err(self.malformed("malformed dimension bounds"));
        }
        self.position += equals + 1;
        Ok(())
    }

    fn element(&mut self) -> Result<ArrayElement<'a>, CodecError> {
        if self.eat(b'"') {
            self.quoted_element().map(ArrayElement::Text)
        } else {
            self.unquoted_element()
        }
    }

    /// After the opening quote: text up to the closing quote, where `\x` stands for `x`.
    fn quoted_element(&mut self) -> Result<Cow<'a, [u8]>, CodecError> {
        let text: &'a [u8] = self.text;
        let start = self.position;
        let mut unescaped: Option<Vec<u8>> = None;
        loop {
            let at = self.position;
            match self.next_byte() {
                None => return Err(self.malformed("unterminated quoted element")),
                Some(b'"') => {
                    return Ok(match unescaped {
                        Some(bytes) => Cow::Owned(bytes),
                        None => Cow::Borrowed(&text[start..at]),
                    });
                }
                Some(b'\\') => {
                    let escaped = self
                        .next_byte()
                        .ok_or_else(|| self.malformed("backslash at the end of the literal"))?;
                    unescaped
                        .get_or_insert_with(|| text[start..at].to_vec())
                        .push(escaped);
                }
                Some(byte) => {
                    if let Some(bytes) = unescaped.as_mut() {
                        bytes.push(byte);
                    }
                }
            }
        }
    }

    /// Text up to the next delimiter or `}`; surrounding whitespace is not part of it, and an
    /// unquoted `NULL` (any case) is SQL NULL.
    fn unquoted_element(&mut self) -> Result<ArrayElement<'a>, CodecError> {
        let text: &'a [u8] = self.text;
        let start = self.position;
        let mut unescaped: Option<Vec<u8>> = None;
        // Where the element ends once trailing whitespace is dropped; escaped bytes count.
        let mut significant_end = start;
        let mut significant_unescaped_length = 0;
        loop {
            let at = self.position;
            match self.peek() {
                None => return Err(self.malformed("unterminated array")),
                Some(byte) if byte == self.array.delimiter || byte == b'}' => break,
                Some(b'{' | b'"') => {
                    return Err(self.malformed("unexpected '{' or '\"' in an unquoted element"));
                }
                Some(b'\\') => {
                    self.position += 1;
                    let escaped = self
                        .next_byte()
                        .ok_or_else(|| self.malformed("backslash at the end of the literal"))?;
                    let bytes = unescaped.get_or_insert_with(|| text[start..at].to_vec());
                    bytes.push(escaped);
                    significant_unescaped_length = bytes.len();
                    significant_end = self.position;
                }
                Some(byte) => {
                    self.position += 1;
                    if let Some(bytes) = unescaped.as_mut() {
                        bytes.push(byte);
                    }
                    if !self.is_whitespace(byte) {
                        significant_end = self.position;
                        significant_unescaped_length = unescaped.as_ref().map_or(0, Vec::len);
                    }
                }
            }
        }
        match unescaped {
            Some(mut bytes) => {
                bytes.truncate(significant_unescaped_length);
                Ok(ArrayElement::Text(Cow::Owned(bytes)))
            }
            None => {
                let element = &text[start..significant_end];
                if element.is_empty() {
                    Err(self.malformed("empty unquoted element"))
                } else if element.eq_ignore_ascii_case(b"NULL") {
                    Ok(ArrayElement::Null)
                } else {
                    Ok(ArrayElement::Text(Cow::Borrowed(element)))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    const BOOL: u32 = 16;
    const BYTEA: u32 = 17;
    const CHAR: u32 = 18;
    const NAME: u32 = 19;
    const INT8: u32 = 20;
    const INT2: u32 = 21;
    const INT4: u32 = 23;
    const TEXT: u32 = 25;
    const OID: u32 = 26;
    const JSON: u32 = 114;
    const XML: u32 = 142;
    const FLOAT4: u32 = 700;
    const FLOAT8: u32 = 701;
    const MONEY: u32 = 790;
    const BPCHAR: u32 = 1042;
    const VARCHAR: u32 = 1043;
    const DATE: u32 = 1082;
    const TIME: u32 = 1083;
    const TIMESTAMP: u32 = 1114;
    const TIMESTAMPTZ: u32 = 1184;
    const INTERVAL: u32 = 1186;
    const TIMETZ: u32 = 1266;
    const BIT: u32 = 1560;
    const VARBIT: u32 = 1562;
    const NUMERIC: u32 = 1700;
    const UUID: u32 = 2950;
    const JSONB: u32 = 3802;
    const INT4RANGE: u32 = 3904;

    const BOOL_ARRAY: u32 = 1000;
    const BYTEA_ARRAY: u32 = 1001;
    const INT4_ARRAY: u32 = 1007;
    const TEXT_ARRAY: u32 = 1009;
    const INT8_ARRAY: u32 = 1016;
    const FLOAT8_ARRAY: u32 = 1022;
    const BOX_ARRAY: u32 = 1020;
    const JSONB_ARRAY: u32 = 3807;
    const NUMERIC_ARRAY: u32 = 1231;
    const DATE_ARRAY: u32 = 1182;
    const TIMESTAMPTZ_ARRAY: u32 = 1185;

    const MOOD: u32 = 90_001;
    const MOOD_DOMAIN: u32 = 90_002;
    const MOOD_ARRAY: u32 = 90_003;
    const POSITIVE_INT: u32 = 90_004;
    const POSITIVE_INT_DOMAIN: u32 = 90_005;
    const CYCLIC_DOMAIN_A: u32 = 90_006;
    const CYCLIC_DOMAIN_B: u32 = 90_007;
    const SELF_NESTED_ARRAY: u32 = 90_008;
    const COMPOSITE: u32 = 90_009;
    const UNKNOWN: u32 = 999_999;

    fn codec_with(options: CodecOptions) -> Codec {
        let mut codec = Codec::new(options);
        codec.register(MOOD, TypeKind::Enum);
        codec.register(MOOD_DOMAIN, TypeKind::Domain { base_oid: MOOD });
        codec.register(
            MOOD_ARRAY,
            TypeKind::Array {
                element_oid: MOOD,
                delimiter: b',',
            },
        );
        codec.register(POSITIVE_INT, TypeKind::Domain { base_oid: INT4 });
        codec.register(
            POSITIVE_INT_DOMAIN,
            TypeKind::Domain {
                base_oid: POSITIVE_INT,
            },
        );
        codec.register(
            CYCLIC_DOMAIN_A,
            TypeKind::Domain {
                base_oid: CYCLIC_DOMAIN_B,
            },
        );
        codec.register(
            CYCLIC_DOMAIN_B,
            TypeKind::Domain {
                base_oid: CYCLIC_DOMAIN_A,
            },
        );
        codec.register(
            SELF_NESTED_ARRAY,
            TypeKind::Array {
                element_oid: SELF_NESTED_ARRAY,
                delimiter: b',',
            },
        );
        codec.register(COMPOSITE, TypeKind::Composite);
        codec
    }

    fn codec() -> Codec {
        codec_with(CodecOptions::default())
    }

    fn encode_with(codec: &Codec, oid: u32, text: &[u8]) -> Result<String, CodecError> {
        let mut out = Vec::new();
        codec.write_json(&mut out, oid, text)?;
        Ok(String::from_utf8(out).expect("the codec writes UTF-8"))
    }

    fn encode(oid: u32, text: &str) -> Result<String, CodecError> {
        encode_with(&codec(), oid, text.as_bytes())
    }

    /// The exact bytes, and that they parse to the expected value.
    #[track_caller]
    fn assert_encodes(oid: u32, text: &str, expected: &str) {
        let actual =
            encode(oid, text).unwrap_or_else(|error| panic!("type {oid}, text {text:?}: {error}"));
        assert_eq!(actual, expected, "type {oid}, text {text:?}");
        let actual_value: Value = serde_json::from_str(&actual).expect("the output parses");
        let expected_value: Value = serde_json::from_str(expected).expect("the expectation parses");
        assert_eq!(actual_value, expected_value, "type {oid}, text {text:?}");
    }

    #[track_caller]
    fn assert_rejects(oid: u32, text: &[u8]) {
        let mut out = b"prefix".to_vec();
        let result = codec().write_json(&mut out, oid, text);
        assert!(
            result.is_err(),
            "type {oid}, text {:?} was accepted as {}",
            String::from_utf8_lossy(text),
            String::from_utf8_lossy(&out)
        );
        assert_eq!(out, b"prefix", "a failed write leaves the buffer as it was");
    }

    #[test]
    fn booleans() {
        assert_encodes(BOOL, "t", "true");
        assert_encodes(BOOL, "f", "false");
        assert_rejects(BOOL, b"true");
        assert_rejects(BOOL, b"");
    }

    #[test]
    fn integers_keep_their_digits() {
        assert_encodes(INT2, "-32768", "-32768");
        assert_encodes(INT4, "2147483647", "2147483647");
        assert_encodes(INT8, "-9223372036854775808", "-9223372036854775808");
        assert_encodes(INT8, "9223372036854775807", "9223372036854775807");
        assert_encodes(OID, "4294967295", "4294967295");
        assert_encodes(INT4, "0", "0");
        for bad in [
            "",
            "-",
            "+1",
            "01",
            "1.0",
            "1e3",
            " 1",
            "1 ",
            "abc",
            "9223372036854775808",
        ] {
            assert_rejects(INT8, bad.as_bytes());
        }
    }

    #[test]
    fn floats_keep_postgres_digits_and_spell_out_non_finite_values() {
        assert_encodes(FLOAT8, "0.1", "0.1");
        assert_encodes(FLOAT8, "1e+100", "1e+100");
        assert_encodes(FLOAT8, "1.7976931348623157e+308", "1.7976931348623157e+308");
        assert_encodes(FLOAT8, "5e-324", "5e-324");
        assert_encodes(FLOAT8, "-0", "-0");
        assert_encodes(FLOAT4, "3.4028235e+38", "3.4028235e+38");
        assert_encodes(FLOAT8, "NaN", "\"NaN\"");
        assert_encodes(FLOAT8, "Infinity", "\"Infinity\"");
        assert_encodes(FLOAT4, "-Infinity", "\"-Infinity\"");
        for bad in ["", "inf", "nan", ".5", "5.", "1e", "1e999", "0x10", "1,5"] {
            assert_rejects(FLOAT8, bad.as_bytes());
        }
    }

    #[test]
    fn numerics_are_exact_strings_by_default() {
        let digits = "12345678901234567890.12345678901234567890";
        assert_encodes(NUMERIC, digits, &format!("\"{digits}\""));
        assert_encodes(NUMERIC, "-0.000100", "\"-0.000100\"");
        assert_encodes(NUMERIC, "NaN", "\"NaN\"");
        assert_encodes(NUMERIC, "-Infinity", "\"-Infinity\"");
        for bad in ["", "1e5", "1.", "+1", "00.1", "one"] {
            assert_rejects(NUMERIC, bad.as_bytes());
        }
    }

    #[test]
    fn numerics_can_be_exact_numbers() {
        let codec = codec_with(CodecOptions {
            numeric: NumericRepresentation::Number,
        });
        let digits = "12345678901234567890.12345678901234567890";
        assert_eq!(
            encode_with(&codec, NUMERIC, digits.as_bytes()).unwrap(),
            digits
        );
        assert_eq!(encode_with(&codec, NUMERIC, b"NaN").unwrap(), "\"NaN\"");
        assert_eq!(
            encode_with(&codec, NUMERIC, b"Infinity").unwrap(),
            "\"Infinity\""
        );
        assert_eq!(
            encode_with(&codec, NUMERIC_ARRAY, b"{1.50,NaN}").unwrap(),
            "[1.50,\"NaN\"]"
        );
    }

    #[test]
    fn text_like_types_are_escaped_strings() {
        assert_encodes(TEXT, "plain", "\"plain\"");
        assert_encodes(
            TEXT,
            "quote \" backslash \\ newline \n tab \t",
            r#""quote \" backslash \\ newline \n tab \t""#,
        );
        assert_encodes(TEXT, "\u{1}\u{1f}", r#""\u0001\u001f""#);
        assert_encodes(TEXT, "héllo wörld ✓ 😀", "\"héllo wörld ✓ 😀\"");
        assert_encodes(TEXT, "", "\"\"");
        assert_encodes(BPCHAR, "ab   ", "\"ab   \"");
        assert_encodes(VARCHAR, "x", "\"x\"");
        assert_encodes(NAME, "pg_catalog", "\"pg_catalog\"");
        assert_encodes(CHAR, "x", "\"x\"");
        assert_encodes(
            UUID,
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "\"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11\"",
        );
        assert_encodes(XML, "<a href=\"x\">1</a>", r#""<a href=\"x\">1</a>""#);
        assert_encodes(MONEY, "$12.34", "\"$12.34\"");
        assert_encodes(BIT, "1010", "\"1010\"");
        assert_encodes(VARBIT, "101", "\"101\"");
        assert_encodes(TIME, "03:04:05.123456", "\"03:04:05.123456\"");
        assert_encodes(TIMETZ, "03:04:05+02", "\"03:04:05+02\"");
        assert_encodes(INTERVAL, "P1Y2M3DT4H5M6.5S", "\"P1Y2M3DT4H5M6.5S\"");
    }

    #[test]
    fn the_exact_control_character_encoding() {
        // U+007F is not a control character for JSON, so it is written as is.
        assert_eq!(encode(TEXT, "\u{7f}").unwrap(), "\"\u{7f}\"");
    }

    #[test]
    fn invalid_utf8_is_an_error_not_a_replacement() {
        let error = codec().write_json(&mut Vec::new(), TEXT, b"ab\xffcd");
        assert_eq!(
            error,
            Err(CodecError::InvalidUtf8 {
                type_oid: TEXT,
                valid_up_to: 2
            })
        );
        assert_rejects(UNKNOWN, b"\xc3");
        assert_rejects(JSONB, b"\"\xff\"");
        assert_rejects(TEXT_ARRAY, b"{\"\xff\"}");
    }

    #[test]
    fn json_is_embedded_byte_for_byte() {
        let document = r#"{"a": [1, 2.50, {"b": null}], "big": 123456789012345678901234567890}"#;
        assert_encodes(JSONB, document, document);
        assert_encodes(
            JSON,
            " [1, \"\\ud83d\\ude00\"] ",
            " [1, \"\\ud83d\\ude00\"] ",
        );
        // Beyond f64, so serde_json cannot hold it, yet it is valid JSON and copied as is.
        assert_eq!(encode(JSON, "[1e400]").unwrap(), "[1e400]");
        assert_encodes(JSON, "\"\\u0000\"", "\"\\u0000\"");
        assert_encodes(JSONB, "null", "null");
        assert_encodes(JSONB, "-0.5e-3", "-0.5e-3");
        assert_encodes(JSONB, "{}", "{}");
        assert_encodes(JSONB, "[[],{}]", "[[],{}]");
    }

    #[test]
    fn json_nesting_deeper_than_recursive_parsers_allow_is_accepted() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let encoded = encode(JSONB, &deep).expect("deep JSON is valid");
        assert_eq!(encoded, deep);
    }

    #[test]
    fn invalid_json_is_rejected() {
        for bad in [
            "",
            " ",
            "{",
            "[1,]",
            "{\"a\"}",
            "{\"a\":}",
            "{a:1}",
            "tru",
            "nul",
            "01",
            "1.",
            "\"open",
            "\"\\x\"",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "\"\\ud800\\u0041\"",
            "[1] 2",
            "\"tab\there\"",
            "{\"a\":1,}",
            "[1 2]",
        ] {
            assert_rejects(JSONB, bad.as_bytes());
        }
    }

    #[test]
    fn dates_are_iso_with_astronomical_years() {
        assert_encodes(DATE, "2024-01-02", "\"2024-01-02\"");
        assert_encodes(DATE, "0044-03-15 BC", "\"-0043-03-15\"");
        assert_encodes(DATE, "0001-01-01 BC", "\"0000-01-01\"");
        assert_encodes(DATE, "0002-01-01 BC", "\"-0001-01-01\"");
        assert_encodes(DATE, "4714-11-24 BC", "\"-4713-11-24\"");
        assert_encodes(DATE, "0001-01-01", "\"0001-01-01\"");
        assert_encodes(DATE, "10000-01-01", "\"+10000-01-01\"");
        assert_encodes(DATE, "5874897-12-31", "\"+5874897-12-31\"");
        assert_encodes(DATE, "infinity", "\"infinity\"");
        assert_encodes(DATE, "-infinity", "\"-infinity\"");
        for bad in [
            "",
            "2024-1-02",
            "24-01-02",
            "2024/01/02",
            "2024-01-02 ",
            "0000-01-01 BC",
            "01/02/2024",
            "2024-01-02 BC BC",
        ] {
            assert_rejects(DATE, bad.as_bytes());
        }
    }

    #[test]
    fn timestamps_are_iso_without_a_zone() {
        assert_encodes(
            TIMESTAMP,
            "2024-01-02 03:04:05.123456",
            "\"2024-01-02T03:04:05.123456\"",
        );
        assert_encodes(TIMESTAMP, "2024-01-02 03:04:05", "\"2024-01-02T03:04:05\"");
        assert_encodes(
            TIMESTAMP,
            "0044-03-15 12:00:00 BC",
            "\"-0043-03-15T12:00:00\"",
        );
        assert_encodes(TIMESTAMP, "infinity", "\"infinity\"");
        for bad in [
            "2024-01-02",
            "2024-01-02T03:04:05",
            "2024-01-02 03:04",
            "2024-01-02 03:04:05.",
            "2024-01-02 03:04:05+00",
        ] {
            assert_rejects(TIMESTAMP, bad.as_bytes());
        }
    }

    #[test]
    fn timestamptz_in_utc_ends_in_z() {
        assert_encodes(
            TIMESTAMPTZ,
            "2024-01-02 03:04:05.123456+00",
            "\"2024-01-02T03:04:05.123456Z\"",
        );
        assert_encodes(
            TIMESTAMPTZ,
            "0044-03-15 12:00:00+00 BC",
            "\"-0043-03-15T12:00:00Z\"",
        );
        assert_encodes(
            TIMESTAMPTZ,
            "12345-06-07 08:09:10+00",
            "\"+12345-06-07T08:09:10Z\"",
        );
        assert_encodes(TIMESTAMPTZ, "-infinity", "\"-infinity\"");
        // Only reachable when a connection forgot TimeZone=UTC; the instant stays exact.
        assert_encodes(
            TIMESTAMPTZ,
            "2024-01-02 03:04:05+05:30",
            "\"2024-01-02T03:04:05+05:30\"",
        );
        assert_encodes(
            TIMESTAMPTZ,
            "2024-01-02 03:04:05-03",
            "\"2024-01-02T03:04:05-03:00\"",
        );
        for bad in [
            "2024-01-02 03:04:05",
            "2024-01-02 03:04:05+0",
            "2024-01-02 03:04:05 UTC",
            "2024-01-02 03:04:05+00:",
        ] {
            assert_rejects(TIMESTAMPTZ, bad.as_bytes());
        }
    }

    #[test]
    fn bytea_hex_becomes_padded_base64() {
        assert_encodes(BYTEA, "\\x48656c6c6f", "\"SGVsbG8=\"");
        assert_encodes(BYTEA, "\\x", "\"\"");
        assert_encodes(BYTEA, "\\x00FF", "\"AP8=\"");
        for bad in ["48656c", "\\x4", "\\x4g", "\\000", ""] {
            assert_rejects(BYTEA, bad.as_bytes());
        }
    }

    #[test]
    fn bytea_longer_than_one_chunk_matches_one_shot_base64() {
        let bytes: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 256) as u8).collect();
        let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
        let expected = format!("\"{}\"", BASE64.encode(&bytes));
        assert_encodes(BYTEA, &format!("\\x{hex}"), &expected);
    }

    #[test]
    fn arrays_of_scalars() {
        assert_encodes(INT4_ARRAY, "{1,2,3}", "[1,2,3]");
        assert_encodes(INT4_ARRAY, "{}", "[]");
        assert_encodes(INT4_ARRAY, "{1,NULL,3}", "[1,null,3]");
        assert_encodes(BOOL_ARRAY, "{t,f,NULL}", "[true,false,null]");
        assert_encodes(
            FLOAT8_ARRAY,
            "{1.5,NaN,-Infinity}",
            "[1.5,\"NaN\",\"-Infinity\"]",
        );
        assert_encodes(NUMERIC_ARRAY, "{1.10,NaN}", "[\"1.10\",\"NaN\"]");
        assert_encodes(
            DATE_ARRAY,
            "{2024-01-02,infinity}",
            "[\"2024-01-02\",\"infinity\"]",
        );
        assert_encodes(
            TIMESTAMPTZ_ARRAY,
            r#"{"2024-01-02 03:04:05+00","0044-03-15 12:00:00+00 BC"}"#,
            r#"["2024-01-02T03:04:05Z","-0043-03-15T12:00:00Z"]"#,
        );
        assert_encodes(BYTEA_ARRAY, r#"{"\\x00ff","\\x"}"#, r#"["AP8=",""]"#);
    }

    #[test]
    fn nested_arrays_keep_their_dimensions() {
        assert_encodes(INT4_ARRAY, "{{1,2},{3,4}}", "[[1,2],[3,4]]");
        assert_encodes(INT8_ARRAY, "{{{1},{2}},{{3},{4}}}", "[[[1],[2]],[[3],[4]]]");
        assert_encodes(INT4_ARRAY, "{{1,NULL},{NULL,4}}", "[[1,null],[null,4]]");
        assert_encodes(INT4_ARRAY, "{{{{{{1}}}}}}", "[[[[[[1]]]]]]");
        assert_rejects(INT4_ARRAY, b"{{{{{{{1}}}}}}}");
    }

    #[test]
    fn quoted_elements_and_null() {
        assert_encodes(
            TEXT_ARRAY,
            r#"{"a b","c\"d",NULL,"NULL","e\\f","",null,"{x}",plain}"#,
            r#"["a b","c\"d",null,"NULL","e\\f","",null,"{x}","plain"]"#,
        );
        assert_encodes(TEXT_ARRAY, r#"{"a,b","}"}"#, r#"["a,b","}"]"#);
        assert_encodes(TEXT_ARRAY, "{héllo,😀}", "[\"héllo\",\"😀\"]");
    }

    #[test]
    fn whitespace_and_unquoted_escapes_as_array_in_reads_them() {
        assert_encodes(TEXT_ARRAY, "{ a b , c }", "[\"a b\",\"c\"]");
        assert_encodes(TEXT_ARRAY, r"{a\,b,c\ }", r#"["a,b","c "]"#);
        assert_encodes(INT4_ARRAY, " { 1 , 2 } ", "[1,2]");
    }

    #[test]
    fn bounds_are_dropped() {
        assert_encodes(INT4_ARRAY, "[0:1]={7,8}", "[7,8]");
        assert_encodes(INT4_ARRAY, "[-2:-1][1:2]={{1,2},{3,4}}", "[[1,2],[3,4]]");
        assert_rejects(INT4_ARRAY, b"[0:1]{7,8}");
        assert_rejects(INT4_ARRAY, b"[a:b]={7,8}");
    }

    #[test]
    fn box_arrays_use_their_own_delimiter() {
        assert_encodes(
            BOX_ARRAY,
            "{(1,1),(0,0);(2,2),(1,1)}",
            r#"["(1,1),(0,0)","(2,2),(1,1)"]"#,
        );
    }

    #[test]
    fn jsonb_arrays_embed_their_documents() {
        assert_encodes(
            JSONB_ARRAY,
            r#"{"{\"a\": 1}","[1, \"x\"]",NULL}"#,
            r#"[{"a": 1},[1, "x"],null]"#,
        );
    }

    #[test]
    fn malformed_arrays_are_rejected() {
        for bad in [
            "", "1,2", "{", "{1,2", "{1,,2}", "{,}", "{1,}", "{1}}", "{1} x", "{\"a}", "{a\"b}",
            "{1 {2}}", "{\"a\\", "{{1},2",
        ] {
            assert_rejects(INT4_ARRAY, bad.as_bytes());
            assert_rejects(TEXT_ARRAY, bad.as_bytes());
        }
        assert_rejects(INT4_ARRAY, b"{a}");
    }

    #[test]
    fn enums_domains_and_their_arrays() {
        assert_encodes(MOOD, "happy", "\"happy\"");
        assert_encodes(MOOD_DOMAIN, "sad", "\"sad\"");
        assert_encodes(MOOD_ARRAY, "{happy,NULL,sad}", "[\"happy\",null,\"sad\"]");
        assert_encodes(POSITIVE_INT_DOMAIN, "42", "42");
        assert_rejects(POSITIVE_INT_DOMAIN, b"forty-two");
    }

    #[test]
    fn domain_cycles_end_in_an_error() {
        let error = codec().write_json(&mut Vec::new(), CYCLIC_DOMAIN_A, b"x");
        assert!(
            matches!(error, Err(CodecError::NestedTooDeep { .. })),
            "{error:?}"
        );
    }

    #[test]
    fn array_elements_may_themselves_be_arrays_of_another_type() {
        // An array whose element type is an array type: each element is a quoted literal.
        assert_encodes(SELF_NESTED_ARRAY, r#"{"{}","{\"{}\"}"}"#, "[[],[[]]]");
        assert_rejects(SELF_NESTED_ARRAY, b"{x}");
    }

    #[test]
    fn unknown_composite_and_range_types_pass_through_as_text() {
        assert_encodes(UNKNOWN, "anything \"at\" all", r#""anything \"at\" all""#);
        assert_encodes(COMPOSITE, "(1,\"a b\")", r#""(1,\"a b\")""#);
        assert_encodes(INT4RANGE, "[1,5)", "\"[1,5)\"");
    }

    #[test]
    fn registering_a_builtin_oid_does_not_change_its_encoding() {
        let mut codec = codec();
        codec.register(INT4, TypeKind::Other);
        codec.register(INT4_ARRAY, TypeKind::Other);
        assert_eq!(encode_with(&codec, INT4, b"7").unwrap(), "7");
        assert_eq!(encode_with(&codec, INT4_ARRAY, b"{7}").unwrap(), "[7]");
    }

    #[test]
    fn output_is_appended_to_what_the_buffer_holds() {
        let mut out = b"[".to_vec();
        let codec = codec();
        codec.write_json(&mut out, INT4, b"1").unwrap();
        out.push(b',');
        codec.write_json(&mut out, TEXT, b"a").unwrap();
        out.push(b']');
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            json!([1, "a"])
        );
    }

    #[test]
    fn errors_name_the_type_and_the_problem() {
        let error = codec().write_json(&mut Vec::new(), INT4, b"x").unwrap_err();
        let message = error.to_string();
        assert!(message.contains("type 23"), "{message}");
        assert!(message.contains("integer"), "{message}");
    }

    #[test]
    fn session_settings_cover_every_format_the_codec_reads() {
        let names: Vec<&str> = SESSION_SETTINGS.iter().map(|(name, _)| *name).collect();
        for required in [
            "DateStyle",
            "IntervalStyle",
            "TimeZone",
            "extra_float_digits",
            "bytea_output",
            "client_encoding",
        ] {
            assert!(names.contains(&required), "{required} is not pinned");
        }
    }

    const FUZZED_OIDS: &[u32] = &[
        BOOL,
        BYTEA,
        INT2,
        INT4,
        INT8,
        OID,
        TEXT,
        JSON,
        JSONB,
        FLOAT4,
        FLOAT8,
        NUMERIC,
        DATE,
        TIMESTAMP,
        TIMESTAMPTZ,
        INTERVAL,
        UUID,
        BOOL_ARRAY,
        BYTEA_ARRAY,
        INT4_ARRAY,
        TEXT_ARRAY,
        FLOAT8_ARRAY,
        BOX_ARRAY,
        JSONB_ARRAY,
        NUMERIC_ARRAY,
        DATE_ARRAY,
        TIMESTAMPTZ_ARRAY,
        MOOD,
        MOOD_DOMAIN,
        MOOD_ARRAY,
        POSITIVE_INT_DOMAIN,
        CYCLIC_DOMAIN_A,
        SELF_NESTED_ARRAY,
        COMPOSITE,
        UNKNOWN,
    ];

    /// Bytes from the alphabet of the formats the codec parses, so the generator reaches deep
    /// into the parsers instead of failing at the first byte. No `u`, so no `\u` escapes: a
    /// lone surrogate is rejected anyway, and this keeps the property about our own syntax.
    fn structured_text() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            proptest::sample::select(b"{}[]\",\\ :.=+-0123456789abcdefxNULtTZBCe:;".to_vec()),
            0..48,
        )
    }

    fn any_text() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..48),
            structured_text(),
            "\\PC{0,24}".prop_map(String::into_bytes),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics_and_ok_output_is_json(
            oid in proptest::sample::select(FUZZED_OIDS),
            text in any_text(),
            numbers in any::<bool>(),
        ) {
            let codec = codec_with(CodecOptions {
                numeric: if numbers { NumericRepresentation::Number } else { NumericRepresentation::String },
            });
            let mut out = b"x".to_vec();
            match codec.write_json(&mut out, oid, &text) {
                Ok(()) => {
                    let parsed = serde_json::from_slice::<Value>(&out[1..]);
                    prop_assert!(
                        parsed.is_ok(),
                        "type {} text {:?} gave {:?}: {:?}",
                        oid,
                        String::from_utf8_lossy(&text),
                        String::from_utf8_lossy(&out[1..]),
                        parsed
                    );
                }
                Err(_) => prop_assert_eq!(&out, b"x"),
            }
        }
    }

    #[test]
    fn postgres_text_inverts_write_json_for_key_types() {
        let codec = Codec::new(CodecOptions::default());
        let cases: &[(u32, &str)] = &[
            (20, "9223372036854775807"),
            (701, "0.9407462388099621"),
            (701, "NaN"),
            (1700, "12345678901234567890.123456789012345678901"),
            (25, "qu\"ote\\back"),
            (16, "t"),
            (17, "\\x10ff00"),
            (2950, "550e8400-e29b-41d4-a716-446655440000"),
            (1082, "2024-01-02"),
            (1082, "0044-03-15 BC"),
            (1082, "0001-01-01 BC"),
            (1114, "2024-01-02 03:04:05.123456"),
            (1184, "2024-01-02 01:04:05.123456+00"),
            (1007, "{1,NULL,3}"),
            (1009, "{\"a b\",\"c\\\"d\",NULL}"),
            (1001, "{\"\\\\x01\",\"\\\\x\"}"),
            (3802, "{\"n\": 1.50}"),
        ];
        for (oid, text) in cases {
            let mut json = Vec::new();
            codec.write_json(&mut json, *oid, text.as_bytes()).unwrap();
            let json = String::from_utf8(json).unwrap();
            let back = codec.postgres_text(*oid, &json).unwrap().unwrap();
            let mut again = Vec::new();
            codec
                .write_json(&mut again, *oid, back.as_bytes())
                .unwrap_or_else(|error| panic!("{oid} {text:?} → {json} → {back:?}: {error}"));
            assert_eq!(
                String::from_utf8(again).unwrap(),
                json,
                "{oid} {text:?} → {back:?}"
            );
        }
        assert_eq!(
            codec.postgres_text(17, "\"EP8A\"").unwrap().unwrap(),
            "\\x10ff00"
        );
        assert_eq!(
            codec
                .postgres_text(1082, "\"-0043-03-15\"")
                .unwrap()
                .unwrap(),
            "0044-03-15 BC"
        );
        assert_eq!(codec.postgres_text(25, "null").unwrap(), None);
    }
}
