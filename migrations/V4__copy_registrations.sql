-- Copies that run in another process than the source (`walsync backfill`) register here, so
-- the source streaming the slot marks the table's deletes for soft tombstones while they run
-- and writes the copy_completed control records when they end (design invariant 5,
-- src/postgres/copy_registry.rs). The owner holds a session advisory lock on the row's id for
-- as long as it runs; a registration whose lock is free has lost its owner.
CREATE TABLE IF NOT EXISTS walsync.copy_registrations (
    id               serial PRIMARY KEY,
    slot_name        text NOT NULL,
    schema_name      text NOT NULL,
    table_name       text NOT NULL,
    topic            text NOT NULL,
    -- requested (by the copy) → registered (the source marks deletes) → copied (every row in
    -- Kafka; consistent_point set) → completed (the source wrote the control records).
    state            text NOT NULL DEFAULT 'requested'
                     CHECK (state IN ('requested', 'registered', 'copied', 'completed')),
    consistent_point text,
    requested_at     timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS copy_registrations_slot ON walsync.copy_registrations (slot_name);
