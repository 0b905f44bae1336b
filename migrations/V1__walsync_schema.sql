-- walsync's own objects in the source database. The schema itself is created before the
-- migrations run (CREATE SCHEMA IF NOT EXISTS walsync), because the migration history lives in it.

-- Which slots walsync has used, so a slot that disappears is noticed instead of silently
-- recreated (a recreated slot would skip every change made while it was gone).
CREATE TABLE IF NOT EXISTS walsync.source_state (
    slot_name       text PRIMARY KEY,
    system_id       text NOT NULL,
    database_name   text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_started_at timestamptz NOT NULL DEFAULT now()
);

-- The transactional heartbeat: an upsert on an interval, so the slot always has recent WAL
-- of this database to confirm.
CREATE TABLE IF NOT EXISTS walsync.heartbeat (
    slot_name text PRIMARY KEY,
    beat_at   timestamptz NOT NULL,
    beats     bigint NOT NULL DEFAULT 1
);
