//! Replication slots, publications and walsync's own objects in the source database.
//!
//! Owns the preflight checks (`wal_level`, privileges, primary keys, replica identity, slot
//! health), publication reconciliation, and the rule that a slot walsync used before is never
//! silently recreated.
