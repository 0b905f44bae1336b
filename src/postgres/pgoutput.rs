//! Decoder for the pgoutput logical decoding protocol (version 1, with `messages 'true'`).
//!
//! Pure code: bytes in, typed messages out, never a panic on malformed input. Rows are decoded
//! by the Relation message in force at that point of the stream, never by today's catalog, so
//! schema changes mid-stream are handled in order.
