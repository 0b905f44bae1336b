//! `walsync slot status` and `walsync slot drop`: the operator's view of walsync's replication
//! slot, and its removal.
//!
//! Status reads `pg_replication_slots` and the slot's walsender in `pg_stat_replication`. The
//! lag in bytes is exact (LSN differences); the lag in time is the walsender's `flush_lag`
//! (how long ago the WAL that walsync last confirmed was written; walsync confirms a
//! transaction only once Kafka has it): walsync's own tables record no commit times, so
//! there is nothing more precise to read. With no walsender there is no time lag to show.
//!
//! Drop is behind `--yes`, refuses while a walsender uses the slot, and clears walsync's rows
//! for the slot (`walsync.snapshot_progress`, `walsync.source_state`, `walsync.heartbeat`), so
//! the next start creates a new slot and copies every table again instead of refusing to
//! start ("the slot walsync used is gone").

use std::process::ExitCode;

use anyhow::Context;

use crate::config::Config;
use crate::postgres::catalog::Catalog;
use crate::postgres::replication::quote_literal;

/// walsync's tables that hold per-slot rows, cleared when the slot is dropped.
const SLOT_TABLES: &[&str] = &[
    "walsync.snapshot_progress",
    "walsync.source_state",
    "walsync.heartbeat",
];

async fn connect(config: &Config) -> anyhow::Result<Catalog> {
    let params = crate::postgres::replication::ConnectParams::from_config(config)?;
    Catalog::connect(&params).await.with_context(|| {
        format!(
            "cannot connect to PostgreSQL at {}:{} as {}",
            params.host, params.port, params.user
        )
    })
}

/// Prints the slot's position, health and lag; exit code 1 when the slot does not exist.
pub async fn status(config: &Config) -> anyhow::Result<ExitCode> {
    let catalog = connect(config).await?;
    let name = &config.postgres.slot;
    let row = catalog
        .client()
        .query_opt(
            "SELECT s.database::text, s.plugin::text, s.temporary, s.active_pid,
                    s.confirmed_flush_lsn::text, s.restart_lsn::text, s.wal_status, s.safe_wal_size,
                    w.current::text,
                    pg_wal_lsn_diff(w.current, s.confirmed_flush_lsn)::bigint,
                    pg_wal_lsn_diff(w.current, s.restart_lsn)::bigint,
                    r.write_lag::text, r.flush_lag::text, r.state, r.application_name::text
             FROM pg_replication_slots s
             CROSS JOIN (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                                     ELSE pg_current_wal_lsn() END AS current) w
             LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
             WHERE s.slot_name = $1",
            &[name],
        )
        .await
        .context("cannot read pg_replication_slots")?;
    let Some(row) = row else {
        println!(
            "slot {name} does not exist (walsync creates it at its first start; if walsync ran \
             before, the slot was dropped or lost: see docs/runbook.md, \"A lost slot\")"
        );
        return Ok(ExitCode::from(1));
    };
    let text = |index: usize| -> String {
        row.get::<_, Option<String>>(index)
            .unwrap_or_else(|| "-".into())
    };
    let temporary: bool = row.get(2);
    let active_pid: Option<i32> = row.get(3);
    let safe_wal_size: Option<i64> = row.get(7);
    let unconfirmed: Option<i64> = row.get(9);
    let retained: Option<i64> = row.get(10);
    println!(
        "slot {name} (database {}, plugin {}{})",
        text(0),
        text(1),
        if temporary { ", temporary" } else { "" }
    );
    println!(
        "  active pid:          {}",
        active_pid.map_or_else(
            || "none (no walsender uses the slot: walsync is not streaming)".into(),
            |pid| format!("{pid} ({}, {})", text(14), text(13))
        )
    );
    println!("  confirmed_flush_lsn: {}", text(4));
    println!("  restart_lsn:         {}", text(5));
    println!(
        "  wal_status:          {}{}",
        text(6),
        safe_wal_size.map_or_else(String::new, |bytes| format!(
            " ({} more before max_slot_wal_keep_size invalidates the slot)",
            bytes_text(bytes)
        ))
    );
    println!("  current WAL:         {}", text(8));
    println!(
        "  lag (bytes):         {} not yet confirmed (current WAL − confirmed_flush_lsn); \
         {} retained for the slot (current WAL − restart_lsn)",
        unconfirmed.map_or_else(|| "-".into(), bytes_text),
        retained.map_or_else(|| "-".into(), bytes_text),
    );
    let time_lag = match (active_pid, row.get::<_, Option<String>>(12)) {
        (None, _) => "unknown: no walsender".to_owned(),
        (Some(_), None) => {
            "none measured (pg_stat_replication.flush_lag is empty: the walsender is caught up)"
                .to_owned()
        }
        (Some(_), Some(flush_lag)) => format!(
            "{flush_lag} (pg_stat_replication.flush_lag: age of the WAL walsync last confirmed \
             as in Kafka; write_lag {})",
            text(11)
        ),
    };
    println!("  lag (time):          {time_lag}");
    if text(6) == "lost" {
        println!(
            "  the slot is LOST: its WAL was removed; it cannot be resumed. Drop it \
             (walsync slot drop --yes) and start walsync again: a new slot and a full copy"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn bytes_text(bytes: i64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes.unsigned_abs() < 1024 * 1024 {
        format!("{bytes} bytes")
    } else {
        format!("{bytes} bytes ({:.1} MiB)", bytes as f64 / MIB)
    }
}

/// Drops the slot and walsync's records of it; refuses without `yes` or while it is in use.
pub async fn drop_slot(config: &Config, yes: bool) -> anyhow::Result<ExitCode> {
    let name = &config.postgres.slot;
    if !yes {
        println!(
            "refusing to drop slot {name} without --yes. Dropping it means:\n\
             - PostgreSQL no longer holds WAL for walsync: changes made from now until a new \
               slot exists are not streamed;\n\
             - walsync's records of the slot are cleared (walsync.snapshot_progress, \
               walsync.source_state, walsync.heartbeat), so the next start creates a new slot \
               and copies every table again (the index converges: snapshot rows are versioned \
               below the new slot's consistent point);\n\
             - stop walsync first; a running source cannot continue without its slot.\n\
             Run: walsync slot drop --yes"
        );
        return Ok(ExitCode::from(1));
    }
    let catalog = connect(config).await?;
    match catalog.slot(name).await? {
        Some(slot) if slot.active_pid.is_some() => {
            let pid = slot.active_pid.unwrap_or_default();
            println!(
                "refusing to drop slot {name}: walsender pid {pid} is using it. Stop walsync \
                 first (SIGTERM); if the walsender stays, end it as a superuser or the slot's \
                 role: SELECT pg_terminate_backend({pid}); then run this again"
            );
            return Ok(ExitCode::from(1));
        }
        Some(_) => {
            catalog
                .client()
                .execute("SELECT pg_drop_replication_slot($1)", &[name])
                .await
                .with_context(|| {
                    format!("cannot drop slot {name} (it may have become active meanwhile)")
                })?;
            println!("dropped slot {name}: PostgreSQL no longer holds WAL for it");
        }
        None => println!("slot {name} does not exist; clearing walsync's records of it"),
    }
    clear_slot_records(&catalog, name).await?;
    println!("the next start of walsync creates a new slot {name} and copies every table again");
    Ok(ExitCode::SUCCESS)
}

/// Deletes the slot's rows from walsync's tables (those that exist).
async fn clear_slot_records(catalog: &Catalog, slot: &str) -> anyhow::Result<()> {
    for table in SLOT_TABLES {
        let exists: bool = catalog
            .client()
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[table])
            .await?
            .get(0);
        if !exists {
            continue;
        }
        let deleted = catalog
            .client()
            .execute(
                &format!("DELETE FROM {table} WHERE slot_name = $1"),
                &[&slot],
            )
            .await
            .with_context(|| {
                format!(
                    "cannot clear {table}; run as its owner: DELETE FROM {table} WHERE slot_name = {}",
                    quote_literal(slot)
                )
            })?;
        println!("cleared {deleted} row(s) of {table}");
    }
    Ok(())
}
