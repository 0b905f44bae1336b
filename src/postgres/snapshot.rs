//! Snapshots: the initial copy of each table as of a slot's consistent point `cp`, and online
//! backfills. Snapshot rows are versioned at `cp − 1`, so any streamed change to the same row
//! wins whatever the arrival order, and copying can run while streaming continues.
