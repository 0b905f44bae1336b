-- Which tables' initial copies are complete, per slot, so a restart copies only what is left
-- and never silently skips a table.
CREATE TABLE IF NOT EXISTS walsync.snapshot_progress (
    slot_name        text NOT NULL,
    table_name       text NOT NULL,
    -- The consistent point of the snapshot the rows were read under; rows carry cp − 1.
    consistent_point text NOT NULL,
    rows_copied      bigint NOT NULL,
    completed_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot_name, table_name)
);
