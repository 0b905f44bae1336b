//! The type codec: Postgres text-format values to JSON, by type OID.
//!
//! One codec for streaming and snapshots, with pinned session settings, so a value never
//! differs between the two paths. Numbers keep their precision, timestamps are UTC ISO 8601,
//! bytea is base64, and any type it does not know passes through as Postgres's text form.
