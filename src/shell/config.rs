//! Configuration: `walsync.toml` layered with `WALSYNC_<SECTION>__<KEY>` environment variables,
//! unknown keys rejected by name, secrets read from the environment or files.
