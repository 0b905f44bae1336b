//! The codec against the real PostgreSQL: every row of the shared literal table goes through
//! Postgres's own output functions and then the codec, proving the table's expectations.
//!
//! These tests need `make stack-up` (or run them through `make test`).

mod common;

use common::literals::{LITERALS, TEST_TYPES_SQL, same_json};
use common::stack;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};
use walsync::postgres::types::{Codec, CodecOptions, SESSION_SETTINGS, TypeKind};

/// A connection with the session settings the codec relies on, as walsync's own would have.
async fn connect_pinned() -> Client {
    let (client, connection) = tokio_postgres::connect(&stack().pg_url, NoTls)
        .await
        .expect("connect to the local PostgreSQL with PG_URL");
    tokio::spawn(connection);
    let settings: String = SESSION_SETTINGS
        .iter()
        .map(|(name, value)| format!("SET {name} = '{value}';"))
        .collect();
    client
        .batch_execute(&settings)
        .await
        .expect("pin the codec's session settings");
    client
}

/// Rows of a simple-protocol query, each as its columns' text (NULL as `None`).
async fn text_rows(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|error| panic!("{sql}: {error}"));
    messages
        .into_iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|column| row.get(column).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn column<'a>(row: &'a [Option<String>], index: usize, what: &str) -> &'a str {
    row[index]
        .as_deref()
        .unwrap_or_else(|| panic!("{what} is NULL"))
}

fn oid_column(row: &[Option<String>], index: usize, what: &str) -> u32 {
    column(row, index, what)
        .parse()
        .unwrap_or_else(|error| panic!("{what} is not an OID: {error}"))
}

/// The codec for this database, every `pg_type` row registered as the source will do at start-up
/// (the codec ignores built-in OIDs; catalog row types and `information_schema` domains get
/// OIDs at initdb, so they differ between versions and must come from the catalog). An array's
/// delimiter is its element type's `typdelim`.
async fn codec_for(client: &Client) -> Codec {
    let rows = text_rows(
        client,
        "SELECT t.oid, t.typtype, t.typbasetype, t.typelem, t.typcategory, \
                coalesce(element.typdelim, ',') \
         FROM pg_type t LEFT JOIN pg_type element ON element.oid = t.typelem",
    )
    .await;
    let mut codec = Codec::new(CodecOptions::default());
    for row in &rows {
        let oid = oid_column(row, 0, "pg_type.oid");
        let kind = match (column(row, 1, "typtype"), column(row, 4, "typcategory")) {
            ("e", _) => TypeKind::Enum,
            ("d", _) => TypeKind::Domain {
                base_oid: oid_column(row, 2, "typbasetype"),
            },
            ("c", _) => TypeKind::Composite,
            ("r" | "m", _) => TypeKind::Range,
            (_, "A") => TypeKind::Array {
                element_oid: oid_column(row, 3, "typelem"),
                delimiter: column(row, 5, "typdelim").as_bytes()[0],
            },
            _ => TypeKind::Other,
        };
        codec.register(oid, kind);
    }
    codec
}

#[tokio::test]
async fn every_literal_in_the_table_encodes_as_expected_from_postgres_text() {
    let client = connect_pinned().await;
    client
        .batch_execute(TEST_TYPES_SQL)
        .await
        .expect("create the test enum and domain");
    let codec = codec_for(&client).await;

    let mut failures = Vec::new();
    for literal in LITERALS {
        let (sql_type, sql) = (literal.sql_type, literal.literal);
        // No `::text` cast: casts are not output functions (bool::text is "true", and
        // bpchar::text drops the padding), while the simple protocol returns exactly what the
        // type's output function printed, as pgoutput and COPY do.
        let query = format!(
            "SELECT ({sql})::{sql_type}, '{}'::regtype::oid",
            sql_type.replace('\'', "''")
        );
        let rows = text_rows(&client, &query).await;
        let text = column(&rows[0], 0, "the value's text");
        let type_oid = oid_column(&rows[0], 1, "the type's OID");

        let mut out = Vec::new();
        match codec.write_json(&mut out, type_oid, text.as_bytes()) {
            Ok(()) => {
                let actual = String::from_utf8(out).expect("the codec writes UTF-8");
                if !same_json(literal.expected, &actual) {
                    failures.push(format!(
                        "{sql_type} {sql}: Postgres printed {text:?}, the codec wrote {actual}, \
                         the table expects {}",
                        literal.expected
                    ));
                }
            }
            Err(error) => failures.push(format!(
                "{sql_type} {sql}: Postgres printed {text:?}, the codec failed: {error}"
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} literals differ:\n{}",
        failures.len(),
        LITERALS.len(),
        failures.join("\n")
    );
}

/// Every array type of this server is a JSON array split at its delimiter: those with fixed
/// OIDs from the codec's own table (so a new one in some release fails here rather than
/// silently becoming a string), all others once registered from the catalog.
#[tokio::test]
async fn every_array_type_of_this_server_is_an_array_split_at_its_delimiter() {
    let client = connect_pinned().await;
    // The other test creates the test enum concurrently: create it here too, and list the array
    // types before reading the catalog into the codec, so the codec knows every type listed.
    client
        .batch_execute(TEST_TYPES_SQL)
        .await
        .expect("create the test enum and domain");
    let rows = text_rows(
        &client,
        "SELECT t.oid, t.typname, element.typdelim, \
                t.oid < 10000 AND element.typtype <> 'c' AS fixed_oid \
         FROM pg_type t JOIN pg_type element ON element.oid = t.typelem \
         WHERE t.typcategory = 'A' AND t.typname NOT IN ('int2vector', 'oidvector')",
    )
    .await;
    assert!(rows.len() > 50, "only {} array types found", rows.len());
    let builtin_only = Codec::new(CodecOptions::default());
    let registered = codec_for(&client).await;

    let mut failures = Vec::new();
    for row in &rows {
        let oid = oid_column(row, 0, "pg_type.oid");
        let name = column(row, 1, "typname");
        let delimiter = column(row, 2, "typdelim");
        let codec = match column(row, 3, "fixed_oid") {
            "t" => &builtin_only,
            _ => &registered,
        };
        let literal = format!("{{NULL{delimiter}NULL}}");
        let mut out = Vec::new();
        let encoded = codec.write_json(&mut out, oid, literal.as_bytes());
        if encoded.is_err() || out != b"[null,null]" {
            failures.push(format!(
                "{name} ({oid}): {literal} gave {:?} {encoded:?}",
                String::from_utf8_lossy(&out)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "array types the codec does not read as arrays:\n{}",
        failures.join("\n")
    );
}
