//! Replication slots, publications and walsync's own objects in the source database.
//!
//! Owns the preflight checks (`wal_level`, privileges, tables, primary keys, replica identity,
//! slot health), publication reconciliation, migrations, the heartbeat, and the rule that a
//! slot walsync used before is never silently recreated.
//!
//! Preflight only reads: every problem is collected with its fix before anything is changed,
//! so a misconfigured start changes nothing in the database.
//!
//! Privileges each step needs: reading the catalog needs none beyond LOGIN; the replication
//! connection needs the REPLICATION attribute (or a managed-service role such as
//! `rds_replication`); migrations need CREATE on the database; creating or altering the
//! publication needs ownership of the published tables (or superuser) and CREATE on the database.

use std::collections::BTreeMap;

use crate::config::{PostgresConfig, TableConfig};
use crate::postgres::catalog::{Catalog, SlotInfo, TableInfo};
use crate::postgres::replication::quote_identifier;

/// One thing that must change before walsync can run, with how to change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub what: String,
    pub fix: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}\n    fix: {}", self.what, self.fix)
    }
}

/// A configured table, checked against the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedTable {
    pub info: TableInfo,
    /// The key of its events: the primary key, or the configured key columns.
    pub key_columns: Vec<String>,
}

impl CapturedTable {
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.info.schema, self.info.name)
    }
}

/// The outcome of preflight: the tables to capture, and everything that is wrong.
#[derive(Debug, Default)]
pub struct Preflight {
    pub tables: Vec<CapturedTable>,
    pub slot: Option<SlotInfo>,
    pub problems: Vec<Problem>,
}

pub use crate::config::split_table_name;

/// Checks everything the source needs, changing nothing.
pub async fn preflight(
    catalog: &Catalog,
    config: &PostgresConfig,
    overrides: &BTreeMap<String, TableConfig>,
    database: &str,
) -> Result<Preflight, tokio_postgres::Error> {
    let mut preflight = Preflight::default();
    check_wal_level(catalog, &mut preflight.problems).await?;
    check_role(catalog, &mut preflight.problems).await?;
    if config.tables.is_empty() {
        preflight.problems.push(Problem {
            what: "no tables are configured".into(),
            fix:
                "list the tables to capture in postgres.tables, e.g. tables = [\"public.products\"]"
                    .into(),
        });
    }
    for name in &config.tables {
        let (schema, table) = split_table_name(name);
        let key_override = overrides
            .get(&format!("{schema}.{table}"))
            .map(|table| table.key_columns.clone())
            .unwrap_or_default();
        match catalog.table(&schema, &table).await? {
            None => preflight.problems.push(Problem {
                what: format!("table {schema}.{table} does not exist"),
                fix: format!("create it, or remove \"{name}\" from postgres.tables (names are case-sensitive)"),
            }),
            Some(info) => {
                if let Some(captured) = check_table(info, key_override, &mut preflight.problems) {
                    preflight.tables.push(captured);
                }
            }
        }
    }
    preflight.slot = catalog.slot(&config.slot).await?;
    check_slot(
        catalog,
        config,
        preflight.slot.as_ref(),
        database,
        &mut preflight.problems,
    )
    .await?;
    Ok(preflight)
}

pub async fn check_wal_level(
    catalog: &Catalog,
    problems: &mut Vec<Problem>,
) -> Result<(), tokio_postgres::Error> {
    let wal_level = catalog.setting("wal_level").await?;
    if wal_level != "logical" {
        problems.push(Problem {
            what: format!("wal_level is '{wal_level}', logical replication needs 'logical'"),
            fix: "run ALTER SYSTEM SET wal_level = logical and restart PostgreSQL \
                  (RDS/Aurora: rds.logical_replication = 1 in the parameter group; Cloud SQL: cloudsql.logical_decoding = on)"
                .into(),
        });
    }
    Ok(())
}

pub async fn check_role(
    catalog: &Catalog,
    problems: &mut Vec<Problem>,
) -> Result<(), tokio_postgres::Error> {
    let role = catalog.role().await?;
    if !role.can_replicate() {
        problems.push(Problem {
            what: format!("role {} may not use replication connections", role.name),
            fix: format!(
                "ALTER ROLE {} REPLICATION (self-hosted), or GRANT rds_replication TO {} (RDS/Aurora)",
                quote_identifier(&role.name),
                quote_identifier(&role.name)
            ),
        });
    }
    Ok(())
}

/// Decides a table's key and whether publishing it is safe for the application: with
/// REPLICA IDENTITY DEFAULT and no primary key (or NOTHING), a published table's UPDATEs and
/// DELETEs start failing.
pub fn check_table(
    info: TableInfo,
    key_override: Vec<String>,
    problems: &mut Vec<Problem>,
) -> Option<CapturedTable> {
    let qualified = format!("{}.{}", info.schema, info.name);
    if !matches!(info.kind, 'r' | 'p') {
        problems.push(Problem {
            what: format!("{qualified} is not a table (relkind '{}')", info.kind),
            fix: format!("capture the underlying table instead of {qualified}"),
        });
        return None;
    }
    let unsafe_identity = match info.replica_identity {
        'n' => true,
        'd' => info.primary_key.is_empty(),
        _ => false,
    };
    if unsafe_identity {
        problems.push(Problem {
            what: format!(
                "{qualified} has no usable replica identity: once published, its UPDATEs and DELETEs would fail"
            ),
            fix: format!(
                "add a primary key, or ALTER TABLE {qualified} REPLICA IDENTITY FULL (and set tables.\"{qualified}\".key_columns)"
            ),
        });
        return None;
    }
    let key_columns = if key_override.is_empty() {
        info.primary_key.clone()
    } else {
        key_override
    };
    if key_columns.is_empty() {
        problems.push(Problem {
            what: format!("{qualified} has no primary key, so its events would have no key"),
            fix: format!(
                "add a primary key, or name unique NOT NULL columns in tables.\"{qualified}\".key_columns"
            ),
        });
        return None;
    }
    if !key_columns_are_usable(&info, &key_columns, problems) {
        return None;
    }
    Some(CapturedTable { info, key_columns })
}

/// The key columns exist, and a deleted row's old tuple carries them: PostgreSQL sends only
/// the replica identity's columns for it (all of them with FULL).
fn key_columns_are_usable(
    info: &TableInfo,
    key_columns: &[String],
    problems: &mut Vec<Problem>,
) -> bool {
    let qualified = format!("{}.{}", info.schema, info.name);
    let unknown: Vec<&str> = key_columns
        .iter()
        .filter(|column| !info.columns.contains(column))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        problems.push(Problem {
            what: format!(
                "tables.\"{qualified}\".key_columns names {} that {qualified} does not have",
                unknown.join(", ")
            ),
            fix: format!("name columns of the table: {}", info.columns.join(", ")),
        });
        return false;
    }
    let (identity, described) = match info.replica_identity {
        'f' => return true,
        'i' => (&info.identity_index, "its replica identity index"),
        _ => (
            &info.primary_key,
            "its primary key (replica identity DEFAULT)",
        ),
    };
    let outside: Vec<&str> = key_columns
        .iter()
        .filter(|column| !identity.contains(column))
        .map(String::as_str)
        .collect();
    if outside.is_empty() {
        return true;
    }
    problems.push(Problem {
        what: format!(
            "a deleted row of {qualified} would not carry its key column(s) {}: PostgreSQL sends only {described} ({}) for it",
            outside.join(", "),
            identity.join(", ")
        ),
        fix: format!(
            "ALTER TABLE {qualified} REPLICA IDENTITY FULL, or choose key_columns among {}",
            identity.join(", ")
        ),
    });
    false
}

pub async fn check_slot(
    catalog: &Catalog,
    config: &PostgresConfig,
    slot: Option<&SlotInfo>,
    database: &str,
    problems: &mut Vec<Problem>,
) -> Result<(), tokio_postgres::Error> {
    let name = &config.slot;
    match slot {
        Some(slot) => {
            if slot.database.as_deref() != Some(database) {
                problems.push(Problem {
                    what: format!(
                        "replication slot {name} belongs to database {}, not {database}",
                        slot.database.as_deref().unwrap_or("(none: a physical slot)")
                    ),
                    fix: format!("choose another postgres.slot, or drop that slot: SELECT pg_drop_replication_slot('{name}')"),
                });
            } else if slot.plugin.as_deref() != Some("pgoutput") {
                problems.push(Problem {
                    what: format!(
                        "replication slot {name} uses plugin {}, walsync needs pgoutput",
                        slot.plugin.as_deref().unwrap_or("(none)")
                    ),
                    fix: "choose another postgres.slot".into(),
                });
            } else if slot.wal_status.as_deref() == Some("lost") {
                problems.push(lost_slot(
                    name,
                    "its WAL was removed (wal_status = lost, max_slot_wal_keep_size exceeded)",
                ));
            }
        }
        None if !can_read_state(catalog).await? => problems.push(Problem {
            what: format!(
                "role {} cannot read walsync's own tables in schema walsync",
                catalog.role().await?.name
            ),
            fix: "GRANT USAGE ON SCHEMA walsync TO <role>; GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA walsync TO <role> \
                  (or run walsync with the role that ran its migrations)"
                .into(),
        }),
        None if used_before(catalog, name).await? && !config.recreate_lost_slot => {
            problems.push(lost_slot(
                name,
                "it existed when walsync last ran and is gone now (dropped, or lost in a failover)",
            ));
        }
        None => check_free_slots(catalog, problems).await?,
    }
    Ok(())
}

fn lost_slot(name: &str, what_happened: &str) -> Problem {
    Problem {
        what: format!("replication slot {name} cannot be resumed: {what_happened}; changes made since are not recoverable from the WAL"),
        fix: "set postgres.recreate_lost_slot = true to start a new slot, then backfill the tables \
              (walsync backfill <table>) so the index gets what was missed; see docs/runbook.md, \"A lost slot\""
            .into(),
    }
}

async fn check_free_slots(
    catalog: &Catalog,
    problems: &mut Vec<Problem>,
) -> Result<(), tokio_postgres::Error> {
    let max_slots: i64 = catalog
        .setting("max_replication_slots")
        .await?
        .parse()
        .unwrap_or(0);
    let used: i64 = catalog
        .client()
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await?
        .get(0);
    if used >= max_slots {
        problems.push(Problem {
            what: format!("all {max_slots} replication slots are in use"),
            fix: "raise max_replication_slots (restart needed) or drop an unused slot".into(),
        });
    }
    Ok(())
}

/// Whether walsync's schema is absent (nothing to read yet) or readable by this role.
async fn can_read_state(catalog: &Catalog) -> Result<bool, tokio_postgres::Error> {
    Ok(catalog
        .client()
        .query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'walsync')
                 OR has_schema_privilege('walsync', 'USAGE')",
            &[],
        )
        .await?
        .get(0))
}

async fn used_before(catalog: &Catalog, slot: &str) -> Result<bool, tokio_postgres::Error> {
    let state_exists: bool = catalog
        .client()
        .query_one(
            "SELECT to_regclass('walsync.source_state') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !state_exists {
        return Ok(false);
    }
    Ok(catalog
        .client()
        .query_opt(
            "SELECT 1 FROM walsync.source_state WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .is_some())
}

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The migrations this build carries, as (version, name), for `walsync check`.
pub fn known_migrations() -> Vec<(i64, String)> {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|migration| (i64::from(migration.version()), migration.name().to_owned()))
        .collect()
}

/// Applies walsync's pending migrations; returns the names of those applied.
pub async fn migrate(catalog: &mut Catalog) -> Result<Vec<String>, MigrateError> {
    // Two walsync processes starting at once (a source and a `verify`, two pipelines on one
    // database) would race to create the schema and apply the same migration; one would fail.
    // A session advisory lock makes them take turns; the second finds nothing to apply.
    catalog
        .client()
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(MigrateError::Lock)?;
    let result = apply_migrations(catalog).await;
    let unlocked = catalog
        .client()
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    let applied = result?;
    unlocked.map_err(MigrateError::Lock)?;
    Ok(applied)
}

/// The advisory lock key that serialises walsync's migrations in a database ("walsync" in
/// ASCII).
const MIGRATION_LOCK: i64 = 0x0077_616c_7379_6e63;

async fn apply_migrations(catalog: &mut Catalog) -> Result<Vec<String>, MigrateError> {
    catalog
        .client()
        .batch_execute("CREATE SCHEMA IF NOT EXISTS walsync")
        .await
        .map_err(MigrateError::Schema)?;
    // A newer walsync may have applied migrations this binary does not know (a rollback to
    // an older release): migrations only add, so the older binary can still run. A migration
    // that differs from the one applied under the same version still aborts.
    let mut runner = embedded::migrations::runner().set_abort_missing(false);
    let report = runner
        .set_migration_table_name("walsync.schema_history")
        .run_async(catalog.client_mut())
        .await
        .map_err(|error| MigrateError::Run(error.to_string()))?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|migration| migration.to_string())
        .collect())
}

/// Records that walsync uses `slot`, so its disappearance is noticed later.
pub async fn record_slot(
    catalog: &Catalog,
    slot: &str,
    system_id: &str,
    database: &str,
) -> Result<(), tokio_postgres::Error> {
    catalog
        .client()
        .execute(
            "INSERT INTO walsync.source_state (slot_name, system_id, database_name) VALUES ($1, $2, $3)
             ON CONFLICT (slot_name) DO UPDATE SET last_started_at = now(), system_id = excluded.system_id",
            &[&slot, &system_id, &database],
        )
        .await?;
    Ok(())
}

/// Creates the publication, or adds configured tables missing from it. Tables published but
/// no longer configured are removed only when `prune` is set. Partitioned tables publish
/// through their root.
pub async fn reconcile_publication(
    catalog: &Catalog,
    publication: &str,
    tables: &[CapturedTable],
    prune: bool,
) -> Result<(), tokio_postgres::Error> {
    let wanted: Vec<(String, String)> = tables
        .iter()
        .map(|table| (table.info.schema.clone(), table.info.name.clone()))
        .collect();
    let list = |tables: &[(String, String)]| {
        tables
            .iter()
            .map(|(schema, table)| {
                format!("{}.{}", quote_identifier(schema), quote_identifier(table))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match catalog.publication_tables(publication).await? {
        None => {
            let sql = format!(
                "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
                quote_identifier(publication),
                list(&wanted)
            );
            tracing::info!(%publication, tables = wanted.len(), "creating publication");
            catalog.client().batch_execute(&sql).await?;
        }
        Some(published) => {
            let missing: Vec<_> = wanted
                .iter()
                .filter(|t| !published.contains(t))
                .cloned()
                .collect();
            if !missing.is_empty() {
                tracing::info!(%publication, tables = %list(&missing), "adding tables to the publication");
                let sql = format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    quote_identifier(publication),
                    list(&missing)
                );
                catalog.client().batch_execute(&sql).await?;
            }
            let extra: Vec<_> = published
                .iter()
                .filter(|t| !wanted.contains(t))
                .cloned()
                .collect();
            if !extra.is_empty() && prune {
                tracing::info!(%publication, tables = %list(&extra), "removing unconfigured tables from the publication");
                let sql = format!(
                    "ALTER PUBLICATION {} DROP TABLE {}",
                    quote_identifier(publication),
                    list(&extra)
                );
                catalog.client().batch_execute(&sql).await?;
            } else if !extra.is_empty() {
                tracing::warn!(%publication, tables = %list(&extra),
                    "the publication has tables walsync is not configured for; their changes are ignored (set postgres.prune_publication to remove them)");
            }
        }
    }
    Ok(())
}

/// One heartbeat: a tiny transaction in the source database.
pub async fn heartbeat(catalog: &Catalog, slot: &str) -> Result<(), tokio_postgres::Error> {
    catalog
        .client()
        .execute(
            "INSERT INTO walsync.heartbeat (slot_name, beat_at) VALUES ($1, now())
             ON CONFLICT (slot_name) DO UPDATE SET beat_at = now(), beats = walsync.heartbeat.beats + 1",
            &[&slot],
        )
        .await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "cannot create schema walsync: {0}; walsync's role needs CREATE on the database (GRANT CREATE ON DATABASE … TO …)"
    )]
    Schema(tokio_postgres::Error),
    #[error("migrations failed: {0}")]
    Run(String),
    #[error("cannot take or release the migration lock (pg_advisory_lock): {0}")]
    Lock(tokio_postgres::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(kind: char, identity: char, primary_key: &[&str]) -> TableInfo {
        TableInfo {
            schema: "public".into(),
            name: "t".into(),
            oid: 1,
            kind,
            primary_key: primary_key.iter().map(|c| c.to_string()).collect(),
            replica_identity: identity,
            columns: ["id", "shop", "sku", "note"].map(String::from).to_vec(),
            identity_index: Vec::new(),
        }
    }

    #[test]
    fn key_columns_the_table_does_not_have_are_refused() {
        let mut problems = Vec::new();
        assert!(check_table(info('r', 'f', &[]), vec!["ident".into()], &mut problems).is_none());
        assert!(problems[0].what.contains("ident"), "{}", problems[0]);
        assert!(
            problems[0].fix.contains("id, shop, sku, note"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn key_columns_outside_the_replica_identity_are_refused() {
        // Default identity: deletes carry the primary key only.
        let mut problems = Vec::new();
        assert!(check_table(info('r', 'd', &["id"]), vec!["sku".into()], &mut problems).is_none());
        assert!(problems[0].what.contains("sku"), "{}", problems[0]);
        assert!(
            problems[0].fix.contains("REPLICA IDENTITY FULL"),
            "{}",
            problems[0]
        );
        // Identity index: deletes carry the index's columns.
        let mut by_index = info('r', 'i', &[]);
        by_index.identity_index = vec!["shop".into(), "sku".into()];
        let mut problems = Vec::new();
        assert!(check_table(by_index.clone(), vec!["id".into()], &mut problems).is_none());
        let mut problems = Vec::new();
        let captured = check_table(by_index, vec!["sku".into(), "shop".into()], &mut problems);
        assert_eq!(captured.unwrap().key_columns, ["sku", "shop"]);
    }

    #[test]
    fn a_table_with_a_primary_key_is_captured_by_it() {
        let mut problems = Vec::new();
        let captured =
            check_table(info('r', 'd', &["shop", "sku"]), vec![], &mut problems).unwrap();
        assert_eq!(captured.key_columns, ["shop", "sku"]);
        assert!(problems.is_empty());
    }

    #[test]
    fn a_table_without_primary_key_and_default_identity_is_refused_with_the_fix() {
        let mut problems = Vec::new();
        assert!(check_table(info('r', 'd', &[]), vec!["id".into()], &mut problems).is_none());
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].fix.contains("REPLICA IDENTITY FULL"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn replica_identity_full_with_configured_key_columns_is_accepted() {
        let mut problems = Vec::new();
        let captured = check_table(info('r', 'f', &[]), vec!["id".into()], &mut problems).unwrap();
        assert_eq!(captured.key_columns, ["id"]);
    }

    #[test]
    fn replica_identity_full_without_any_key_is_refused() {
        let mut problems = Vec::new();
        assert!(check_table(info('r', 'f', &[]), vec![], &mut problems).is_none());
        assert!(problems[0].fix.contains("key_columns"));
    }

    #[test]
    fn replica_identity_nothing_is_refused_even_with_a_primary_key() {
        let mut problems = Vec::new();
        assert!(check_table(info('r', 'n', &["id"]), vec![], &mut problems).is_none());
    }

    #[test]
    fn views_are_refused() {
        let mut problems = Vec::new();
        assert!(check_table(info('v', 'd', &[]), vec![], &mut problems).is_none());
    }

    #[test]
    fn table_names_default_to_public() {
        assert_eq!(
            split_table_name("products"),
            ("public".into(), "products".into())
        );
        assert_eq!(
            split_table_name("sales.orders"),
            ("sales".into(), "orders".into())
        );
    }
}
