//! `walsync check`: the preflight of everything the pipeline needs, changing nothing.
//!
//! One line per check, `✓ <what>` or `✗ <what>: <problem> — fix: <how>`, in three sections:
//! PostgreSQL (the source's own preflight from [`crate::postgres::slot`], one check at a time,
//! plus wal senders, the publication and the slot), Kafka (metadata, topics present or
//! creatable: a validate-only CreateTopics, which creates nothing) and the search server
//! (engine and version, each alias and the system identifier recorded in its index).
//! Every network step has a deadline, so an unreachable service is a ✗ line, never a hang.
//! A section whose service cannot be reached reports that once and skips its other checks.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use elasticsearch::Elasticsearch;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseProducer, Producer};
use serde_json::Value;

use crate::config::{Config, TableConfig};
use crate::kafka::producer::client_config;
use crate::kafka::topics::plan_topics;
use crate::postgres::catalog::{Catalog, ConnectError, RoleInfo, SlotInfo, TableInfo};
use crate::postgres::replication::ConnectParams;
use crate::postgres::slot::{self, Problem, split_table_name};
use crate::sink::index::{alias_name, build_client, read_alias};

/// The deadline of each network step.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs every check and prints one line per check; exit code 1 when any failed.
pub async fn run(config: &Config) -> ExitCode {
    let mut checks = Checks::default();
    let system_id = check_postgres(config, &mut checks).await;
    check_kafka(config, &mut checks).await;
    check_search(config, system_id.as_deref(), &mut checks).await;
    if checks.failed == 0 {
        print_line(format_args!("all {} checks passed", checks.passed));
        ExitCode::SUCCESS
    } else {
        print_line(format_args!(
            "{} of {} checks failed",
            checks.failed,
            checks.failed + checks.passed
        ));
        ExitCode::from(1)
    }
}

/// Prints check results as they come and counts them.
#[derive(Default)]
struct Checks {
    passed: usize,
    failed: usize,
}

impl Checks {
    fn pass(&mut self, what: impl Display) {
        self.passed += 1;
        print_line(format_args!("✓ {what}"));
    }

    fn fail(&mut self, what: impl Display, problem: impl Display, fix: impl Display) {
        self.failed += 1;
        print_line(format_args!("✗ {what}: {problem} — fix: {fix}"));
    }

    /// ✓ `ok` when the preflight found no problem, else one ✗ line per problem.
    fn problems(&mut self, what: &str, ok: impl Display, problems: Vec<Problem>) {
        if problems.is_empty() {
            self.pass(ok);
        }
        for problem in problems {
            self.fail(what, problem.what, problem.fix);
        }
    }
}

/// A line on stdout; a closed pipe (`walsync check | head`) is not an error worth a panic.
fn print_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// `future`, or an error naming the deadline.
async fn within<T, E: std::error::Error>(
    future: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(STEP_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(with_causes(&error)),
        Err(_) => Err(format!("no answer within {} s", STEP_TIMEOUT.as_secs())),
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

/// The PostgreSQL checks; returns the cluster's system identifier when it could be read.
async fn check_postgres(config: &Config, checks: &mut Checks) -> Option<String> {
    let params = match crate::postgres::replication::ConnectParams::from_config(config) {
        Ok(params) => params,
        Err(error) => {
            checks.fail(
                "PostgreSQL connection settings",
                format!("{error:#}"),
                "set postgres.url to postgres://<user>@<host>:<port>/<database>",
            );
            return None;
        }
    };
    let target = format!(
        "PostgreSQL at {}:{}, database {}, as {}",
        params.host, params.port, params.dbname, params.user
    );
    let catalog = match tokio::time::timeout(STEP_TIMEOUT, Catalog::connect(&params)).await {
        Ok(Ok(catalog)) => catalog,
        Ok(Err(error)) => {
            checks.fail(
                &target,
                connect_problem(&error),
                connect_fix(&error, &params),
            );
            print_line(format_args!(
                "  (the other PostgreSQL checks need a connection: skipped)"
            ));
            return None;
        }
        Err(_) => {
            checks.fail(
                &target,
                format!("no answer within {} s", STEP_TIMEOUT.as_secs()),
                "check the host and port in postgres.url, and that no firewall drops the connection",
            );
            print_line(format_args!(
                "  (the other PostgreSQL checks need a connection: skipped)"
            ));
            return None;
        }
    };
    let version = within(catalog.setting("server_version"))
        .await
        .unwrap_or_else(|_| "?".into());
    checks.pass(format!("{target} reachable (PostgreSQL {version})"));
    match tokio::time::timeout(
        STEP_TIMEOUT * 3,
        catalog_checks(&catalog, config, &params, checks),
    )
    .await
    {
        Ok(Ok(system_id)) => system_id,
        Ok(Err(error)) => {
            checks.fail(
                "PostgreSQL catalog",
                describe_postgres(&error),
                "grant the role read access to the catalog, or run check as the role walsync runs as",
            );
            None
        }
        Err(_) => {
            checks.fail(
                "PostgreSQL catalog",
                "the checks did not finish within 30 s",
                "look for locks or an overloaded server (pg_stat_activity)",
            );
            None
        }
    }
}

fn connect_fix(error: &ConnectError, params: &ConnectParams) -> String {
    match error.code() {
        Some("28P01") => {
            "check the password (postgres.url, postgres.password or postgres.password_file)".into()
        }
        Some("3D000") => format!(
            "database {} does not exist: check the database name in postgres.url",
            params.dbname
        ),
        Some("28000") => "add a pg_hba.conf entry for this user and address (host … scram-sha-256), or change postgres.tls.mode".into(),
        Some(_) => "see the server's message above".into(),
        None if matches!(error, ConnectError::Tls(_)) => {
            "fix postgres.tls (mode, ca_file) or the URL's sslmode/sslrootcert".into()
        }
        None => format!(
            "check the host and port in postgres.url (is PostgreSQL running and listening on {}:{}?)",
            params.host, params.port
        ),
    }
}

/// An error with its chain of causes: transport errors keep the useful part ("connection
/// refused") in their sources.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The server's refusal without the hint [`ConnectError`] appends (the fix says it).
fn connect_problem(error: &ConnectError) -> String {
    match error {
        ConnectError::Postgres(inner) => match inner.as_db_error() {
            Some(db) => format!(
                "PostgreSQL refused the connection: {} {}: {}",
                db.severity(),
                db.code().code(),
                db.message()
            ),
            None => with_causes(inner),
        },
        ConnectError::Tls(_) => error.to_string(),
    }
}

fn describe_postgres(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => error.to_string(),
    }
}

/// Everything that needs the metadata connection.
async fn catalog_checks(
    catalog: &Catalog,
    config: &Config,
    params: &ConnectParams,
    checks: &mut Checks,
) -> Result<Option<String>, tokio_postgres::Error> {
    let mut problems = Vec::new();
    slot::check_wal_level(catalog, &mut problems).await?;
    checks.problems("wal_level", "wal_level = logical", problems);

    let existing_slot = catalog.slot(&config.postgres.slot).await?;
    check_capacity(catalog, existing_slot.is_some(), checks).await?;

    check_migrations(catalog, checks).await?;

    let role = catalog.role().await?;
    let mut problems = Vec::new();
    slot::check_role(catalog, &mut problems).await?;
    checks.problems(
        "replication privilege",
        format!(
            "role {} may replicate ({})",
            role.name,
            privilege_source(&role)
        ),
        problems,
    );

    let tables = check_tables(catalog, config, checks).await?;
    check_publication(catalog, config, &role, &tables, checks).await?;

    let mut problems = Vec::new();
    slot::check_slot(
        catalog,
        &config.postgres,
        existing_slot.as_ref(),
        &params.dbname,
        &mut problems,
    )
    .await?;
    checks.problems(
        &format!("slot {}", config.postgres.slot),
        slot_summary(&config.postgres.slot, existing_slot.as_ref()),
        problems,
    );

    let system_id = catalog
        .client()
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .ok()
        .map(|row| row.get(0));
    Ok(system_id)
}

/// walsync's schema: migrations this build would apply at start, and migrations a newer walsync
/// applied that this one does not know (it would refuse to start).
async fn check_migrations(
    catalog: &Catalog,
    checks: &mut Checks,
) -> Result<(), tokio_postgres::Error> {
    let what = "walsync schema";
    let known = slot::known_migrations();
    let exists: bool = catalog
        .client()
        .query_one(
            "SELECT to_regclass('walsync.schema_history') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        checks.pass(format!(
            "{what} not created yet; walsync applies its {} migration(s) at start",
            known.len()
        ));
        return Ok(());
    }
    let rows = match catalog
        .client()
        .query(
            "SELECT version::bigint, name FROM walsync.schema_history ORDER BY version",
            &[],
        )
        .await
    {
        Ok(rows) => rows,
        Err(error) => {
            checks.fail(
                what,
                format!("cannot read walsync.schema_history: {}", describe_postgres(&error)),
                "GRANT USAGE ON SCHEMA walsync TO <role>; GRANT SELECT ON ALL TABLES IN SCHEMA walsync TO <role> \
                 (or run walsync as the role that ran its migrations)",
            );
            return Ok(());
        }
    };
    let applied: Vec<(i64, String)> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    let unknown: Vec<String> = applied
        .iter()
        .filter(|(version, _)| !known.iter().any(|(known, _)| known == version))
        .map(|(version, name)| format!("V{version}__{name}"))
        .collect();
    let pending: Vec<String> = known
        .iter()
        .filter(|(version, _)| !applied.iter().any(|(applied, _)| applied == version))
        .map(|(version, name)| format!("V{version}__{name}"))
        .collect();
    if !unknown.is_empty() {
        checks.fail(
            what,
            format!(
                "the database has migration(s) {} that walsync {} does not know: a newer walsync applied them, and this one refuses to start",
                unknown.join(", "),
                env!("CARGO_PKG_VERSION")
            ),
            "run the walsync version that applied them, or a newer one",
        );
    } else if pending.is_empty() {
        checks.pass(format!(
            "{what} up to date ({} migration(s))",
            applied.len()
        ));
    } else {
        checks.pass(format!(
            "{what}: walsync applies {} at start",
            pending.join(", ")
        ));
    }
    Ok(())
}

fn privilege_source(role: &RoleInfo) -> String {
    if role.superuser {
        "superuser".into()
    } else if role.replication {
        "REPLICATION attribute".into()
    } else {
        format!("member of {}", role.replication_roles.join(", "))
    }
}

/// Free replication slots and wal senders: walsync's slot (unless it exists) plus one
/// temporary slot, each with its walsender, while a snapshot, a backfill or verify runs.
async fn check_capacity(
    catalog: &Catalog,
    slot_exists: bool,
    checks: &mut Checks,
) -> Result<(), tokio_postgres::Error> {
    let row = catalog
        .client()
        .query_one(
            "SELECT current_setting('max_replication_slots')::int,
                    (SELECT count(*)::int FROM pg_replication_slots),
                    current_setting('max_wal_senders')::int,
                    (SELECT count(*)::int FROM pg_stat_replication)",
            &[],
        )
        .await?;
    let (max_slots, used_slots, max_senders, used_senders): (i32, i32, i32, i32) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let needed = if slot_exists { 1 } else { 2 };
    let what = "replication capacity";
    let summary = format!(
        "replication slots {used_slots} of {max_slots} in use, wal senders {used_senders} of {max_senders} in use"
    );
    if max_slots - used_slots < needed {
        checks.fail(
            what,
            format!("{summary}; walsync needs {needed} free slot(s) (its slot, plus a temporary one during snapshots and verify)"),
            "raise max_replication_slots (restart needed) or drop an unused slot (pg_replication_slots)",
        );
    } else if max_senders - used_senders < 2 {
        checks.fail(
            what,
            format!("{summary}; walsync needs 2 free wal senders (streaming, plus a snapshot or verify)"),
            "raise max_wal_senders (restart needed) or stop an unused replication client (pg_stat_replication)",
        );
    } else {
        checks.pass(summary);
    }
    Ok(())
}

/// Each configured table: exists, has a usable key and replica identity. Returns the tables
/// that passed, for the publication check.
async fn check_tables(
    catalog: &Catalog,
    config: &Config,
    checks: &mut Checks,
) -> Result<Vec<TableInfo>, tokio_postgres::Error> {
    if config.postgres.tables.is_empty() {
        checks.fail(
            "tables",
            "no tables are configured",
            "list the tables to capture in postgres.tables, e.g. tables = [\"public.products\"]",
        );
    }
    let mut usable = Vec::new();
    for name in &config.postgres.tables {
        let (schema, table) = split_table_name(name);
        let qualified = format!("{schema}.{table}");
        let key_override = config
            .tables
            .get(&qualified)
            .map(|table| table.key_columns.clone())
            .unwrap_or_default();
        let Some(info) = catalog.table(&schema, &table).await? else {
            checks.fail(
                format!("table {qualified}"),
                "does not exist",
                format!("create it, or remove \"{name}\" from postgres.tables (names are case-sensitive)"),
            );
            continue;
        };
        let unknown = unknown_columns(catalog, info.oid, &key_override).await?;
        if !unknown.is_empty() {
            checks.fail(
                format!("table {qualified}"),
                format!("configured key_columns {} do not exist", unknown.join(", ")),
                format!(
                    "name existing unique NOT NULL columns in tables.\"{qualified}\".key_columns"
                ),
            );
            continue;
        }
        let mut problems = Vec::new();
        let from_primary_key = key_override.is_empty();
        match slot::check_table(info.clone(), key_override, &mut problems) {
            Some(captured) => {
                checks.pass(format!(
                    "table {qualified}: key ({}) from {}; {}",
                    captured.key_columns.join(", "),
                    if from_primary_key {
                        "the primary key"
                    } else {
                        "key_columns"
                    },
                    toast_note(info.replica_identity)
                ));
                usable.push(info);
            }
            None => {
                for problem in problems {
                    checks.fail(format!("table {qualified}"), problem.what, problem.fix);
                }
            }
        }
    }
    Ok(usable)
}

async fn unknown_columns(
    catalog: &Catalog,
    table_oid: u32,
    columns: &[String],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut unknown = Vec::new();
    for column in columns {
        let found = catalog
            .client()
            .query_opt(
                "SELECT 1 FROM pg_attribute WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped",
                &[&table_oid, column],
            )
            .await?
            .is_some();
        if !found {
            unknown.push(column.clone());
        }
    }
    Ok(unknown)
}

/// What the replica identity means for unchanged TOASTed values (design invariant 6).
fn toast_note(replica_identity: char) -> &'static str {
    match replica_identity {
        'f' => "replica identity FULL: unchanged TOAST values are filled from the old tuple",
        'i' => {
            "replica identity INDEX: unchanged TOAST values are filled from the row's previous change in the batch or re-read from PostgreSQL"
        }
        _ => {
            "replica identity DEFAULT: unchanged TOAST values are filled from the row's previous change in the batch or re-read from PostgreSQL"
        }
    }
}

/// The publication exists and covers the tables, or walsync may create or extend it.
async fn check_publication(
    catalog: &Catalog,
    config: &Config,
    role: &RoleInfo,
    tables: &[TableInfo],
    checks: &mut Checks,
) -> Result<(), tokio_postgres::Error> {
    let publication = &config.postgres.publication;
    let what = format!("publication {publication}");
    let published = catalog.publication_tables(publication).await?;
    let exists = published.is_some();
    let missing: Vec<&TableInfo> = tables
        .iter()
        .filter(|table| {
            published.as_ref().is_none_or(|published| {
                !published.contains(&(table.schema.clone(), table.name.clone()))
            })
        })
        .collect();
    if exists && missing.is_empty() {
        checks.pass(format!(
            "{what} exists and covers all {} table(s)",
            tables.len()
        ));
        return Ok(());
    }
    let mut not_owned = Vec::new();
    for table in &missing {
        let owned: bool = catalog
            .client()
            .query_one(
                "SELECT pg_has_role(relowner, 'USAGE') FROM pg_class WHERE oid = $1",
                &[&table.oid],
            )
            .await?
            .get(0);
        if !owned && !role.superuser {
            not_owned.push(format!("{}.{}", table.schema, table.name));
        }
    }
    let can_create: bool = catalog
        .client()
        .query_one(
            "SELECT has_database_privilege(current_database(), 'CREATE')",
            &[],
        )
        .await?
        .get(0);
    let names: Vec<String> = missing
        .iter()
        .map(|table| format!("{}.{}", table.schema, table.name))
        .collect();
    if !not_owned.is_empty() {
        checks.fail(
            &what,
            format!(
                "walsync would add {} to it, but role {} does not own {}",
                names.join(", "),
                role.name,
                not_owned.join(", ")
            ),
            format!(
                "as the tables' owner run {} {publication} {} {} (or make {} their owner)",
                if exists {
                    "ALTER PUBLICATION"
                } else {
                    "CREATE PUBLICATION"
                },
                if exists { "ADD TABLE" } else { "FOR TABLE" },
                names.join(", "),
                role.name
            ),
        );
    } else if !exists && !can_create && !role.superuser {
        checks.fail(
            &what,
            format!("does not exist, and role {} may not create it", role.name),
            format!(
                "GRANT CREATE ON DATABASE {} TO {}, or create it: CREATE PUBLICATION {publication} FOR TABLE {}",
                catalog_database(catalog).await?,
                role.name,
                names.join(", ")
            ),
        );
    } else if !exists {
        checks.pass(format!(
            "{what} does not exist yet; walsync creates it at start for {} table(s)",
            names.len()
        ));
    } else {
        checks.pass(format!(
            "{what} exists; walsync adds {} to it at start",
            names.join(", ")
        ));
    }
    Ok(())
}

async fn catalog_database(catalog: &Catalog) -> Result<String, tokio_postgres::Error> {
    Ok(catalog
        .client()
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0))
}

fn slot_summary(name: &str, slot: Option<&SlotInfo>) -> String {
    let Some(slot) = slot else {
        return format!(
            "slot {name} does not exist yet; walsync creates it at start and copies the tables"
        );
    };
    format!(
        "slot {name}: database {}, plugin {}, wal_status {}, {}, confirmed_flush_lsn {}",
        slot.database.as_deref().unwrap_or("-"),
        slot.plugin.as_deref().unwrap_or("-"),
        slot.wal_status.as_deref().unwrap_or("-"),
        match slot.active_pid {
            Some(pid) => format!("active (pid {pid})"),
            None => "inactive".into(),
        },
        slot.confirmed_flush_lsn
            .map_or_else(|| "-".into(), |lsn| lsn.to_string())
    )
}

// ---------------------------------------------------------------------------------------------
// Kafka
// ---------------------------------------------------------------------------------------------

async fn check_kafka(config: &Config, checks: &mut Checks) {
    let brokers = format!("Kafka at {}", config.kafka.brokers);
    let tables: Vec<(String, String)> = config
        .postgres
        .tables
        .iter()
        .map(|name| split_table_name(name))
        .collect();
    let topics = match plan_topics(&config.kafka.topic_prefix, &tables) {
        Ok(topics) => topics,
        Err(error) => {
            checks.fail("topics", &error, "see the message");
            Vec::new()
        }
    };
    let client_config = match client_config(&config.kafka) {
        Ok(client_config) => client_config,
        Err(error) => {
            checks.fail("Kafka settings", error, "fix the [kafka] section");
            return;
        }
    };
    // The metadata request blocks its thread; the timeout bounds it.
    let metadata_config = client_config.clone();
    let metadata = tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = metadata_config.create().map_err(|e| e.to_string())?;
        let metadata = producer
            .client()
            .fetch_metadata(None, STEP_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let brokers = metadata.brokers().len();
        let partitions: Vec<(String, usize)> = metadata
            .topics()
            .iter()
            .map(|topic| (topic.name().to_owned(), topic.partitions().len()))
            .collect();
        Ok::<_, String>((brokers, partitions))
    })
    .await;
    let (broker_count, existing) = match metadata {
        Ok(Ok(metadata)) => metadata,
        Ok(Err(error)) => {
            checks.fail(
                &brokers,
                format!("no metadata within {} s: {error}", STEP_TIMEOUT.as_secs()),
                "check kafka.brokers (host:port of the bootstrap servers) and kafka.security",
            );
            print_line(format_args!("  (the topic checks need Kafka: skipped)"));
            return;
        }
        Err(error) => {
            checks.fail(&brokers, error, "report this as a bug");
            return;
        }
    };
    checks.pass(format!("{brokers} reachable ({broker_count} broker(s))"));
    for topic in topics {
        match existing.iter().find(|(name, _)| *name == topic) {
            Some((_, partitions)) if *partitions as i32 == config.kafka.partitions => {
                checks.pass(format!("topic {topic} present, {partitions} partition(s)"));
            }
            Some((_, partitions)) => checks.pass(format!(
                "topic {topic} present with {partitions} partition(s) (kafka.partitions = {} applies to new topics only)",
                config.kafka.partitions
            )),
            None => check_creatable(&client_config, config, &topic, checks).await,
        }
    }
}

/// A validate-only CreateTopics: Kafka checks the request and the principal's rights and
/// creates nothing.
async fn check_creatable(
    client_config: &rdkafka::ClientConfig,
    config: &Config,
    topic: &str,
    checks: &mut Checks,
) {
    let what = format!("topic {topic}");
    let admin: AdminClient<DefaultClientContext> = match client_config.create() {
        Ok(admin) => admin,
        Err(error) => {
            checks.fail(&what, error, "fix the [kafka] section");
            return;
        }
    };
    let new_topic = NewTopic::new(
        topic,
        config.kafka.partitions,
        TopicReplication::Fixed(config.kafka.replication_factor),
    )
    .set("cleanup.policy", &config.kafka.cleanup_policy);
    let options = AdminOptions::new()
        .validate_only(true)
        .request_timeout(Some(STEP_TIMEOUT));
    let outcome =
        tokio::time::timeout(STEP_TIMEOUT, admin.create_topics([&new_topic], &options)).await;
    match outcome {
        Ok(Ok(results)) => match results.into_iter().next() {
            Some(Err((_, code))) => checks.fail(
                &what,
                format!("missing, and Kafka would refuse to create it: {code}"),
                format!(
                    "create it ({} partitions, replication factor {}), or grant walsync's principal CREATE on the cluster; check kafka.replication_factor against the number of brokers",
                    config.kafka.partitions, config.kafka.replication_factor
                ),
            ),
            _ => checks.pass(format!(
                "{what} missing; creatable with {} partition(s) (walsync creates it at start)",
                config.kafka.partitions
            )),
        },
        Ok(Err(error)) => checks.fail(
            &what,
            format!("missing, and the creation check failed: {error}"),
            "create the topic yourself, or check kafka.brokers and kafka.security",
        ),
        Err(_) => checks.fail(
            &what,
            format!(
                "missing, and Kafka did not answer the creation check within {} s",
                STEP_TIMEOUT.as_secs()
            ),
            "check kafka.brokers",
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The search server
// ---------------------------------------------------------------------------------------------

async fn check_search(config: &Config, system_id: Option<&str>, checks: &mut Checks) {
    let url = &config.elasticsearch.url;
    let what = format!("search server at {url}");
    let client = match build_client(&config.elasticsearch) {
        Ok(client) => client,
        Err(error) => {
            checks.fail(&what, &error, "fix the [elasticsearch] section");
            return;
        }
    };
    match server_info(&client).await {
        Ok((engine, version)) => checks.pass(format!("{what} reachable: {engine} {version}")),
        Err(error) => {
            checks.fail(
                &what,
                error,
                "check elasticsearch.url and the credentials (username/password or api_key)",
            );
            print_line(format_args!(
                "  (the index checks need the search server: skipped)"
            ));
            return;
        }
    }
    for name in &config.postgres.tables {
        let (schema, table) = split_table_name(name);
        let table_config = config
            .tables
            .get(&format!("{schema}.{table}"))
            .cloned()
            .unwrap_or_else(TableConfig::default);
        let alias = alias_name(&config.elasticsearch, &table_config, &schema, &table);
        check_alias(&client, &alias, system_id, checks).await;
    }
}

/// The engine (Elasticsearch or OpenSearch) and its version, from `GET /`.
async fn server_info(client: &Elasticsearch) -> Result<(&'static str, String), String> {
    let response = within(client.info().send()).await?;
    let status = response.status_code();
    if !status.is_success() {
        let body = within(response.text()).await.unwrap_or_default();
        return Err(format!("HTTP {status}: {body}"));
    }
    let info: Value = within(response.json()).await?;
    let engine = match info
        .pointer("/version/distribution")
        .and_then(Value::as_str)
    {
        Some("opensearch") => "OpenSearch",
        _ => "Elasticsearch",
    };
    let version = info
        .pointer("/version/number")
        .and_then(Value::as_str)
        .unwrap_or("(unknown version)")
        .to_owned();
    Ok((engine, version))
}

async fn check_alias(
    client: &Elasticsearch,
    alias: &str,
    system_id: Option<&str>,
    checks: &mut Checks,
) {
    let what = format!("index {alias}");
    let target = match tokio::time::timeout(STEP_TIMEOUT, read_alias(client, alias)).await {
        Ok(Ok(target)) => target,
        Ok(Err(error)) => {
            checks.fail(&what, &error, "see the message");
            return;
        }
        Err(_) => {
            checks.fail(
                &what,
                format!("no answer within {} s", STEP_TIMEOUT.as_secs()),
                "check the search server's health",
            );
            return;
        }
    };
    let Some(target) = target else {
        checks.pass(format!(
            "{what}: alias does not exist yet; the sink creates {alias}_v1 with its first event"
        ));
        return;
    };
    match (&target.system_id, system_id) {
        (None, _) => checks.fail(
            &what,
            format!(
                "index {} has no _meta.walsync.system_id: walsync did not create it and will not write to it",
                target.index
            ),
            format!(
                "delete {} or point the alias elsewhere (to adopt it see docs/runbook.md)",
                target.index
            ),
        ),
        (Some(recorded), Some(database)) if recorded != database => checks.fail(
            &what,
            format!(
                "index {} was built from PostgreSQL system {recorded}, the database is system {database}: the sink refuses to write to it",
                target.index
            ),
            format!(
                "build a new index from this cluster and swap the alias (walsync backfill --into {alias}_v<N+1>), or delete {} if it is disposable",
                target.index
            ),
        ),
        (Some(recorded), Some(_)) => checks.pass(format!(
            "{what} → {}, built from this cluster (system identifier {recorded})",
            target.index
        )),
        (Some(recorded), None) => checks.pass(format!(
            "{what} → {}, built from system {recorded} (the database's identifier could not be read to compare)",
            target.index
        )),
    }
}
