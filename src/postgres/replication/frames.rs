//! Pure framing for the replication protocol: splitting backend frames, the CopyBoth payloads
//! (XLogData and primary keepalives), standby status updates, and server errors.
//!
//! `postgres-protocol`'s backend parser does not know CopyBothResponse (`W`), which is exactly
//! the frame START_REPLICATION answers with, so frames are split here first and only the
//! frames it knows are handed to it.

use crate::retry::Disposition;
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::lsn::Lsn;

/// Microseconds between the Unix epoch and the PostgreSQL epoch (2000-01-01 UTC).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// One backend frame: its tag and its body (without the length word).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

/// Splits the next complete frame off the front of `buffer`, or returns `None` when more bytes
/// are needed.
pub fn split_frame(buffer: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buffer.len() < 5 {
        return Ok(None);
    }
    let tag = buffer[0];
    let length = i32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]);
    let length = usize::try_from(length)
        .ok()
        .filter(|length| *length >= 4)
        .ok_or(FrameError::BadLength { tag, length })?;
    let total = length + 1;
    if buffer.len() < total {
        buffer.reserve(total - buffer.len());
        return Ok(None);
    }
    let mut frame = buffer.split_to(total);
    frame.advance(5);
    Ok(Some(Frame {
        tag,
        body: frame.freeze(),
    }))
}

/// What a CopyData frame of the replication stream carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// WAL data: one pgoutput message starting at `wal_start`.
    XLogData {
        wal_start: Lsn,
        /// The server's current end of WAL: informational, never safe to confirm.
        wal_end: Lsn,
        data: Bytes,
    },
    /// The walsender's position (everything before it has been sent) and whether it wants an
    /// immediate status update.
    Keepalive { wal_end: Lsn, reply_requested: bool },
}

/// Parses the payload of a CopyData frame received during streaming.
pub fn parse_copy_data(mut payload: Bytes) -> Result<ReplicationMessage, FrameError> {
    if payload.is_empty() {
        return Err(FrameError::EmptyCopyData);
    }
    match payload.get_u8() {
        b'w' => {
            need(&payload, 24, "XLogData header")?;
            let wal_start = Lsn(payload.get_u64());
            let wal_end = Lsn(payload.get_u64());
            let _send_time = payload.get_i64();
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                data: payload,
            })
        }
        b'k' => {
            need(&payload, 17, "primary keepalive")?;
            let wal_end = Lsn(payload.get_u64());
            let _send_time = payload.get_i64();
            let reply_requested = payload.get_u8() == 1;
            Ok(ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
            })
        }
        other => Err(FrameError::UnknownCopyData { tag: other }),
    }
}

fn need(payload: &Bytes, bytes: usize, what: &'static str) -> Result<(), FrameError> {
    if payload.len() < bytes {
        return Err(FrameError::Truncated { what });
    }
    Ok(())
}

/// The standby status update the client sends: received, flushed and applied positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusUpdate {
    /// The newest position received.
    pub written: Lsn,
    /// The position below which everything is durable downstream: the confirmed LSN.
    pub flushed: Lsn,
    pub applied: Lsn,
    pub reply_requested: bool,
}

impl StatusUpdate {
    /// Writes the update as a complete CopyData frame.
    pub fn encode(&self, now_unix_micros: i64, out: &mut BytesMut) {
        out.reserve(1 + 4 + 34);
        out.put_u8(b'd');
        out.put_i32(4 + 34);
        out.put_u8(b'r');
        out.put_u64(self.written.0);
        out.put_u64(self.flushed.0);
        out.put_u64(self.applied.0);
        out.put_i64(now_unix_micros.saturating_sub(PG_EPOCH_OFFSET_MICROS));
        out.put_u8(u8::from(self.reply_requested));
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("the server sent a frame '{}' with an impossible length {length}", char::from(*tag))]
    BadLength { tag: u8, length: i32 },
    #[error("the server sent an empty CopyData frame")]
    EmptyCopyData,
    #[error("the server sent a CopyData frame of unknown kind '{}'", char::from(*tag))]
    UnknownCopyData { tag: u8 },
    #[error("the server sent a truncated {what}")]
    Truncated { what: &'static str },
}

/// A server error, with its SQLSTATE kept so callers can decide what to do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ServerError {
    /// Builds the error from the (type, value) fields of an ErrorResponse.
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (u8, &'a [u8])>) -> Self {
        let mut error = ServerError::default();
        for (kind, value) in fields {
            let value = String::from_utf8_lossy(value).into_owned();
            match kind {
                b'V' => error.severity = value,
                b'S' if error.severity.is_empty() => error.severity = value,
                b'C' => error.code = value,
                b'M' => error.message = value,
                b'D' => error.detail = Some(value),
                b'H' => error.hint = Some(value),
                _ => {}
            }
        }
        error
    }

    /// What to do about it: the one PostgreSQL rule, by SQLSTATE
    /// ([`crate::postgres::sqlstate_disposition`]).
    pub fn disposition(&self) -> Disposition {
        crate::postgres::sqlstate_disposition(&self.code)
    }
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, " (detail: {detail})")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn splits_complete_frames_and_waits_for_partial_ones() {
        let mut wire = frame(b'W', &[0, 0, 0]);
        wire.extend(frame(b'd', b"kxyz"));
        let mut buffer = BytesMut::from(&wire[..wire.len() - 1]);

        let first = split_frame(&mut buffer).unwrap().unwrap();
        assert_eq!(first.tag, b'W');
        assert_eq!(&first.body[..], &[0, 0, 0]);
        assert_eq!(split_frame(&mut buffer).unwrap(), None, "last byte missing");

        buffer.extend_from_slice(&wire[wire.len() - 1..]);
        let second = split_frame(&mut buffer).unwrap().unwrap();
        assert_eq!((second.tag, &second.body[..]), (b'd', &b"kxyz"[..]));
        assert!(buffer.is_empty());
    }

    #[test]
    fn rejects_a_length_shorter_than_the_length_word() {
        let mut buffer = BytesMut::from(&[b'd', 0, 0, 0, 3][..]);
        assert_eq!(
            split_frame(&mut buffer),
            Err(FrameError::BadLength {
                tag: b'd',
                length: 3
            })
        );
    }

    #[test]
    fn parses_xlogdata() {
        let mut payload = vec![b'w'];
        payload.extend(0x16_0000_0100_u64.to_be_bytes());
        payload.extend(0x16_0000_0200_u64.to_be_bytes());
        payload.extend(7_i64.to_be_bytes());
        payload.extend(b"B...");
        let parsed = parse_copy_data(Bytes::from(payload)).unwrap();
        assert_eq!(
            parsed,
            ReplicationMessage::XLogData {
                wal_start: Lsn(0x16_0000_0100),
                wal_end: Lsn(0x16_0000_0200),
                data: Bytes::from_static(b"B..."),
            }
        );
    }

    #[test]
    fn parses_keepalive_with_and_without_reply_request() {
        for (flag, expected) in [(0_u8, false), (1, true)] {
            let mut payload = vec![b'k'];
            payload.extend(42_u64.to_be_bytes());
            payload.extend(0_i64.to_be_bytes());
            payload.push(flag);
            assert_eq!(
                parse_copy_data(Bytes::from(payload)).unwrap(),
                ReplicationMessage::Keepalive {
                    wal_end: Lsn(42),
                    reply_requested: expected
                }
            );
        }
    }

    #[test]
    fn truncated_or_unknown_payloads_are_errors() {
        assert!(parse_copy_data(Bytes::from_static(b"w123")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"k")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"")).is_err());
        assert_eq!(
            parse_copy_data(Bytes::from_static(b"z")),
            Err(FrameError::UnknownCopyData { tag: b'z' })
        );
    }

    #[test]
    fn encodes_a_status_update_as_postgres_expects() {
        let update = StatusUpdate {
            written: Lsn(0x30),
            flushed: Lsn(0x20),
            applied: Lsn(0x20),
            reply_requested: true,
        };
        let mut out = BytesMut::new();
        update.encode(PG_EPOCH_OFFSET_MICROS + 5, &mut out);
        assert_eq!(out.len(), 39);
        assert_eq!(&out[..6], &[b'd', 0, 0, 0, 38, b'r']);
        assert_eq!(&out[6..14], &0x30_u64.to_be_bytes());
        assert_eq!(&out[14..22], &0x20_u64.to_be_bytes());
        assert_eq!(&out[22..30], &0x20_u64.to_be_bytes());
        assert_eq!(
            &out[30..38],
            &5_i64.to_be_bytes(),
            "microseconds since 2000-01-01"
        );
        assert_eq!(out[38], 1);
    }

    #[test]
    fn classifies_server_errors_by_sqlstate() {
        let error = |code: &str| ServerError {
            code: code.into(),
            ..ServerError::default()
        };
        assert_eq!(
            error("55006").disposition(),
            Disposition::Retry,
            "slot in use"
        );
        assert_eq!(
            error("57P01").disposition(),
            Disposition::Retry,
            "admin shutdown"
        );
        assert_eq!(error("08006").disposition(), Disposition::Retry);
        assert_eq!(
            error("42704").disposition(),
            Disposition::Stop,
            "missing slot"
        );
        assert_eq!(error("42501").disposition(), Disposition::Stop, "privilege");
        assert_eq!(
            error("28P01").disposition(),
            Disposition::Stop,
            "wrong password"
        );
    }

    #[test]
    fn builds_server_errors_from_fields() {
        let fields: [(u8, &[u8]); 5] = [
            (b'S', b"ERREUR"),
            (b'V', b"ERROR"),
            (b'C', b"42704"),
            (b'M', b"replication slot \"s\" does not exist"),
            (b'H', b"create it"),
        ];
        let error = ServerError::from_fields(fields);
        assert_eq!(error.severity, "ERROR", "the untranslated severity wins");
        assert_eq!(
            error.to_string(),
            "ERROR 42704: replication slot \"s\" does not exist (hint: create it)"
        );
    }
}
