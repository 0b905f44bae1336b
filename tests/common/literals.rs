//! One table of SQL literals and the JSON walsync must produce for them, shared by every path a
//! value can take (the codec alone, streaming, snapshots), so the paths cannot drift apart.
//!
//! A row is used as `(<literal>)::<sql_type>`. Expectations are JSON text written exactly as
//! the codec emits it: compare with [`same_json`], which also checks every number's digits.
//!
//! `walsync_test_mood` (an enum of 'sad', 'ok', 'happy') and `walsync_test_mood_domain` (a
//! domain over it) must exist first: [`TEST_TYPES_SQL`] creates them.

/// Creates the custom types the table uses; safe to run any number of times, concurrently too.
pub const TEST_TYPES_SQL: &str = "
DO $$
BEGIN
    CREATE TYPE walsync_test_mood AS ENUM ('sad', 'ok', 'happy');
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;
DO $$
BEGIN
    CREATE DOMAIN walsync_test_mood_domain AS walsync_test_mood;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;
";

pub struct Literal {
    pub sql_type: &'static str,
    pub literal: &'static str,
    pub expected: &'static str,
}

const fn row(sql_type: &'static str, literal: &'static str, expected: &'static str) -> Literal {
    Literal {
        sql_type,
        literal,
        expected,
    }
}

pub const LITERALS: &[Literal] = &[
    // bool
    row("bool", "true", "true"),
    row("bool", "false", "false"),
    // integers: the extremes of each width
    row("int2", "'-32768'", "-32768"),
    row("int2", "'32767'", "32767"),
    row("int4", "'-2147483648'", "-2147483648"),
    row("int4", "'2147483647'", "2147483647"),
    row("int8", "'-9223372036854775808'", "-9223372036854775808"),
    row("int8", "'9223372036854775807'", "9223372036854775807"),
    row("int8", "0", "0"),
    row("oid", "'4294967295'", "4294967295"),
    // floats: Postgres's shortest exact digits, non-finite values as strings
    row("float4", "'1.5'", "1.5"),
    row("float4", "'0.1'", "0.1"),
    row("float4", "'3.4028235e38'", "3.4028235e+38"),
    row("float8", "'0.1'", "0.1"),
    row("float8", "'1e100'", "1e+100"),
    row("float8", "'-1.5e-7'", "-1.5e-07"),
    row("float8", "'123456789.125'", "123456789.125"),
    row(
        "float8",
        "'1.7976931348623157e308'",
        "1.7976931348623157e+308",
    ),
    row("float8", "'-0'", "-0"),
    row("float8", "'NaN'", "\"NaN\""),
    row("float8", "'Infinity'", "\"Infinity\""),
    row("float8", "'-Infinity'", "\"-Infinity\""),
    row("float4", "'NaN'", "\"NaN\""),
    // numeric: exact digits (40 significant here), scale kept, as strings by default
    row(
        "numeric",
        "'12345678901234567890.12345678901234567890'",
        "\"12345678901234567890.12345678901234567890\"",
    ),
    row("numeric", "'-0.000100'", "\"-0.000100\""),
    row("numeric(10,2)", "'1.5'", "\"1.50\""),
    row("numeric", "'NaN'", "\"NaN\""),
    row("numeric", "'Infinity'", "\"Infinity\""),
    row("numeric", "'-Infinity'", "\"-Infinity\""),
    // text: escaping of quotes, backslashes, control characters and unicode
    row(
        "text",
        r#"E'quote \" backslash \\ newline \n tab \t'"#,
        r#""quote \" backslash \\ newline \n tab \t""#,
    ),
    row(
        "text",
        r"E'bell \x07 unit \x1f'",
        r#""bell \u0007 unit \u001f""#,
    ),
    row("text", "'héllo wörld ✓ 😀'", "\"héllo wörld ✓ 😀\""),
    row("text", "''", "\"\""),
    row("text", "'NULL'", "\"NULL\""),
    row("varchar(10)", "'hello'", "\"hello\""),
    row("char(5)", "'ab'", "\"ab   \""),
    row("name", "'pg_catalog'", "\"pg_catalog\""),
    row("\"char\"", "'x'", "\"x\""),
    // json and jsonb: embedded, numbers digit for digit
    row(
        "json",
        r#"'{"b": [1, 2.50, {"c": null}], "a": 123456789012345678901234567890}'"#,
        r#"{"b": [1, 2.50, {"c": null}], "a": 123456789012345678901234567890}"#,
    ),
    row(
        "jsonb",
        r#"'{"nested": {"list": [1, 2.50, true, null, "x\"y"]}, "big": 123456789012345678901234567890}'"#,
        r#"{"big": 123456789012345678901234567890, "nested": {"list": [1, 2.50, true, null, "x\"y"]}}"#,
    ),
    row("jsonb", "'\"just a string\"'", "\"just a string\""),
    row("jsonb", "'null'", "null"),
    // uuid, xml, money, bit strings: their text forms
    row(
        "uuid",
        "'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'",
        "\"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11\"",
    ),
    row("xml", "'<a href=\"x\">1</a>'", r#""<a href=\"x\">1</a>""#),
    row("money", "'12.34'", "\"$12.34\""),
    row("bit(4)", "B'1010'", "\"1010\""),
    row("varbit", "B'101'", "\"101\""),
    // dates: ISO 8601, astronomical years, infinities as strings
    row("date", "'2024-01-02'", "\"2024-01-02\""),
    row("date", "'infinity'", "\"infinity\""),
    row("date", "'-infinity'", "\"-infinity\""),
    row("date", "'0044-03-15 BC'", "\"-0043-03-15\""),
    row("date", "'0001-12-31 BC'", "\"0000-12-31\""),
    row("date", "'10000-01-01'", "\"+10000-01-01\""),
    // times of day
    row("time", "'03:04:05.123456'", "\"03:04:05.123456\""),
    row("timetz", "'03:04:05+02'", "\"03:04:05+02\""),
    // timestamps: no zone, or UTC with Z whatever offset the literal used
    row(
        "timestamp",
        "'2024-01-02 03:04:05.123456'",
        "\"2024-01-02T03:04:05.123456\"",
    ),
    row(
        "timestamp",
        "'0044-03-15 12:00:00 BC'",
        "\"-0043-03-15T12:00:00\"",
    ),
    row("timestamp", "'-infinity'", "\"-infinity\""),
    row(
        "timestamptz",
        "'2024-01-02 03:04:05.123456+02'",
        "\"2024-01-02T01:04:05.123456Z\"",
    ),
    row(
        "timestamptz",
        "'2024-06-30 23:30:00-05:30'",
        "\"2024-07-01T05:00:00Z\"",
    ),
    row("timestamptz", "'infinity'", "\"infinity\""),
    // interval: ISO 8601 durations
    row(
        "interval",
        "'1 year 2 months 3 days 4 hours 5 minutes 6.5 seconds'",
        "\"P1Y2M3DT4H5M6.5S\"",
    ),
    row("interval", "'-1 day'", "\"P-1D\""),
    // bytea: padded standard base64
    row("bytea", r"'\x48656c6c6f'", "\"SGVsbG8=\""),
    row("bytea", r"'\x'", "\"\""),
    // arrays
    row("int4[]", "'{1,2,3}'", "[1,2,3]"),
    row("int4[]", "'{}'", "[]"),
    row("int4[]", "'[0:1]={7,8}'", "[7,8]"),
    row("int4[]", "'{{1,2},{3,4}}'", "[[1,2],[3,4]]"),
    row(
        "text[]",
        r#"ARRAY['a b', 'c"d', NULL, 'NULL', 'e\f', '', 'x,y']"#,
        r#"["a b","c\"d",null,"NULL","e\\f","","x,y"]"#,
    ),
    row(
        "jsonb[]",
        r#"ARRAY['{"a": 1}'::jsonb, '[1, "x"]'::jsonb, NULL]"#,
        r#"[{"a": 1},[1, "x"],null]"#,
    ),
    row("numeric[]", "'{1.10,NaN,-2.5}'", r#"["1.10","NaN","-2.5"]"#),
    row("float8[]", "'{1.5,NaN}'", r#"[1.5,"NaN"]"#),
    row("bool[]", "'{t,f,NULL}'", "[true,false,null]"),
    row("bytea[]", r"ARRAY['\x00ff'::bytea]", r#"["AP8="]"#),
    row(
        "timestamptz[]",
        "ARRAY['2024-01-02 03:04:05+00'::timestamptz, 'infinity']",
        r#"["2024-01-02T03:04:05Z","infinity"]"#,
    ),
    row(
        "box[]",
        "ARRAY['((1,1),(0,0))'::box, '((2,2),(1,1))'::box]",
        r#"["(1,1),(0,0)","(2,2),(1,1)"]"#,
    ),
    // types the codec has no special form for: Postgres's text
    row("int4range", "'[1,5)'", "\"[1,5)\""),
    row("inet", "'192.168.0.1/24'", "\"192.168.0.1/24\""),
    // custom types
    row("walsync_test_mood", "'happy'", "\"happy\""),
    row("walsync_test_mood_domain", "'sad'", "\"sad\""),
    row(
        "walsync_test_mood[]",
        "'{ok,NULL,happy}'",
        r#"["ok",null,"happy"]"#,
    ),
];

/// The same JSON value, with every number written with the same digits: parsing alone would
/// let a lossy float round trip of `123456789012345678901234567890` pass.
pub fn same_json(expected: &str, actual: &str) -> bool {
    let parse = |text: &str| serde_json::from_str::<serde_json::Value>(text).ok();
    let (Some(expected_value), Some(actual_value)) = (parse(expected), parse(actual)) else {
        return false;
    };
    expected_value == actual_value && numbers_as_written(expected) == numbers_as_written(actual)
}

/// The text of every number outside strings, sorted (so member order does not matter).
fn numbers_as_written(json: &str) -> Vec<&str> {
    let bytes = json.as_bytes();
    let mut numbers = Vec::new();
    let mut position = 0;
    while position < bytes.len() {
        match bytes[position] {
            b'"' => position = end_of_string(bytes, position),
            b'-' | b'0'..=b'9' => {
                let start = position;
                while position < bytes.len()
                    && matches!(
                        bytes[position],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    position += 1;
                }
                numbers.push(&json[start..position]);
            }
            _ => position += 1,
        }
    }
    numbers.sort_unstable();
    numbers
}

/// The position just after the string that starts at `open_quote`.
fn end_of_string(bytes: &[u8], open_quote: usize) -> usize {
    let mut position = open_quote + 1;
    while position < bytes.len() {
        match bytes[position] {
            b'\\' => position += 2,
            b'"' => return position + 1,
            _ => position += 1,
        }
    }
    position
}
