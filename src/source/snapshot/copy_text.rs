//! Decoding rows of `COPY … TO STDOUT` in text format into the values the codec reads.
//!
//! A text-format COPY row is the columns' output-function text, separated by tabs and ended by
//! a newline, with `\N` for NULL and backslash escapes for the characters that would break that
//! framing. Undoing the escapes gives exactly the text the simple-query path returns, so a
//! value reaches the codec the same way whichever path read it (design invariant 6).

use bytes::Bytes;

use crate::postgres::pgoutput::TupleValue;

/// A COPY row that cannot be what the server sends.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CopyTextError {
    #[error("a COPY row has {found} columns where {expected} were selected")]
    ColumnCount { expected: usize, found: usize },
    #[error("a COPY value ends with a lone backslash")]
    TrailingBackslash,
}

/// Decodes one row (without its newline) into `out`, which is cleared first. Values without
/// escapes share `line`'s buffer.
pub fn decode_row(
    line: &Bytes,
    expected_columns: usize,
    out: &mut Vec<TupleValue>,
) -> Result<(), CopyTextError> {
    out.clear();
    let mut start = 0;
    for (index, byte) in line.iter().enumerate() {
        if *byte == b'\t' {
            out.push(decode_field(line.slice(start..index))?);
            start = index + 1;
        }
    }
    out.push(decode_field(line.slice(start..))?);
    if out.len() != expected_columns {
        return Err(CopyTextError::ColumnCount {
            expected: expected_columns,
            found: out.len(),
        });
    }
    Ok(())
}

fn decode_field(field: Bytes) -> Result<TupleValue, CopyTextError> {
    if &field[..] == b"\\N" {
        return Ok(TupleValue::Null);
    }
    if !field.contains(&b'\\') {
        return Ok(TupleValue::Text(field));
    }
    unescape(&field).map(|text| TupleValue::Text(Bytes::from(text)))
}

/// Undoes COPY's escapes: `\b \f \n \r \t \v`, `\` + 1–3 octal digits, `\x` + 1–2 hex digits,
/// and `\` before any other character meaning that character (so `\\` is a backslash).
fn unescape(field: &[u8]) -> Result<Vec<u8>, CopyTextError> {
    let mut out = Vec::with_capacity(field.len());
    let mut index = 0;
    while index < field.len() {
        let byte = field[index];
        index += 1;
        if byte != b'\\' {
            out.push(byte);
            continue;
        }
        let Some(&escaped) = field.get(index) else {
            return Err(CopyTextError::TrailingBackslash);
        };
        index += 1;
        match escaped {
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut value = u32::from(escaped - b'0');
                for _ in 0..2 {
                    match field.get(index) {
                        Some(digit @ b'0'..=b'7') => {
                            value = value * 8 + u32::from(digit - b'0');
                            index += 1;
                        }
                        _ => break,
                    }
                }
                // As PostgreSQL does: an octal escape is one byte.
                out.push((value & 0xff) as u8);
            }
            b'x' if field.get(index).is_some_and(u8::is_ascii_hexdigit) => {
                let mut value = 0_u8;
                for _ in 0..2 {
                    match field
                        .get(index)
                        .and_then(|digit| (*digit as char).to_digit(16))
                    {
                        Some(digit) => {
                            value = value * 16 + digit as u8;
                            index += 1;
                        }
                        None => break,
                    }
                }
                out.push(value);
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(line: &str, columns: usize) -> Vec<TupleValue> {
        let mut out = Vec::new();
        decode_row(&Bytes::copy_from_slice(line.as_bytes()), columns, &mut out).expect("decodes");
        out
    }

    fn text(value: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(value.as_bytes()))
    }

    #[test]
    fn columns_split_on_tabs_and_backslash_n_is_null() {
        assert_eq!(
            row("1\t\\N\tplain", 3),
            vec![text("1"), TupleValue::Null, text("plain")]
        );
    }

    #[test]
    fn an_empty_string_is_not_null() {
        assert_eq!(row("\t", 2), vec![text(""), text("")]);
        assert_eq!(row("", 1), vec![text("")]);
    }

    #[test]
    fn control_character_escapes_become_the_characters() {
        assert_eq!(
            row(r"a\tb\nc\rd\be\ff\vg", 1),
            vec![text("a\tb\nc\rd\u{8}e\u{c}f\u{b}g")]
        );
    }

    #[test]
    fn an_escaped_backslash_is_one_backslash() {
        // bytea in hex output and a literal `\N` in a text column both arrive escaped.
        assert_eq!(row(r"\\x48656c6c6f", 1), vec![text(r"\x48656c6c6f")]);
        assert_eq!(row(r"\\N", 1), vec![text(r"\N")]);
    }

    #[test]
    fn octal_and_hex_escapes_are_single_bytes() {
        assert_eq!(row(r"\101\60\7x", 1), vec![text("A0\u{7}x")]);
        assert_eq!(row(r"\x41\x4aZ\x7", 1), vec![text("AJZ\u{7}")]);
        assert_eq!(row(r"\303\251", 1), vec![text("é")], "octal bytes of UTF-8");
    }

    #[test]
    fn any_other_escaped_character_is_itself() {
        assert_eq!(row(r"\.\q\x", 1), vec![text(".qx")]);
    }

    #[test]
    fn values_without_escapes_share_the_row_buffer() {
        let line = Bytes::from_static(b"abc\tdef");
        let mut out = Vec::new();
        decode_row(&line, 2, &mut out).unwrap();
        let TupleValue::Text(first) = &out[0] else {
            panic!("text")
        };
        assert_eq!(first.as_ptr(), line.as_ptr());
    }

    #[test]
    fn a_wrong_column_count_and_a_lone_backslash_are_errors() {
        let mut out = Vec::new();
        assert_eq!(
            decode_row(&Bytes::from_static(b"1\t2"), 3, &mut out),
            Err(CopyTextError::ColumnCount {
                expected: 3,
                found: 2
            })
        );
        assert_eq!(
            decode_row(&Bytes::from_static(b"abc\\"), 1, &mut out),
            Err(CopyTextError::TrailingBackslash)
        );
    }
}
