//! A seeded, randomized differential test: a workload of many PostgreSQL types, key shapes and
//! operations runs against `walsync run` (the release binary) while faults hit the pipeline, and
//! at the end an independent oracle (tests/common/oracle.rs, which shares no code with walsync)
//! compares every row with its document.
//!
//! `SEED=n` replays one seed (the operation sequence is a function of the seed; fault timing is
//! wall-clock and varies), `DURATION=s` sets the workload's length (40 s by default). Without
//! `SEED` the seeds 1, 2 and 3 run one after the other. `make chaos SEED=n DURATION=s` runs it
//! with its output. Each seed ends with the line
//! `differential: seed=N result=equal|DIFFERENT …` and the oracle's report.
//!
//! The tables, in a schema of their own per run:
//! - `wide`: an `id bigint` key and a column of most types of docs/events.md's type mapping
//!   (float8 with 17 significant digits, subnormals, extremes and non-finite values; float4;
//!   40-digit and non-finite numerics; a domain over numeric(30,6); jsonb with long numbers;
//!   integer extremes; text with unicode, quotes and backslashes; dates, timestamps and
//!   timestamptz with BC and expanded years and infinities; intervals; uuid; bytea; int and text
//!   arrays with NULL elements; an enum) and a TOASTed `big` text;
//! - `multi`: a composite key `(shop int, sku text)`, skus with quotes, unicode and some longer
//!   than 512 bytes as ids (hashed ids), and a TOASTed `big`;
//! - `blob`: a `bytea` key (some long enough for hashed ids) and a TOASTed `big`.
//!
//! All with REPLICA IDENTITY DEFAULT, `big` stored out of line uncompressed (10–40 kB). The
//! workload mixes inserts, updates that leave `big` untouched, updates of `big`, key changes
//! (also onto a key deleted earlier in the same transaction), deletes, deletes and re-inserts of
//! one key, transactions of 1 to 2,000 statements, rollbacks and truncates. The tables hold rows
//! before walsync first starts, so the initial copy runs while the workload does. Faults at
//! random moments: kill -9 of walsync and a restart, Kafka paused, the search server paused, the
//! walsender terminated. Paused services are resumed on every exit path (drop guards, Ctrl-C).
//!
//! Once the workload is over, the pipeline has caught up when the slot confirmed the WAL position
//! the workload ended at and the sink committed every record of the three topics; the oracle's
//! verdict then is final (it is also accepted earlier if the index already equals the table).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use common::oracle::{Oracle, OracleReport};
use common::process::{Paused, Walsync, pipeline_config};
use common::rng::Rng;
use common::source::sql;
use common::{admin_client, stack, unique_name};

/// How long the index may take to catch up once the workload is over.
const CATCH_UP: Duration = Duration::from_secs(120);

/// Statements per second the workload aims at (`CHAOS_RATE` overrides).
const DEFAULT_RATE: u64 = 400;

/// Rows of each table before walsync first starts.
const INITIAL_ROWS: [usize; 3] = [400, 200, 150];

/// Key spaces: the tables stay bounded whatever the duration.
const WIDE_IDS: u64 = 1_500;
const SHOPS: u64 = 12;
const SKUS: u64 = 120;

/// At most this many new `big` values per transaction (each 10–40 kB).
const BIG_VALUES_PER_TRANSACTION: u32 = 40;

// --- a seedable PRNG ---------------------------------------------------------------------------

// --- SQL literals ----------------------------------------------------------------------------

/// A standard SQL string literal (standard_conforming_strings is on: only quotes double).
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn bytea_literal(bytes: &[u8]) -> String {
    let mut text = String::from("'\\x");
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text.push_str("'::bytea");
    text
}

const TEXT_FRAGMENTS: &[&str] = &[
    "plain",
    "héllo wörld",
    "✓",
    "😀",
    "日本語",
    "'",
    "''",
    "\"",
    "\\",
    "\\\\",
    "\\x41",
    "\n",
    "\t",
    "\r\n",
    "\u{1}",
    "\u{7f}",
    "NULL",
    "null",
    "{a,b}",
    "<x a=\"1\"/>",
    " ",
    "a\"b'c\\d",
    "[1,\"x\"]",
    "e\u{301}",
];

fn random_text(rng: &mut Rng) -> String {
    let parts = rng.between(0, 6);
    (0..parts).map(|_| *rng.pick(TEXT_FRAGMENTS)).collect()
}

/// A float8 literal: 17-digit values, subnormals, extremes, signed zero, non-finite values.
fn float8(rng: &mut Rng) -> String {
    let text = match rng.below(20) {
        0 => "0.9407462388099621".to_owned(),
        1 => "5e-324".to_owned(),
        2 => "1.7976931348623157e308".to_owned(),
        3 => "NaN".to_owned(),
        4 => "Infinity".to_owned(),
        5 => "-Infinity".to_owned(),
        6 => "-0".to_owned(),
        7 => "0.1".to_owned(),
        8 => "2.2250738585072014e-308".to_owned(),
        9 => "-123456789.125".to_owned(),
        // Uniform in [0, 1): most have 16 or 17 significant digits.
        10..=14 => format!("{}", (rng.next() >> 11) as f64 / (1_u64 << 53) as f64),
        15..=17 => {
            let value = f64::from_bits(rng.next());
            if value.is_finite() {
                format!("{value:e}")
            } else {
                "1e-7".to_owned()
            }
        }
        18 => return "NULL".to_owned(),
        _ => format!("{}", rng.below(1_000_000) as i64 - 500_000),
    };
    format!("'{text}'::float8")
}

fn float4(rng: &mut Rng) -> String {
    let text = match rng.below(12) {
        0 => "3.4028235e38".to_owned(),
        1 => "1e-45".to_owned(),
        2 => "NaN".to_owned(),
        3 => "-Infinity".to_owned(),
        4 => "0.1".to_owned(),
        5..=7 => format!("{}", (rng.next() >> 40) as f32 / (1_u32 << 24) as f32),
        8..=9 => {
            let value = f32::from_bits(rng.next() as u32);
            if value.is_finite() {
                format!("{value:e}")
            } else {
                "1.5".to_owned()
            }
        }
        10 => return "NULL".to_owned(),
        _ => "-2.5".to_owned(),
    };
    format!("'{text}'::float4")
}

fn digits(rng: &mut Rng, count: u64) -> String {
    (0..count)
        .map(|_| char::from(b'0' + rng.below(10) as u8))
        .collect()
}

/// A numeric literal: 40 significant digits, trailing zeros, non-finite values.
fn numeric(rng: &mut Rng) -> String {
    let text = match rng.below(12) {
        0 => "NaN".to_owned(),
        1 => "Infinity".to_owned(),
        2 => "-Infinity".to_owned(),
        3 => "19.90".to_owned(),
        4 => "-0.000100".to_owned(),
        5 => return "NULL".to_owned(),
        _ => {
            let int_digits = rng.below(41);
            let sign = if rng.chance(30) { "-" } else { "" };
            let int = digits(rng, int_digits);
            let frac = digits(rng, 40 - int_digits);
            let int = if int.is_empty() { "0".to_owned() } else { int };
            if frac.is_empty() {
                format!("{sign}{int}")
            } else {
                format!("{sign}{int}.{frac}")
            }
        }
    };
    format!("'{text}'::numeric")
}

/// A value for the domain over numeric(30,6): PostgreSQL rounds and pads it to six decimals.
fn amount(rng: &mut Rng) -> String {
    if rng.chance(10) {
        return "NULL".to_owned();
    }
    let int_digits = rng.between(1, 20);
    let frac_digits = rng.below(9);
    format!(
        "'{}{}.{}'",
        if rng.chance(20) { "-" } else { "" },
        digits(rng, int_digits),
        digits(rng, frac_digits.max(1))
    )
}

fn integer(rng: &mut Rng, min: i64, max: i64) -> String {
    match rng.below(8) {
        0 => min.to_string(),
        1 => max.to_string(),
        2 => "0".to_owned(),
        3 => "NULL".to_owned(),
        _ => {
            let span = (max as i128 - min as i128 + 1) as u128;
            ((min as i128) + (rng.next() as u128 % span) as i128).to_string()
        }
    }
}

fn year(rng: &mut Rng) -> u64 {
    match rng.below(10) {
        0 => rng.between(1, 999),
        1 => rng.between(9000, 9999),
        _ => rng.between(1900, 2100),
    }
}

fn date(rng: &mut Rng) -> String {
    let text = match rng.below(30) {
        0 => "infinity".to_owned(),
        1 => "-infinity".to_owned(),
        2 => "0044-03-15 BC".to_owned(),
        3 => "10000-01-01".to_owned(),
        4 => return "NULL".to_owned(),
        _ => format!(
            "{:04}-{:02}-{:02}",
            year(rng),
            rng.between(1, 12),
            rng.between(1, 28)
        ),
    };
    format!("'{text}'::date")
}

fn clock(rng: &mut Rng) -> String {
    let mut text = format!(
        "{:02}:{:02}:{:02}",
        rng.below(24),
        rng.below(60),
        rng.below(60)
    );
    match rng.below(3) {
        0 => {}
        1 => {
            let _ = write!(text, ".{:06}", rng.below(1_000_000));
        }
        _ => {
            let _ = write!(text, ".{}", rng.between(1, 9));
        }
    }
    text
}

fn timestamp(rng: &mut Rng, zone: bool) -> String {
    let cast = if zone { "timestamptz" } else { "timestamp" };
    let text = match rng.below(30) {
        0 => "infinity".to_owned(),
        1 => "-infinity".to_owned(),
        2 => format!("0044-03-15 {} BC", clock(rng)),
        3 => return "NULL".to_owned(),
        _ => {
            let mut text = format!(
                "{:04}-{:02}-{:02} {}",
                year(rng),
                rng.between(1, 12),
                rng.between(1, 28),
                clock(rng)
            );
            if zone {
                const OFFSETS: [&str; 7] = ["+00", "+02", "-05:30", "+14", "Z", "-08", "+05:45"];
                let offset = rng.pick(&OFFSETS);
                text.push_str(offset);
            }
            text
        }
    };
    format!("'{text}'::{cast}")
}

fn interval(rng: &mut Rng) -> String {
    let text = match rng.below(8) {
        0 => "P1Y2M3DT4H5M6.5S".to_owned(),
        1 => "-1 day".to_owned(),
        2 => "0".to_owned(),
        3 => return "NULL".to_owned(),
        _ => format!(
            "{} years {} mons {} days {}{}:{:02}:{:02}.{:06}",
            rng.below(200) as i64 - 100,
            rng.below(24) as i64 - 12,
            rng.below(60) as i64 - 30,
            if rng.chance(30) { "-" } else { "" },
            rng.below(100),
            rng.below(60),
            rng.below(60),
            rng.below(1_000_000)
        ),
    };
    format!("'{text}'::interval")
}

fn uuid(rng: &mut Rng) -> String {
    if rng.chance(10) {
        return "NULL".to_owned();
    }
    let (a, b) = (rng.next(), rng.next());
    format!(
        "'{:08x}-{:04x}-{:04x}-{:04x}-{:012x}'::uuid",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

fn random_bytes(rng: &mut Rng, length: u64) -> Vec<u8> {
    (0..length).map(|_| rng.next() as u8).collect()
}

fn int_array(rng: &mut Rng) -> String {
    match rng.below(10) {
        0 => "NULL".to_owned(),
        1 => "'{}'::int4[]".to_owned(),
        2 => "'{{1,2},{3,NULL}}'::int4[]".to_owned(),
        _ => {
            let items: Vec<String> = (0..rng.between(1, 6))
                .map(|_| integer(rng, i32::MIN.into(), i32::MAX.into()))
                .collect();
            format!("ARRAY[{}]::int4[]", items.join(","))
        }
    }
}

fn text_array(rng: &mut Rng) -> String {
    match rng.below(10) {
        0 => "NULL".to_owned(),
        1 => "'{}'::text[]".to_owned(),
        _ => {
            let items: Vec<String> = (0..rng.between(1, 5))
                .map(|_| {
                    if rng.chance(20) {
                        "NULL".to_owned()
                    } else {
                        quote(&random_text(rng))
                    }
                })
                .collect();
            format!("ARRAY[{}]::text[]", items.join(","))
        }
    }
}

/// A jsonb literal with numbers no float holds (long decimals, 30-digit integers, `1.50`).
fn jsonb(rng: &mut Rng) -> String {
    let text = match rng.below(10) {
        0 => return "NULL".to_owned(),
        1 => "null".to_owned(),
        2 => "[1, 2.50, true, null, \"x\\\"y\", 0.90372028726197960001]".to_owned(),
        3 => "\"just a string\"".to_owned(),
        _ => {
            let mut members = vec![
                format!("\"n\": 0.{}", digits(rng, 20)),
                "\"big\": 123456789012345678901234567890".to_owned(),
                "\"w\": 1.50".to_owned(),
                format!(
                    "\"f\": {}",
                    (rng.next() >> 11) as f64 / (1_u64 << 53) as f64
                ),
                format!("\"e\": -{}e-{}", rng.between(1, 9), rng.between(1, 30)),
                "\"nested\": {\"list\": [1, 2.50, true, null, \"x\\\"y\"], \"z\": {}}".to_owned(),
            ];
            let mut s = String::new();
            common::oracle::write_json_string(&random_text(rng), &mut s);
            members.push(format!("\"s\": {s}"));
            let keep = rng.between(1, members.len() as u64) as usize;
            let start = rng.below(members.len() as u64) as usize;
            let chosen: Vec<String> = (0..keep)
                .map(|i| members[(start + i) % members.len()].clone())
                .collect();
            format!("{{{}}}", chosen.join(", "))
        }
    };
    format!("{}::jsonb", quote(&text))
}

/// A new value for a `big` column: mostly 10–40 kB of hex (stored out of line), sometimes NULL
/// or a short text. `budget` counts the large ones a transaction may still write.
fn big_value(rng: &mut Rng, budget: &mut u32) -> String {
    match rng.below(10) {
        0 => "NULL".to_owned(),
        1 => quote(&format!("short {}", rng.below(1000))),
        _ if *budget == 0 => "NULL".to_owned(),
        _ => {
            *budget -= 1;
            // 32 hex characters per md5: 313 to 1,250 of them make 10 to 40 kB.
            format!(
                "(SELECT string_agg(md5('{}:' || s), '') FROM generate_series(1, {}) s)",
                rng.next(),
                rng.between(313, 1_250)
            )
        }
    }
}

// --- the workload ----------------------------------------------------------------------------

/// The three tables' keys as the workload knows them (what committed so far).
#[derive(Clone, Default)]
struct Model {
    wide: BTreeSet<i64>,
    multi: BTreeSet<(i32, String)>,
    blob: BTreeSet<Vec<u8>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Table {
    Wide,
    Multi,
    Blob,
}

impl Table {
    const ALL: [Table; 3] = [Table::Wide, Table::Multi, Table::Blob];

    fn name(self) -> &'static str {
        match self {
            Table::Wide => "wide",
            Table::Multi => "multi",
            Table::Blob => "blob",
        }
    }
}

/// One key of any of the three tables.
#[derive(Clone, PartialEq, Eq)]
enum Key {
    Wide(i64),
    Multi(i32, String),
    Blob(Vec<u8>),
}

impl Key {
    fn condition(&self) -> String {
        match self {
            Key::Wide(id) => format!("id = {id}"),
            Key::Multi(shop, sku) => format!("shop = {shop} AND sku = {}", quote(sku)),
            Key::Blob(k) => format!("k = {}", bytea_literal(k)),
        }
    }

    fn assignment(&self) -> String {
        match self {
            Key::Wide(id) => format!("id = {id}"),
            Key::Multi(shop, sku) => format!("shop = {shop}, sku = {}", quote(sku)),
            Key::Blob(k) => format!("k = {}", bytea_literal(k)),
        }
    }
}

impl Model {
    fn len(&self, table: Table) -> usize {
        match table {
            Table::Wide => self.wide.len(),
            Table::Multi => self.multi.len(),
            Table::Blob => self.blob.len(),
        }
    }

    fn contains(&self, key: &Key) -> bool {
        match key {
            Key::Wide(id) => self.wide.contains(id),
            Key::Multi(shop, sku) => self.multi.contains(&(*shop, sku.clone())),
            Key::Blob(k) => self.blob.contains(k),
        }
    }

    fn insert(&mut self, key: Key) {
        match key {
            Key::Wide(id) => self.wide.insert(id),
            Key::Multi(shop, sku) => self.multi.insert((shop, sku)),
            Key::Blob(k) => self.blob.insert(k),
        };
    }

    fn remove(&mut self, key: &Key) {
        match key {
            Key::Wide(id) => self.wide.remove(id),
            Key::Multi(shop, sku) => self.multi.remove(&(*shop, sku.clone())),
            Key::Blob(k) => self.blob.remove(k),
        };
    }

    fn clear(&mut self, table: Table) {
        match table {
            Table::Wide => self.wide.clear(),
            Table::Multi => self.multi.clear(),
            Table::Blob => self.blob.clear(),
        }
    }

    /// A key that exists, chosen at random (deterministic: sets iterate in order).
    fn existing(&self, rng: &mut Rng, table: Table) -> Option<Key> {
        let len = self.len(table) as u64;
        if len == 0 {
            return None;
        }
        let at = rng.below(len) as usize;
        Some(match table {
            Table::Wide => Key::Wide(*self.wide.iter().nth(at)?),
            Table::Multi => {
                let (shop, sku) = self.multi.iter().nth(at)?;
                Key::Multi(*shop, sku.clone())
            }
            Table::Blob => Key::Blob(self.blob.iter().nth(at)?.clone()),
        })
    }

    /// A key that does not exist yet, or `None` when a few tries found none.
    fn fresh(&self, rng: &mut Rng, table: Table) -> Option<Key> {
        for _ in 0..20 {
            let key = match table {
                Table::Wide => Key::Wide(rng.between(1, WIDE_IDS) as i64),
                Table::Multi => Key::Multi(rng.between(1, SHOPS) as i32, sku(rng)),
                Table::Blob => {
                    // A few keys are long enough for their base64 id to be hashed (> 512 bytes).
                    let length = if rng.chance(3) {
                        rng.between(390, 480)
                    } else {
                        rng.between(1, 24)
                    };
                    Key::Blob(random_bytes(rng, length))
                }
            };
            if !self.contains(&key) {
                return Some(key);
            }
        }
        None
    }
}

/// A sku of a bounded space: plain, with quotes, backslashes and unicode, or long (its id is
/// longer than 512 bytes and hashed).
fn sku(rng: &mut Rng) -> String {
    let n = rng.below(SKUS);
    match n % 6 {
        0 => format!("sku-{n}"),
        1 => format!("a\"b'c\\d-{n}"),
        2 => format!("é✓😀-{n}"),
        3 => format!("long-{n}-{}", "x".repeat(600)),
        4 => format!("line\nbreak\t{n}"),
        _ => format!("{n}"),
    }
}

/// The columns of `wide`, in the order [`wide_values`] writes them.
const WIDE_COLUMNS: &str = "id, f8, f4, num, amount, i2, i4, i8, flag, txt, d, ts, tstz, iv, u, bin, ints, texts, mood, doc, small, big";

fn wide_values(rng: &mut Rng, schema: &str, id: i64, budget: &mut u32) -> String {
    let flag = *rng.pick(&["true", "false", "NULL"]);
    let mood = match rng.below(4) {
        0 => "NULL".to_owned(),
        n => format!(
            "'{}'::{schema}.mood",
            ["sad", "ok", "happy"][n as usize - 1]
        ),
    };
    let bin = if rng.chance(10) {
        "NULL".to_owned()
    } else {
        let length = rng.below(48);
        bytea_literal(&random_bytes(rng, length))
    };
    let big = if rng.chance(35) {
        big_value(rng, budget)
    } else {
        "NULL".to_owned()
    };
    [
        id.to_string(),
        float8(rng),
        float4(rng),
        numeric(rng),
        amount(rng),
        integer(rng, i16::MIN.into(), i16::MAX.into()),
        integer(rng, i32::MIN.into(), i32::MAX.into()),
        integer(rng, i64::MIN, i64::MAX),
        flag.to_owned(),
        if rng.chance(10) {
            "NULL".to_owned()
        } else {
            quote(&random_text(rng))
        },
        date(rng),
        timestamp(rng, false),
        timestamp(rng, true),
        interval(rng),
        uuid(rng),
        bin,
        int_array(rng),
        text_array(rng),
        mood,
        jsonb(rng),
        rng.below(1000).to_string(),
        big,
    ]
    .join(", ")
}

fn insert_statement(rng: &mut Rng, schema: &str, key: &Key, budget: &mut u32) -> String {
    match key {
        Key::Wide(id) => format!(
            "INSERT INTO {schema}.wide ({WIDE_COLUMNS}) VALUES ({})",
            wide_values(rng, schema, *id, budget)
        ),
        Key::Multi(shop, sku) => {
            let big = if rng.chance(40) {
                big_value(rng, budget)
            } else {
                "NULL".to_owned()
            };
            format!(
                "INSERT INTO {schema}.multi (shop, sku, qty, note, big) VALUES ({shop}, {}, {}, {}, {big})",
                quote(sku),
                integer(rng, i32::MIN.into(), i32::MAX.into()),
                quote(&random_text(rng)),
            )
        }
        Key::Blob(k) => {
            let big = if rng.chance(40) {
                big_value(rng, budget)
            } else {
                "NULL".to_owned()
            };
            format!(
                "INSERT INTO {schema}.blob (k, n, big) VALUES ({}, {}, {big})",
                bytea_literal(k),
                rng.below(1000)
            )
        }
    }
}

/// An update of columns other than `big` (which PostgreSQL then sends as unchanged TOAST).
fn small_update(rng: &mut Rng, schema: &str, table: Table, key: &Key) -> String {
    let set = match table {
        Table::Wide => {
            let mut set = vec!["small = small + 1".to_owned()];
            // Up to two more columns, distinct ones (a column may be assigned once).
            let first = rng.below(8);
            let columns = match rng.below(3) {
                0 => vec![],
                1 => vec![first],
                _ => vec![first, (first + rng.between(1, 7)) % 8],
            };
            for column in columns {
                set.push(match column {
                    0 => format!("f8 = {}", float8(rng)),
                    1 => format!("num = {}", numeric(rng)),
                    2 => format!("doc = {}", jsonb(rng)),
                    3 => format!("txt = {}", quote(&random_text(rng))),
                    4 => format!("tstz = {}", timestamp(rng, true)),
                    5 => format!("ints = {}", int_array(rng)),
                    6 => format!("f4 = {}", float4(rng)),
                    _ => format!("amount = {}", amount(rng)),
                });
            }
            set.join(", ")
        }
        Table::Multi => format!(
            "qty = {}, note = {}",
            integer(rng, i32::MIN.into(), i32::MAX.into()),
            quote(&random_text(rng))
        ),
        Table::Blob => "n = n + 1".to_owned(),
    };
    format!(
        "UPDATE {schema}.{} SET {set} WHERE {}",
        table.name(),
        key.condition()
    )
}

/// Counts of what the workload did.
#[derive(Default, Debug)]
struct Counts(BTreeMap<&'static str, u64>);

impl Counts {
    fn add(&mut self, what: &'static str, n: u64) {
        *self.0.entry(what).or_default() += n;
    }

    fn merge(&mut self, other: &Counts) {
        for (what, n) in &other.0 {
            self.add(what, *n);
        }
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(w, n)| format!("{w}={n}")).collect();
        f.write_str(&parts.join(" "))
    }
}

/// The workload's generator: a seeded PRNG and the committed keys. Its statements depend only on
/// the seed and on what it generated before, never on timing.
struct Generator {
    rng: Rng,
    schema: String,
    model: Model,
}

/// One transaction's SQL and what it will have done if it commits.
struct Transaction {
    sql: String,
    model: Model,
    counts: Counts,
    statements: u64,
    commit: bool,
}

impl Generator {
    fn new(seed: u64, schema: &str) -> Self {
        Self {
            rng: Rng::new(seed),
            schema: schema.to_owned(),
            model: Model::default(),
        }
    }

    /// The rows the tables hold before walsync starts, in transactions of 50 rows.
    fn initial_rows(&mut self) -> Vec<String> {
        let mut transactions = Vec::new();
        for (table, rows) in Table::ALL.into_iter().zip(INITIAL_ROWS) {
            let mut sql = String::new();
            let mut budget = u32::MAX;
            for row in 0..rows {
                let Some(key) = self.model.fresh(&mut self.rng, table) else {
                    continue;
                };
                let statement = insert_statement(&mut self.rng, &self.schema, &key, &mut budget);
                let _ = writeln!(sql, "{statement};");
                self.model.insert(key);
                if row % 50 == 49 {
                    transactions.push(std::mem::take(&mut sql));
                }
            }
            if !sql.is_empty() {
                transactions.push(sql);
            }
        }
        transactions
    }

    fn table(&mut self) -> Table {
        Table::ALL[self.rng.weighted(&[50, 25, 25])]
    }

    fn transaction(&mut self) -> Transaction {
        let rng = &mut self.rng;
        let schema = self.schema.clone();
        let statements = match rng.below(1000) {
            0..700 => rng.between(1, 4),
            700..950 => rng.between(5, 40),
            950..995 => rng.between(41, 400),
            _ => rng.between(401, 2_000),
        };
        let commit = !rng.chance(5);
        let mut model = self.model.clone();
        let mut counts = Counts::default();
        let mut budget = BIG_VALUES_PER_TRANSACTION;
        let mut sql = String::from("BEGIN;\n");
        let mut written = 0_u64;
        // Now and then a truncate of one table, at the start, the middle or the end.
        let mut truncate_at = if self.rng.below(1000) < 3 {
            Some(self.rng.below(statements + 1))
        } else {
            None
        };
        loop {
            if truncate_at.is_some_and(|at| at <= written) {
                truncate_at = None;
                let table = self.table();
                let _ = writeln!(sql, "TRUNCATE {schema}.{};", table.name());
                model.clear(table);
                counts.add("truncate", 1);
            }
            if written >= statements {
                break;
            }
            let table = self.table();
            let rng = &mut self.rng;
            // insert, small update, big update, key change, key change onto a key deleted just
            // before, delete, delete and re-insert
            let mut operation = rng.weighted(&[24, 30, 9, 8, 5, 12, 6]);
            if model.len(table) < 2 {
                operation = 0;
            }
            match operation {
                1 => {
                    let key = model.existing(rng, table).expect("a row");
                    let _ = writeln!(sql, "{};", small_update(rng, &schema, table, &key));
                    counts.add("update (big untouched)", 1);
                }
                2 => {
                    let key = model.existing(rng, table).expect("a row");
                    let also = if rng.chance(50) {
                        match table {
                            Table::Wide => ", small = small + 1",
                            Table::Multi => ", note = note || '+'",
                            Table::Blob => ", n = n + 1",
                        }
                    } else {
                        ""
                    };
                    let _ = writeln!(
                        sql,
                        "UPDATE {schema}.{} SET big = {}{also} WHERE {};",
                        table.name(),
                        big_value(rng, &mut budget),
                        key.condition()
                    );
                    counts.add("update of big", 1);
                }
                3 => {
                    let key = model.existing(rng, table).expect("a row");
                    if let Some(new) = model.fresh(rng, table) {
                        let _ = writeln!(
                            sql,
                            "UPDATE {schema}.{} SET {} WHERE {};",
                            table.name(),
                            new.assignment(),
                            key.condition()
                        );
                        model.remove(&key);
                        model.insert(new);
                        counts.add("key change", 1);
                    }
                }
                4 => {
                    let deleted = model.existing(rng, table).expect("a row");
                    let moved = model.existing(rng, table).expect("a row");
                    if deleted != moved {
                        let _ = writeln!(
                            sql,
                            "DELETE FROM {schema}.{} WHERE {};\nUPDATE {schema}.{} SET {} WHERE {};",
                            table.name(),
                            deleted.condition(),
                            table.name(),
                            deleted.assignment(),
                            moved.condition()
                        );
                        model.remove(&moved);
                        counts.add("key change onto a deleted key", 1);
                        written += 1;
                    }
                }
                5 => {
                    let key = model.existing(rng, table).expect("a row");
                    let _ = writeln!(
                        sql,
                        "DELETE FROM {schema}.{} WHERE {};",
                        table.name(),
                        key.condition()
                    );
                    model.remove(&key);
                    counts.add("delete", 1);
                }
                6 => {
                    let key = model.existing(rng, table).expect("a row");
                    let _ = writeln!(
                        sql,
                        "DELETE FROM {schema}.{} WHERE {};\n{};",
                        table.name(),
                        key.condition(),
                        insert_statement(rng, &schema, &key, &mut budget)
                    );
                    counts.add("delete and re-insert", 1);
                    written += 1;
                }
                _ => {
                    if let Some(key) = model.fresh(rng, table) {
                        let _ = writeln!(
                            sql,
                            "{};",
                            insert_statement(rng, &schema, &key, &mut budget)
                        );
                        model.insert(key);
                        counts.add("insert", 1);
                    } else if let Some(key) = model.existing(rng, table) {
                        let _ = writeln!(
                            sql,
                            "DELETE FROM {schema}.{} WHERE {};",
                            table.name(),
                            key.condition()
                        );
                        model.remove(&key);
                        counts.add("delete", 1);
                    }
                }
            }
            written += 1;
        }
        sql.push_str(if commit { "COMMIT;" } else { "ROLLBACK;" });
        Transaction {
            sql,
            model,
            counts,
            statements: written,
            commit,
        }
    }
}

/// What the workload did.
#[derive(Default)]
struct WorkloadDone {
    counts: Counts,
    statements: u64,
    elapsed: Duration,
    errors: Vec<String>,
}

/// Runs transactions from the generator for `duration`, paced at `rate` statements a second.
/// Every transaction's SQL is appended to `log` (for reading what happened to a key).
async fn workload(
    mut generator: Generator,
    duration: Duration,
    rate: u64,
    log: std::path::PathBuf,
) -> WorkloadDone {
    use std::io::Write as _;
    let mut log = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the workload's SQL log"),
    );
    let client = sql().await;
    let start = Instant::now();
    let mut done = WorkloadDone::default();
    let mut number = 0_u64;
    while start.elapsed() < duration {
        let transaction = generator.transaction();
        number += 1;
        let _ = writeln!(
            log,
            "-- transaction {number} at {:.3?}\n{}",
            start.elapsed(),
            transaction.sql
        );
        match client.batch_execute(&transaction.sql).await {
            Ok(()) if transaction.commit => {
                generator.model = transaction.model;
                done.counts.merge(&transaction.counts);
                done.counts.add("transactions committed", 1);
            }
            Ok(()) => done.counts.add("transactions rolled back", 1),
            Err(error) => {
                // The model and the table disagree (a bug of this test): the transaction is
                // rolled back, so both stay as they were.
                let _ = client.batch_execute("ROLLBACK").await;
                done.counts.add("transactions failed", 1);
                if done.errors.len() < 5 {
                    done.errors.push(format!("{error:?}"));
                }
            }
        }
        done.statements += transaction.statements;
        let due = start + Duration::from_secs_f64(done.statements as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
    }
    done.elapsed = start.elapsed();
    done.counts.add("statements", done.statements);
    let _ = log.flush();
    done
}

// --- the pipeline and its faults -------------------------------------------------------------

/// Resumes Kafka and the search server when dropped and on Ctrl-C, whatever is paused: SIGCONT
/// to a running service does nothing.
struct ResumeAll;

impl ResumeAll {
    fn install() -> Self {
        tokio::spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                resume_everything();
                std::process::exit(130);
            }
        });
        Self
    }
}

fn resume_everything() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack");
    for service in ["kafka", "search"] {
        let _ = std::process::Command::new(script)
            .args(["resume", service])
            .status();
    }
}

impl Drop for ResumeAll {
    fn drop(&mut self) {
        resume_everything();
    }
}

/// The run's names and its cleanup: the slot (after walsync is gone), the publication, the
/// schema and the indices, unless `CHAOS_KEEP` is set.
struct Run {
    name: String,
    keep: bool,
}

impl Run {
    fn schema(&self) -> &str {
        &self.name
    }

    fn alias(&self, table: Table) -> String {
        format!("{}-{}.{}", self.name, self.name, table.name())
    }

    fn topic(&self, table: Table) -> String {
        format!("{}.{}.{}", self.name, self.name, table.name())
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack");
        let name = &self.name;
        let drop_slot = format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = '{name}' AND NOT active"
        );
        let remaining =
            format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{name}'");
        // A killed walsync's walsender may hold the slot for a moment.
        let mut dropped = false;
        for _ in 0..20 {
            let output = std::process::Command::new(script)
                .args(["psql", "-qAt", "-c", &drop_slot, "-c", &remaining])
                .output();
            if output.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().last() == Some("0"))
            {
                dropped = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        if !dropped {
            // A slot left behind holds WAL on the shared server: say so loudly.
            eprintln!(
                "could not drop the replication slot {name} (scripts/stack psql failed?): \
                 drop it by hand with SELECT pg_drop_replication_slot('{name}')"
            );
        }
        if self.keep {
            eprintln!("CHAOS_KEEP: schema {name}, its publication and indices {name}-* are kept");
            return;
        }
        let _ = std::process::Command::new(script)
            .args([
                "psql",
                "-qAt",
                "-c",
                &format!("DROP PUBLICATION IF EXISTS {name}_pub"),
                "-c",
                &format!("DROP SCHEMA IF EXISTS {name} CASCADE"),
            ])
            .output();
        let _ = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-X",
                "DELETE",
                &format!("{}/{name}-*", stack().es_url),
            ])
            .status();
    }
}

async fn create_tables(schema: &str) {
    sql()
        .await
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             CREATE TYPE {schema}.mood AS ENUM ('sad', 'ok', 'happy');
             CREATE DOMAIN {schema}.amount AS numeric(30,6);
             CREATE TABLE {schema}.wide (
                 id bigint PRIMARY KEY, f8 float8, f4 float4, num numeric, amount {schema}.amount,
                 i2 int2, i4 int4, i8 int8, flag bool, txt text, d date, ts timestamp,
                 tstz timestamptz, iv interval, u uuid, bin bytea, ints int4[], texts text[],
                 mood {schema}.mood, doc jsonb, small int NOT NULL, big text);
             CREATE TABLE {schema}.multi (
                 shop int, sku text, qty int, note text, big text, PRIMARY KEY (shop, sku));
             CREATE TABLE {schema}.blob (k bytea PRIMARY KEY, n int, big text);
             -- Never compressed: every value of 10 kB or more is stored out of line, so updates
             -- that leave it alone send it as an unchanged-TOAST marker.
             ALTER TABLE {schema}.wide ALTER COLUMN big SET STORAGE EXTERNAL;
             ALTER TABLE {schema}.multi ALTER COLUMN big SET STORAGE EXTERNAL;
             ALTER TABLE {schema}.blob ALTER COLUMN big SET STORAGE EXTERNAL;"
        ))
        .await
        .expect("create the schema and its tables");
}

fn walsync_config(run: &Run) -> String {
    let tables: Vec<String> = Table::ALL
        .iter()
        .map(|t| format!("{}.{}", run.schema(), t.name()))
        .collect();
    let tables: Vec<&str> = tables.iter().map(String::as_str).collect();
    // The default dynamic mapping types a field by its first value: a float8 column first seen
    // as a number then rejects the strings "NaN" and "Infinity" that docs/events.md prescribes,
    // and a jsonb column first seen as a string rejects objects. Those documents would be
    // dead-lettered (and trip the breaker), which says nothing about the values walsync writes.
    // So `wide`'s index maps no column (`dynamic: false`): `_source` keeps every value as
    // written, and that is what the oracle compares. `multi` and `blob` keep the default mapping.
    let dir = std::env::temp_dir().join(format!("walsync-test-{}", run.name));
    std::fs::create_dir_all(&dir).expect("create the run's directory");
    let mappings = dir.join("wide-mappings.json");
    std::fs::write(&mappings, r#"{"dynamic": false}"#).expect("write the wide mapping");
    // Small chunks, so the initial copy is many chunks that a kill can interrupt; a static group
    // membership, so a restarted sink takes its partitions over at once instead of after the
    // killed member's session timeout.
    format!(
        "{}\n[snapshot]\nchunk_rows = 50\n\n[kafka.extra]\n\"group.instance.id\" = \"{}-sink-0\"\n\n\
         [tables.\"{}.wide\"]\nmappings_file = {:?}\n",
        pipeline_config(&run.name, &tables),
        run.name,
        run.schema(),
        mappings.display().to_string()
    )
}

/// The running walsync and what happened to it.
struct Supervisor {
    walsync: Walsync,
    name: String,
    config: String,
    /// Exits walsync made on its own, with the end of its log at the time.
    exits: Vec<String>,
}

impl Supervisor {
    fn start(name: &str, config: String) -> Self {
        Self {
            walsync: Walsync::spawn("run", name, &config),
            name: name.to_owned(),
            config,
            exits: Vec::new(),
        }
    }

    /// Restarts walsync if it exited on its own (and remembers that).
    fn check(&mut self, at: Duration) {
        if let Ok(Some(status)) = self.walsync.child.try_wait() {
            let log = self.walsync.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(8)..].join("\n    ");
            if self.exits.len() < 3 {
                println!(
                    "[{at:>6.1?}] walsync exited on its own ({status}); restarting. Log:\n    {tail}"
                );
            } else {
                println!("[{at:>6.1?}] walsync exited on its own again ({status}); restarting");
            }
            self.exits.push(format!("{status} at {at:.1?}: {tail}"));
            self.restart();
        }
    }

    fn kill_and_restart(&mut self) {
        self.walsync.kill_9();
        self.restart();
    }

    fn restart(&mut self) {
        self.walsync = Walsync::spawn("run", &self.name, &self.config);
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    PauseKafka,
    PauseSearch,
    TerminateWalsender,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill -9 and restart",
            Fault::PauseKafka => "kafka paused",
            Fault::PauseSearch => "search paused",
            Fault::TerminateWalsender => "walsender terminated",
        }
    }
}

/// Injects faults at random moments until `workload` finishes.
async fn inject_faults(
    rng: &mut Rng,
    supervisor: &mut Supervisor,
    slot: &str,
    workload: &tokio::task::JoinHandle<WorkloadDone>,
    start: Instant,
) -> Counts {
    let admin = admin_client().await;
    let mut counts = Counts::default();
    let mut first = true;
    while !workload.is_finished() {
        let wait = if first {
            // Early, so that some seeds hit the initial copy.
            rng.between(1_000, 4_000)
        } else {
            rng.between(1_500, 5_000)
        };
        first = false;
        let until = Instant::now() + Duration::from_millis(wait);
        while Instant::now() < until && !workload.is_finished() {
            supervisor.check(start.elapsed());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if workload.is_finished() {
            break;
        }
        let fault = [
            Fault::Kill,
            Fault::PauseKafka,
            Fault::PauseSearch,
            Fault::TerminateWalsender,
        ][rng.weighted(&[3, 2, 2, 2])];
        let length = Duration::from_millis(rng.between(2_000, 6_000));
        let at = start.elapsed();
        match fault {
            Fault::Kill => {
                supervisor.kill_and_restart();
                println!("[{at:>6.1?}] fault: kill -9 of walsync, restarted");
            }
            Fault::PauseKafka | Fault::PauseSearch => {
                let service = if matches!(fault, Fault::PauseKafka) {
                    "kafka"
                } else {
                    "search"
                };
                let paused = Paused::new(service);
                println!("[{at:>6.1?}] fault: {service} paused for {length:.1?}");
                let until = Instant::now() + length;
                while Instant::now() < until {
                    supervisor.check(start.elapsed());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                drop(paused);
            }
            Fault::TerminateWalsender => {
                let terminated = admin
                    .query_opt(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                          WHERE slot_name = $1 AND active_pid IS NOT NULL",
                        &[&slot],
                    )
                    .await
                    .expect("terminate the walsender");
                println!(
                    "[{at:>6.1?}] fault: walsender terminated{}",
                    if terminated.is_some() {
                        ""
                    } else {
                        " (none was active)"
                    }
                );
            }
        }
        counts.add(fault.name(), 1);
    }
    counts
}

/// The sink's committed offsets and the high watermarks of the run's topics.
struct GroupProbe {
    consumer: BaseConsumer,
    topics: Vec<String>,
}

impl GroupProbe {
    fn new(group: &str, topics: Vec<String>) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &stack().kafka_brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("create the offset probe");
        Self { consumer, topics }
    }

    /// Whether the group committed every record of every topic (`None`: could not tell yet).
    fn all_committed(&self) -> Option<bool> {
        let timeout = Duration::from_secs(5);
        let mut wanted = TopicPartitionList::new();
        let mut high = BTreeMap::new();
        for topic in &self.topics {
            let metadata = self.consumer.fetch_metadata(Some(topic), timeout).ok()?;
            let partitions = metadata.topics().first()?.partitions().len() as i32;
            if partitions == 0 {
                return None;
            }
            for partition in 0..partitions {
                wanted.add_partition(topic, partition);
                let (_, watermark) = self
                    .consumer
                    .fetch_watermarks(topic, partition, timeout)
                    .ok()?;
                high.insert((topic.clone(), partition), watermark);
            }
        }
        let committed = self.consumer.committed_offsets(wanted, timeout).ok()?;
        Some(high.iter().all(|((topic, partition), watermark)| {
            let offset = match committed
                .find_partition(topic, *partition)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(offset)) => offset,
                _ => 0,
            };
            offset >= *watermark
        }))
    }
}

/// Whether the slot confirmed `lsn` (every change before it is in Kafka).
async fn slot_confirmed(client: &tokio_postgres::Client, slot: &str, lsn: &str) -> bool {
    client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots
              WHERE slot_name = $1 AND confirmed_flush_lsn >= $2::text::pg_lsn",
            &[&slot, &lsn],
        )
        .await
        .ok()
        .flatten()
        .is_some()
}

async fn compare_all(oracle: &Oracle, run: &Run) -> Result<Vec<OracleReport>, String> {
    let mut reports = Vec::new();
    for table in Table::ALL {
        reports.push(
            oracle
                .compare(run.schema(), table.name(), &run.alias(table))
                .await?,
        );
    }
    Ok(reports)
}

/// What one seed found.
struct Outcome {
    seed: u64,
    equal: bool,
    line: String,
    /// Transactions PostgreSQL refused: a bug of this test, not of walsync.
    workload_errors: u64,
}

async fn run_seed(seed: u64, duration: Duration, rate: u64) -> Outcome {
    let test_start = Instant::now();
    let run = Run {
        name: unique_name(&format!("chaos{seed}")).replace('-', "_"),
        keep: std::env::var_os("CHAOS_KEEP").is_some(),
    };
    let schema = run.schema().to_owned();
    println!("differential: seed={seed} duration={duration:?} rate={rate}/s schema={schema}");
    create_tables(&schema).await;
    let mut generator = Generator::new(seed, &schema);
    let client = sql().await;
    let dir = std::env::temp_dir().join(format!("walsync-test-{}", run.name));
    std::fs::create_dir_all(&dir).expect("create the run's directory");
    let sql_log = dir.join("workload.sql");
    let mut initial = String::from("-- the rows before walsync starts\n");
    for transaction in generator.initial_rows() {
        initial.push_str(&transaction);
        client
            .batch_execute(&format!("BEGIN;\n{transaction}COMMIT;"))
            .await
            .expect("the initial rows");
    }
    std::fs::write(&sql_log, initial).expect("write the workload's SQL log");
    println!(
        "initial rows: wide {}, multi {}, blob {}",
        generator.model.wide.len(),
        generator.model.multi.len(),
        generator.model.blob.len()
    );

    let mut supervisor = Supervisor::start(&run.name, walsync_config(&run));
    println!(
        "walsync log: {}; the workload's SQL: {}",
        supervisor.walsync.log.display(),
        sql_log.display()
    );
    let start = Instant::now();
    let workload = tokio::spawn(workload(generator, duration, rate, sql_log));
    let mut fault_rng = Rng::new(seed ^ 0x5EED_FA17_0000_0000);
    let faults = inject_faults(&mut fault_rng, &mut supervisor, &run.name, &workload, start).await;
    let done = workload.await.expect("the workload ran");
    let end_lsn: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("the WAL position")
        .get(0);
    println!(
        "[{:>6.1?}] workload over after {:.1?} ({} statements); waiting for the pipeline to reach {end_lsn}",
        start.elapsed(),
        done.elapsed,
        done.statements
    );

    // Catch up: the slot confirmed the end, the sink committed everything, then the oracle.
    let oracle = Oracle::connect().await;
    let probe = GroupProbe::new(
        &format!("{}-sink", run.name),
        Table::ALL.iter().map(|t| run.topic(*t)).collect(),
    );
    let catch_up = Instant::now();
    let mut caught_up_checks = 0;
    let mut equal_since: Option<Instant> = None;
    let mut last: Result<Vec<OracleReport>, String> = Err("not compared yet".to_owned());
    let mut last_compare: Option<Instant> = None;
    let caught_up = loop {
        supervisor.check(start.elapsed());
        let caught_up = slot_confirmed(&client, &run.name, &end_lsn).await
            && probe.all_committed() == Some(true);
        let due = last_compare.is_none_or(|at| at.elapsed() > Duration::from_secs(5));
        if caught_up || due {
            last = compare_all(&oracle, &run).await;
            last_compare = Some(Instant::now());
            let equal = last
                .as_ref()
                .is_ok_and(|r| r.iter().all(OracleReport::is_equal));
            if caught_up {
                // Everything was applied and committed: the verdict is final. An unequal one is
                // checked once more a moment later.
                caught_up_checks += 1;
                if equal || caught_up_checks >= 2 {
                    break true;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            // Equal for a while without the probe saying so: accepted, and said.
            if equal {
                if equal_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(15)
                {
                    break false;
                }
            } else {
                equal_since = None;
            }
        }
        if catch_up.elapsed() > CATCH_UP {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let catch_up_time = catch_up.elapsed();
    let dead_letters = common::kafka::try_topic_size(&format!("{}.dlq", run.name)).unwrap_or(0);

    let mut out = String::new();
    let (equal, summary) = match &last {
        Ok(reports) => {
            for report in reports {
                let _ = write!(out, "{report}");
            }
            let equal = reports.iter().all(OracleReport::is_equal);
            let rows: Vec<String> = reports
                .iter()
                .zip(Table::ALL)
                .map(|(r, t)| format!("{}:{}", t.name(), r.rows))
                .collect();
            let sum = |f: fn(&OracleReport) -> usize| reports.iter().map(f).sum::<usize>();
            (
                equal,
                format!(
                    "rows={} missing={} extra={} differing={}",
                    rows.join(","),
                    sum(|r| r.missing.len()),
                    sum(|r| r.extra.len()),
                    sum(|r| r.differing.len())
                ),
            )
        }
        Err(error) => {
            let _ = writeln!(out, "the oracle could not compare: {error}");
            (false, "oracle-error".to_owned())
        }
    };
    let equal = equal && supervisor.exits.is_empty() && dead_letters == 0;
    let line = format!(
        "differential: seed={seed} result={} duration={:.0}s {summary} statements={} faults={} exits={} dead_letters={dead_letters} caught_up={caught_up} catch_up={catch_up_time:.1?} total={:.1?}",
        if equal { "equal" } else { "DIFFERENT" },
        duration.as_secs_f64(),
        done.statements,
        faults.0.values().sum::<u64>(),
        supervisor.exits.len(),
        test_start.elapsed()
    );
    println!("operations: {}", done.counts);
    println!("faults: {faults}");
    for error in &done.errors {
        println!("workload error (a bug of this test): {error}");
    }
    for exit in &supervisor.exits {
        println!("walsync exited on its own: {exit}");
    }
    print!("{out}");
    println!("{line}");
    println!(
        "walsync on SIGTERM: {}",
        stop(&mut supervisor.walsync).await
    );
    drop(supervisor);
    drop(run);
    Outcome {
        seed,
        equal,
        line,
        workload_errors: done
            .counts
            .0
            .get("transactions failed")
            .copied()
            .unwrap_or(0),
    }
}

/// SIGTERM, then kill -9 if it does not exit within 30 s; says which.
async fn stop(walsync: &mut Walsync) -> String {
    let pid = walsync.pid().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        if let Ok(Some(status)) = walsync.child.try_wait() {
            return format!("exited ({status})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    walsync.kill_9();
    "did not exit within 30 s, killed".to_owned()
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok().filter(|v| !v.trim().is_empty())?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a non-negative integer")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_workload_with_faults_leaves_every_index_equal_to_its_table() {
    let _resume = ResumeAll::install();
    let seeds = match env_u64("SEED") {
        Some(seed) => vec![seed],
        None => vec![1, 2, 3],
    };
    let duration = Duration::from_secs(env_u64("DURATION").unwrap_or(40));
    let rate = env_u64("CHAOS_RATE").unwrap_or(DEFAULT_RATE).max(1);
    let mut outcomes = Vec::new();
    for seed in seeds {
        outcomes.push(run_seed(seed, duration, rate).await);
    }
    println!("\nsummary (replay one with `make chaos SEED=n DURATION=s`):");
    for outcome in &outcomes {
        println!("{}", outcome.line);
    }
    let broken: Vec<u64> = outcomes
        .iter()
        .filter(|o| o.workload_errors > 0)
        .map(|o| o.seed)
        .collect();
    assert!(
        broken.is_empty(),
        "seeds {broken:?}: PostgreSQL refused some of the workload's transactions, a bug of this \
         test's generator (the errors are printed above)"
    );
    let different: Vec<u64> = outcomes
        .iter()
        .filter(|o| !o.equal)
        .map(|o| o.seed)
        .collect();
    assert!(
        different.is_empty(),
        "seeds {different:?} ended with an index that differs from its table (reports above)"
    );
}

/// The generator's statements depend on the seed only.
#[test]
fn a_seed_always_generates_the_same_statements() {
    let statements = |seed| {
        let mut generator = Generator::new(seed, "s");
        let mut text = generator.initial_rows().concat();
        for _ in 0..300 {
            text.push_str(&generator.transaction().sql);
        }
        text
    };
    assert_eq!(statements(7), statements(7));
    assert_ne!(statements(7), statements(8));
}
