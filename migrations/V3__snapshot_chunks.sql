-- The chunk plan of each table's initial copy and which chunks Kafka has acknowledged, per
-- slot, so a copy interrupted by a crash resumes with the chunks that are left (under a new
-- snapshot) instead of starting over. A table is recorded in walsync.snapshot_progress once
-- all its chunks are complete.
CREATE TABLE IF NOT EXISTS walsync.snapshot_chunks (
    slot_name        text NOT NULL,
    table_name       text NOT NULL,
    chunk_no         integer NOT NULL,
    -- Heap blocks [start_block, end_block) of the table; end_block NULL = to the end.
    start_block      bigint NOT NULL,
    end_block        bigint,
    -- The table's storage when the plan was made: a rewrite (VACUUM FULL, CLUSTER, TRUNCATE)
    -- moves rows between blocks, so a plan for other storage is made again from scratch.
    relfilenode      bigint NOT NULL,
    -- Set once Kafka acknowledged every row of the chunk: the consistent point of the
    -- snapshot it was read under (its rows carry cp − 1) and how many rows it had.
    consistent_point text,
    rows             bigint,
    completed_at     timestamptz,
    PRIMARY KEY (slot_name, table_name, chunk_no)
);
