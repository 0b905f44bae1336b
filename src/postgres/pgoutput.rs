//! Decoder for the pgoutput logical decoding protocol (version 1, with `messages 'true'`).
//!
//! Pure code: bytes in, typed messages out, never a panic on malformed input. Rows are decoded
//! by the Relation message in force at that point of the stream, never by today's catalog, so
//! schema changes mid-stream are handled in order.
//!
//! [`decode`] turns the payload of one XLogData frame into a [`LogicalMessage`]. Column values
//! are zero-copy slices of that payload. [`Relations`] keeps the Relation messages seen so far
//! and matches tuples against them.
//!
//! The decoder is strict: an unknown tag, a negative length or count, an unknown flag bit, a
//! byte where the protocol allows only a few, invalid UTF-8 in a name, or bytes left over after
//! a complete message are all a [`DecodeError`] naming the message, the field and the byte
//! offset. Guessing past any of these would risk publishing rows under the wrong columns.
//!
//! Text-format column values are kept as raw bytes; the type codec (`postgres::types`) decides
//! what they mean.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use crate::lsn::Lsn;

/// Seconds between the Unix epoch and the PostgreSQL epoch (2000-01-01 00:00:00 UTC).
const PG_EPOCH_UNIX_SECONDS: i64 = 946_684_800;

/// Converts a pgoutput timestamp (microseconds since 2000-01-01 UTC) to milliseconds since the
/// Unix epoch. Rounds towards negative infinity, so instants before an epoch still land in the
/// millisecond that contains them. Never overflows, even for Postgres's `infinity` timestamps
/// (`i64::MAX` / `i64::MIN`): dividing first leaves room for the offset, and the addition
/// saturates regardless.
pub fn pg_epoch_micros_to_unix_millis(pg_epoch_micros: i64) -> i64 {
    pg_epoch_micros
        .div_euclid(1_000)
        .saturating_add(PG_EPOCH_UNIX_SECONDS.saturating_mul(1_000))
}

// ---------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeMessage),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalDecodingMessage),
}

impl LogicalMessage {
    pub fn kind(&self) -> MessageKind {
        match self {
            LogicalMessage::Begin(_) => MessageKind::Begin,
            LogicalMessage::Commit(_) => MessageKind::Commit,
            LogicalMessage::Origin(_) => MessageKind::Origin,
            LogicalMessage::Relation(_) => MessageKind::Relation,
            LogicalMessage::Type(_) => MessageKind::Type,
            LogicalMessage::Insert(_) => MessageKind::Insert,
            LogicalMessage::Update(_) => MessageKind::Update,
            LogicalMessage::Delete(_) => MessageKind::Delete,
            LogicalMessage::Truncate(_) => MessageKind::Truncate,
            LogicalMessage::Message(_) => MessageKind::Message,
        }
    }
}

/// The kinds of message protocol version 1 sends, named by their tag byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    Begin,
    Commit,
    Origin,
    Relation,
    Type,
    Insert,
    Update,
    Delete,
    Truncate,
    Message,
}

impl MessageKind {
    fn from_tag(tag: u8) -> Option<Self> {
        Some(match tag {
            b'B' => MessageKind::Begin,
            b'C' => MessageKind::Commit,
            b'O' => MessageKind::Origin,
            b'R' => MessageKind::Relation,
            b'Y' => MessageKind::Type,
            b'I' => MessageKind::Insert,
            b'U' => MessageKind::Update,
            b'D' => MessageKind::Delete,
            b'T' => MessageKind::Truncate,
            b'M' => MessageKind::Message,
            _ => return None,
        })
    }

    pub fn tag(self) -> u8 {
        match self {
            MessageKind::Begin => b'B',
            MessageKind::Commit => b'C',
            MessageKind::Origin => b'O',
            MessageKind::Relation => b'R',
            MessageKind::Type => b'Y',
            MessageKind::Insert => b'I',
            MessageKind::Update => b'U',
            MessageKind::Delete => b'D',
            MessageKind::Truncate => b'T',
            MessageKind::Message => b'M',
        }
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?} ('{}')", char::from(self.tag()))
    }
}

/// Start of a transaction. Every row message up to the matching [`Commit`] belongs to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the transaction's commit record: the version of every row in it.
    pub final_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC; see [`pg_epoch_micros_to_unix_millis`].
    pub commit_time_micros: i64,
    pub xid: u32,
}

/// End of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Currently unused by Postgres (always 0); kept as sent.
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// The end of the commit record: the position to confirm once the transaction is durable.
    pub end_lsn: Lsn,
    pub commit_time_micros: i64,
}

/// The transaction was replicated into this server from another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub commit_lsn: Lsn,
    pub name: String,
}

/// The shape of a table, sent before the first row of it in a session and again whenever it
/// changes. Row messages carry only the relation OID; this is how their columns get names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    /// The schema. On the wire an empty string stands for `pg_catalog`; it is decoded as
    /// `"pg_catalog"` so consumers never see the abbreviation.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    /// Only the columns that travel in tuples (no dropped columns), in tuple order.
    pub columns: Vec<Column>,
}

/// `pg_class.relreplident`: which old values an UPDATE or DELETE carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `'d'`: the primary key, if there is one.
    Default,
    /// `'n'`: nothing; updates and deletes carry no old values.
    Nothing,
    /// `'f'`: every column.
    Full,
    /// `'i'`: the columns of a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    fn from_setting(setting: u8) -> Option<Self> {
        Some(match setting {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity: the message key of the row's events.
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod`, e.g. the length of a `varchar(n)`; -1 when the type has none.
    pub type_modifier: i32,
}

/// A non-builtin type used by a following Relation message, so its OID can be named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMessage {
    pub oid: u32,
    /// The schema; an empty string on the wire is decoded as `"pg_catalog"`, as for Relation.
    pub namespace: String,
    pub name: String,
}

/// The column values of one row, in the order of the Relation's columns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<TupleValue>);

impl Tuple {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    /// A TOASTed value the statement did not change, so it did not travel: the consumer must
    /// keep whatever value it already has for this column.
    UnchangedToast,
    /// Text format (Postgres's output function), undecoded; not guaranteed to be UTF-8 here.
    Text(Bytes),
    /// Binary format (the type's send function); only sent when `binary 'true'` is requested.
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub relation_oid: u32,
    pub new: Tuple,
}

/// The old values an UPDATE or DELETE carries, depending on the replica identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `'K'`: the replica identity columns; the other columns are sent as NULL.
    Key(Tuple),
    /// `'O'`: the whole old row (replica identity FULL).
    Full(Tuple),
}

impl OldTuple {
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(tuple) | OldTuple::Full(tuple) => tuple,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub relation_oid: u32,
    /// Absent when the replica identity did not change (DEFAULT/INDEX) or is NOTHING.
    pub old: Option<OldTuple>,
    pub new: Tuple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub relation_oid: u32,
    pub old: OldTuple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    pub cascade: bool,
    pub restart_identity: bool,
    pub relation_oids: Vec<u32>,
}

/// A message written with `pg_logical_emit_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalDecodingMessage {
    /// Transactional messages arrive between Begin and Commit; the others arrive on their own,
    /// as soon as they are written, whether or not the writing transaction commits.
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Where in a message a field sits: its name, and for repeated fields which item it belongs
/// to (column 3, relation 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    /// The kind of repeated item and its zero-based index.
    pub item: Option<(&'static str, usize)>,
}

impl Field {
    const fn named(name: &'static str) -> Self {
        Field { name, item: None }
    }

    const fn of_column(name: &'static str, column: usize) -> Self {
        Field {
            name,
            item: Some(("column", column)),
        }
    }

    const fn of_relation(name: &'static str, relation: usize) -> Self {
        Field {
            name,
            item: Some(("relation", relation)),
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.item {
            Some((item, index)) => write!(f, "{} of {item} {index}", self.name),
            None => f.write_str(self.name),
        }
    }
}

/// Why a message could not be decoded. Offsets count from the tag byte, which is offset 0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message: no tag byte")]
    Empty,
    #[error(
        "unknown pgoutput message tag {:?} (0x{tag:02X}); walsync speaks protocol version 1 \
         without streaming or two-phase commit",
        char::from(*tag)
    )]
    UnknownTag { tag: u8 },
    #[error(
        "{message} message truncated at byte {offset} reading {field}: \
         needs {needed} bytes, {available} left"
    )]
    Truncated {
        message: MessageKind,
        field: Field,
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("{message} message: {field} at byte {offset} is not NUL-terminated")]
    UnterminatedString {
        message: MessageKind,
        field: Field,
        offset: usize,
    },
    #[error("{message} message: {field} at byte {offset} is not valid UTF-8")]
    InvalidUtf8 {
        message: MessageKind,
        field: Field,
        offset: usize,
    },
    #[error("{message} message: {field} at byte {offset} is negative ({value})")]
    Negative {
        message: MessageKind,
        field: Field,
        offset: usize,
        value: i32,
    },
    #[error(
        "{message} message: {field} at byte {offset} is {:?} (0x{found:02X}), expected {expected}",
        char::from(*found)
    )]
    UnexpectedByte {
        message: MessageKind,
        field: Field,
        offset: usize,
        found: u8,
        expected: &'static str,
    },
    #[error(
        "{message} message: {field} at byte {offset} has unknown bits set \
         (0x{found:02X}, known bits 0x{known:02X})"
    )]
    UnknownFlags {
        message: MessageKind,
        field: Field,
        offset: usize,
        found: u8,
        known: u8,
    },
    #[error("{message} message has {count} trailing bytes after its end at byte {offset}")]
    TrailingBytes {
        message: MessageKind,
        offset: usize,
        count: usize,
    },
    #[error("no Relation message seen for OID {oid}")]
    UnknownRelation { oid: u32 },
    #[error(
        "relation {namespace}.{name} (OID {oid}) has {expected} columns \
         but the tuple has {found}"
    )]
    ColumnCountMismatch {
        oid: u32,
        namespace: String,
        name: String,
        expected: usize,
        found: usize,
    },
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// Decodes one pgoutput message: the payload of one XLogData frame, tag byte first.
pub fn decode(message: Bytes) -> Result<LogicalMessage, DecodeError> {
    let tag = *message.first().ok_or(DecodeError::Empty)?;
    let kind = MessageKind::from_tag(tag).ok_or(DecodeError::UnknownTag { tag })?;
    let mut reader = Reader {
        message,
        position: 1,
        kind,
    };
    let decoded = match kind {
        MessageKind::Begin => LogicalMessage::Begin(read_begin(&mut reader)?),
        MessageKind::Commit => LogicalMessage::Commit(read_commit(&mut reader)?),
        MessageKind::Origin => LogicalMessage::Origin(read_origin(&mut reader)?),
        MessageKind::Relation => LogicalMessage::Relation(read_relation(&mut reader)?),
        MessageKind::Type => LogicalMessage::Type(read_type(&mut reader)?),
        MessageKind::Insert => LogicalMessage::Insert(read_insert(&mut reader)?),
        MessageKind::Update => LogicalMessage::Update(read_update(&mut reader)?),
        MessageKind::Delete => LogicalMessage::Delete(read_delete(&mut reader)?),
        MessageKind::Truncate => LogicalMessage::Truncate(read_truncate(&mut reader)?),
        MessageKind::Message => LogicalMessage::Message(read_logical_message(&mut reader)?),
    };
    reader.expect_end()?;
    Ok(decoded)
}

fn read_begin(reader: &mut Reader) -> Result<Begin, DecodeError> {
    Ok(Begin {
        final_lsn: reader.lsn(Field::named("final LSN"))?,
        commit_time_micros: reader.i64(Field::named("commit timestamp"))?,
        xid: reader.u32(Field::named("xid"))?,
    })
}

fn read_commit(reader: &mut Reader) -> Result<Commit, DecodeError> {
    Ok(Commit {
        flags: reader.u8(Field::named("flags"))?,
        commit_lsn: reader.lsn(Field::named("commit LSN"))?,
        end_lsn: reader.lsn(Field::named("end LSN"))?,
        commit_time_micros: reader.i64(Field::named("commit timestamp"))?,
    })
}

fn read_origin(reader: &mut Reader) -> Result<Origin, DecodeError> {
    Ok(Origin {
        commit_lsn: reader.lsn(Field::named("origin commit LSN"))?,
        name: reader.string(Field::named("origin name"))?,
    })
}

/// Postgres abbreviates `pg_catalog` as the empty string in Relation and Type messages.
fn namespace_or_pg_catalog(namespace: String) -> String {
    if namespace.is_empty() {
        "pg_catalog".to_owned()
    } else {
        namespace
    }
}

fn read_relation(reader: &mut Reader) -> Result<Relation, DecodeError> {
    let oid = reader.u32(Field::named("relation OID"))?;
    let namespace = namespace_or_pg_catalog(reader.string(Field::named("namespace"))?);
    let name = reader.string(Field::named("relation name"))?;
    let replica_identity = read_replica_identity(reader)?;
    let column_count = reader.count_i16(Field::named("column count"))?;
    // Each column takes at least 10 bytes (flags, an empty name, two Int32s), so the
    // allocation is bounded by the message, not by a count an attacker or a bug could inflate.
    let mut columns = Vec::with_capacity(column_count.min(reader.remaining() / 10));
    for index in 0..column_count {
        columns.push(read_column(reader, index)?);
    }
    Ok(Relation {
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn read_replica_identity(reader: &mut Reader) -> Result<ReplicaIdentity, DecodeError> {
    let field = Field::named("replica identity setting");
    let offset = reader.position;
    let setting = reader.u8(field)?;
    ReplicaIdentity::from_setting(setting)
        .ok_or_else(|| reader.unexpected_byte(field, offset, setting, "'d', 'n', 'f' or 'i'"))
}

const COLUMN_IS_KEY: u8 = 1;

fn read_column(reader: &mut Reader, index: usize) -> Result<Column, DecodeError> {
    let flags = reader.flags(Field::of_column("flags", index), COLUMN_IS_KEY)?;
    Ok(Column {
        is_key: flags & COLUMN_IS_KEY != 0,
        name: reader.string(Field::of_column("name", index))?,
        type_oid: reader.u32(Field::of_column("type OID", index))?,
        type_modifier: reader.i32(Field::of_column("type modifier", index))?,
    })
}

fn read_type(reader: &mut Reader) -> Result<TypeMessage, DecodeError> {
    Ok(TypeMessage {
        oid: reader.u32(Field::named("type OID"))?,
        namespace: namespace_or_pg_catalog(reader.string(Field::named("namespace"))?),
        name: reader.string(Field::named("type name"))?,
    })
}

fn read_insert(reader: &mut Reader) -> Result<Insert, DecodeError> {
    let relation_oid = reader.u32(Field::named("relation OID"))?;
    reader.expect_byte(Field::named("new tuple marker"), b'N', "'N'")?;
    let new = read_tuple(reader)?;
    Ok(Insert { relation_oid, new })
}

fn read_update(reader: &mut Reader) -> Result<Update, DecodeError> {
    let relation_oid = reader.u32(Field::named("relation OID"))?;
    let field = Field::named("tuple marker");
    let offset = reader.position;
    let marker = reader.u8(field)?;
    let old = match marker {
        b'K' => Some(OldTuple::Key(read_tuple(reader)?)),
        b'O' => Some(OldTuple::Full(read_tuple(reader)?)),
        b'N' => None,
        other => return Err(reader.unexpected_byte(field, offset, other, "'K', 'O' or 'N'")),
    };
    // After an old tuple the new one still needs its own 'N'; without one it was already read.
    if old.is_some() {
        reader.expect_byte(Field::named("new tuple marker"), b'N', "'N'")?;
    }
    let new = read_tuple(reader)?;
    Ok(Update {
        relation_oid,
        old,
        new,
    })
}

fn read_delete(reader: &mut Reader) -> Result<Delete, DecodeError> {
    let relation_oid = reader.u32(Field::named("relation OID"))?;
    let field = Field::named("old tuple marker");
    let offset = reader.position;
    let old = match reader.u8(field)? {
        b'K' => OldTuple::Key(read_tuple(reader)?),
        b'O' => OldTuple::Full(read_tuple(reader)?),
        other => return Err(reader.unexpected_byte(field, offset, other, "'K' or 'O'")),
    };
    Ok(Delete { relation_oid, old })
}

const TRUNCATE_CASCADE: u8 = 1;
const TRUNCATE_RESTART_IDENTITY: u8 = 2;

fn read_truncate(reader: &mut Reader) -> Result<Truncate, DecodeError> {
    let relation_count = reader.count_i32(Field::named("relation count"))?;
    let options = reader.flags(
        Field::named("options"),
        TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY,
    )?;
    // Four bytes per OID: never reserve more than the message can hold.
    let mut relation_oids = Vec::with_capacity(relation_count.min(reader.remaining() / 4));
    for index in 0..relation_count {
        relation_oids.push(reader.u32(Field::of_relation("OID", index))?);
    }
    Ok(Truncate {
        cascade: options & TRUNCATE_CASCADE != 0,
        restart_identity: options & TRUNCATE_RESTART_IDENTITY != 0,
        relation_oids,
    })
}

const MESSAGE_TRANSACTIONAL: u8 = 1;

fn read_logical_message(reader: &mut Reader) -> Result<LogicalDecodingMessage, DecodeError> {
    let flags = reader.flags(Field::named("flags"), MESSAGE_TRANSACTIONAL)?;
    let lsn = reader.lsn(Field::named("message LSN"))?;
    let prefix = reader.string(Field::named("prefix"))?;
    let content_length = reader.count_i32(Field::named("content length"))?;
    let content = reader.bytes(Field::named("content"), content_length)?;
    Ok(LogicalDecodingMessage {
        transactional: flags & MESSAGE_TRANSACTIONAL != 0,
        lsn,
        prefix,
        content,
    })
}

fn read_tuple(reader: &mut Reader) -> Result<Tuple, DecodeError> {
    let column_count = reader.count_i16(Field::named("tuple column count"))?;
    // Every value takes at least its kind byte.
    let mut values = Vec::with_capacity(column_count.min(reader.remaining()));
    for index in 0..column_count {
        values.push(read_tuple_value(reader, index)?);
    }
    Ok(Tuple(values))
}

fn read_tuple_value(reader: &mut Reader, index: usize) -> Result<TupleValue, DecodeError> {
    let kind_field = Field::of_column("value kind", index);
    let offset = reader.position;
    match reader.u8(kind_field)? {
        b'n' => Ok(TupleValue::Null),
        b'u' => Ok(TupleValue::UnchangedToast),
        b't' => Ok(TupleValue::Text(read_value_bytes(reader, index)?)),
        b'b' => Ok(TupleValue::Binary(read_value_bytes(reader, index)?)),
        other => Err(reader.unexpected_byte(kind_field, offset, other, "'n', 'u', 't' or 'b'")),
    }
}

fn read_value_bytes(reader: &mut Reader, index: usize) -> Result<Bytes, DecodeError> {
    let length = reader.count_i32(Field::of_column("value length", index))?;
    reader.bytes(Field::of_column("value", index), length)
}

/// A cursor over one message. Every read checks the bytes are there before taking them, so
/// `position <= message.len()` always holds and nothing here can panic.
struct Reader {
    message: Bytes,
    position: usize,
    kind: MessageKind,
}

impl Reader {
    fn remaining(&self) -> usize {
        self.message.len().saturating_sub(self.position)
    }

    fn unread(&self) -> &[u8] {
        self.message.get(self.position..).unwrap_or_default()
    }

    fn truncated(&self, field: Field, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            message: self.kind,
            field,
            offset: self.position,
            needed,
            available: self.remaining(),
        }
    }

    fn unexpected_byte(
        &self,
        field: Field,
        offset: usize,
        found: u8,
        expected: &'static str,
    ) -> DecodeError {
        DecodeError::UnexpectedByte {
            message: self.kind,
            field,
            offset,
            found,
            expected,
        }
    }

    fn array<const N: usize>(&mut self, field: Field) -> Result<[u8; N], DecodeError> {
        let array = *self
            .unread()
            .first_chunk::<N>()
            .ok_or_else(|| self.truncated(field, N))?;
        self.position = self.position.saturating_add(N);
        Ok(array)
    }

    fn u8(&mut self, field: Field) -> Result<u8, DecodeError> {
        let [byte] = self.array::<1>(field)?;
        Ok(byte)
    }

    fn i16(&mut self, field: Field) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(field)?))
    }

    fn i32(&mut self, field: Field) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: Field) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn i64(&mut self, field: Field) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(field)?))
    }

    fn lsn(&mut self, field: Field) -> Result<Lsn, DecodeError> {
        Ok(Lsn(u64::from_be_bytes(self.array(field)?)))
    }

    /// A signed count or length on the wire; negative is malformed rather than "none".
    fn count_i32(&mut self, field: Field) -> Result<usize, DecodeError> {
        let offset = self.position;
        let value = self.i32(field)?;
        usize::try_from(value).map_err(|_| DecodeError::Negative {
            message: self.kind,
            field,
            offset,
            value,
        })
    }

    fn count_i16(&mut self, field: Field) -> Result<usize, DecodeError> {
        let offset = self.position;
        let value = self.i16(field)?;
        usize::try_from(value).map_err(|_| DecodeError::Negative {
            message: self.kind,
            field,
            offset,
            value: i32::from(value),
        })
    }

    /// A flag byte; bits outside `known` mean a protocol this decoder does not understand.
    fn flags(&mut self, field: Field, known: u8) -> Result<u8, DecodeError> {
        let offset = self.position;
        let flags = self.u8(field)?;
        if flags & !known != 0 {
            return Err(DecodeError::UnknownFlags {
                message: self.kind,
                field,
                offset,
                found: flags,
                known,
            });
        }
        Ok(flags)
    }

    fn expect_byte(
        &mut self,
        field: Field,
        wanted: u8,
        expected: &'static str,
    ) -> Result<(), DecodeError> {
        let offset = self.position;
        let found = self.u8(field)?;
        if found != wanted {
            return Err(self.unexpected_byte(field, offset, found, expected));
        }
        Ok(())
    }

    /// `length` bytes as a zero-copy slice of the message.
    fn bytes(&mut self, field: Field, length: usize) -> Result<Bytes, DecodeError> {
        if length > self.remaining() {
            return Err(self.truncated(field, length));
        }
        let end = self.position.saturating_add(length);
        let slice = self.message.slice(self.position..end);
        self.position = end;
        Ok(slice)
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, field: Field) -> Result<String, DecodeError> {
        let offset = self.position;
        let unread = self.unread();
        let (text, _terminator_and_rest) = unread
            .iter()
            .position(|&byte| byte == 0)
            .map(|nul| unread.split_at(nul))
            .ok_or(DecodeError::UnterminatedString {
                message: self.kind,
                field,
                offset,
            })?;
        let text = std::str::from_utf8(text)
            .map_err(|_| DecodeError::InvalidUtf8 {
                message: self.kind,
                field,
                offset,
            })?
            .to_owned();
        self.position = self.position.saturating_add(text.len()).saturating_add(1);
        Ok(text)
    }

    fn expect_end(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                message: self.kind,
                offset: self.position,
                count,
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Relations
// ---------------------------------------------------------------------------------------------

/// The Relation messages in force, by OID.
///
/// Postgres sends a Relation message before the first row of a table in a session and again
/// after its schema changes, always ahead of the rows that need it. Applying them in stream
/// order therefore gives every row the columns it was written with, even across `ALTER TABLE`.
#[derive(Debug, Clone, Default)]
pub struct Relations {
    by_oid: HashMap<u32, Arc<Relation>>,
}

impl Relations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a Relation message, replacing any earlier one for the same OID. Returns the
    /// shared handle now in force.
    pub fn apply(&mut self, relation: Relation) -> Arc<Relation> {
        let relation = Arc::new(relation);
        self.by_oid.insert(relation.oid, Arc::clone(&relation));
        relation
    }

    pub fn get(&self, oid: u32) -> Option<&Arc<Relation>> {
        self.by_oid.get(&oid)
    }

    /// The relation a row message for `oid` must be read with, checked against the tuple so a
    /// value can never be paired with the wrong column name.
    pub fn resolve(&self, oid: u32, tuple: &Tuple) -> Result<Arc<Relation>, DecodeError> {
        let relation = self
            .by_oid
            .get(&oid)
            .ok_or(DecodeError::UnknownRelation { oid })?;
        if relation.columns.len() != tuple.len() {
            return Err(DecodeError::ColumnCountMismatch {
                oid,
                namespace: relation.namespace.clone(),
                name: relation.name.clone(),
                expected: relation.columns.len(),
                found: tuple.len(),
            });
        }
        Ok(Arc::clone(relation))
    }

    pub fn len(&self) -> usize {
        self.by_oid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_oid.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    // -----------------------------------------------------------------------------------------
    // Fixture builder: writes messages the way pgoutput does, field by field.
    // -----------------------------------------------------------------------------------------

    struct Wire(Vec<u8>);

    impl Wire {
        fn tag(tag: u8) -> Self {
            Wire(vec![tag])
        }

        fn u8(mut self, value: u8) -> Self {
            self.0.push(value);
            self
        }

        fn i16(mut self, value: i16) -> Self {
            self.0.extend_from_slice(&value.to_be_bytes());
            self
        }

        fn i32(mut self, value: i32) -> Self {
            self.0.extend_from_slice(&value.to_be_bytes());
            self
        }

        fn u32(mut self, value: u32) -> Self {
            self.0.extend_from_slice(&value.to_be_bytes());
            self
        }

        fn i64(mut self, value: i64) -> Self {
            self.0.extend_from_slice(&value.to_be_bytes());
            self
        }

        fn lsn(mut self, value: u64) -> Self {
            self.0.extend_from_slice(&value.to_be_bytes());
            self
        }

        fn raw(mut self, bytes: &[u8]) -> Self {
            self.0.extend_from_slice(bytes);
            self
        }

        fn string(self, text: &str) -> Self {
            self.raw(text.as_bytes()).u8(0)
        }

        fn tuple(self, values: &[TupleValue]) -> Self {
            let count = i16::try_from(values.len()).expect("fixture tuple too wide");
            values.iter().fold(self.i16(count), Wire::value)
        }

        fn value(self, value: &TupleValue) -> Self {
            match value {
                TupleValue::Null => self.u8(b'n'),
                TupleValue::UnchangedToast => self.u8(b'u'),
                TupleValue::Text(bytes) => self.u8(b't').sized(bytes),
                TupleValue::Binary(bytes) => self.u8(b'b').sized(bytes),
            }
        }

        /// Int32 length, then the bytes.
        fn sized(self, bytes: &[u8]) -> Self {
            let length = i32::try_from(bytes.len()).expect("fixture value too long");
            self.i32(length).raw(bytes)
        }

        fn build(self) -> Bytes {
            Bytes::from(self.0)
        }
    }

    fn text(value: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(value.as_bytes()))
    }

    fn binary(value: &[u8]) -> TupleValue {
        TupleValue::Binary(Bytes::copy_from_slice(value))
    }

    fn begin(final_lsn: u64, commit_time_micros: i64, xid: u32) -> Wire {
        Wire::tag(b'B')
            .lsn(final_lsn)
            .i64(commit_time_micros)
            .u32(xid)
    }

    fn commit(flags: u8, commit_lsn: u64, end_lsn: u64, commit_time_micros: i64) -> Wire {
        Wire::tag(b'C')
            .u8(flags)
            .lsn(commit_lsn)
            .lsn(end_lsn)
            .i64(commit_time_micros)
    }

    fn origin(commit_lsn: u64, name: &str) -> Wire {
        Wire::tag(b'O').lsn(commit_lsn).string(name)
    }

    /// Columns as (is_key, name, type OID, type modifier).
    fn relation(
        oid: u32,
        namespace: &str,
        name: &str,
        replica_identity: u8,
        columns: &[(bool, &str, u32, i32)],
    ) -> Wire {
        let count = i16::try_from(columns.len()).expect("fixture relation too wide");
        let header = Wire::tag(b'R').u32(oid).string(namespace).string(name);
        columns.iter().fold(
            header.u8(replica_identity).i16(count),
            |wire, &(is_key, column, type_oid, type_modifier)| {
                wire.u8(u8::from(is_key))
                    .string(column)
                    .u32(type_oid)
                    .i32(type_modifier)
            },
        )
    }

    fn type_message(oid: u32, namespace: &str, name: &str) -> Wire {
        Wire::tag(b'Y').u32(oid).string(namespace).string(name)
    }

    fn insert(relation_oid: u32, new: &[TupleValue]) -> Wire {
        Wire::tag(b'I').u32(relation_oid).u8(b'N').tuple(new)
    }

    /// `old` is the marker ('K' or 'O') and the old tuple.
    fn update(relation_oid: u32, old: Option<(u8, &[TupleValue])>, new: &[TupleValue]) -> Wire {
        let wire = Wire::tag(b'U').u32(relation_oid);
        let wire = match old {
            Some((marker, old)) => wire.u8(marker).tuple(old),
            None => wire,
        };
        wire.u8(b'N').tuple(new)
    }

    fn delete(relation_oid: u32, marker: u8, old: &[TupleValue]) -> Wire {
        Wire::tag(b'D').u32(relation_oid).u8(marker).tuple(old)
    }

    fn truncate(options: u8, relation_oids: &[u32]) -> Wire {
        let count = i32::try_from(relation_oids.len()).expect("fixture truncate too long");
        relation_oids
            .iter()
            .fold(Wire::tag(b'T').i32(count).u8(options), |wire, &oid| {
                wire.u32(oid)
            })
    }

    fn message(transactional: bool, lsn: u64, prefix: &str, content: &[u8]) -> Wire {
        Wire::tag(b'M')
            .u8(u8::from(transactional))
            .lsn(lsn)
            .string(prefix)
            .sized(content)
    }

    /// One valid fixture of every shape, for the tests that must hold for all of them.
    fn every_fixture() -> Vec<Bytes> {
        let row = [
            TupleValue::Null,
            TupleValue::UnchangedToast,
            text("a"),
            binary(&[0, 1]),
        ];
        vec![
            begin(0x16_B374_D848, 1, 7).build(),
            commit(0, 1, 2, 3).build(),
            origin(5, "node_a").build(),
            relation(
                16384,
                "public",
                "users",
                b'd',
                &[(true, "id", 23, -1), (false, "n", 25, -1)],
            )
            .build(),
            type_message(16400, "public", "mood").build(),
            insert(16384, &row).build(),
            update(16384, None, &row).build(),
            update(16384, Some((b'K', &row)), &row).build(),
            update(16384, Some((b'O', &row)), &row).build(),
            delete(16384, b'K', &row).build(),
            delete(16384, b'O', &row).build(),
            truncate(3, &[1, 2]).build(),
            message(true, 9, "walsync", b"hello").build(),
        ]
    }

    fn decoded(wire: Wire) -> LogicalMessage {
        decode(wire.build()).expect("fixture must decode")
    }

    fn decode_error(bytes: impl Into<Bytes>) -> DecodeError {
        decode(bytes.into()).expect_err("must not decode")
    }

    // -----------------------------------------------------------------------------------------
    // Every message type
    // -----------------------------------------------------------------------------------------

    #[test]
    fn decodes_begin() {
        let expected = Begin {
            final_lsn: Lsn(0x16_B374_D848),
            commit_time_micros: 1_000_000,
            xid: 742,
        };
        assert_eq!(
            decoded(begin(0x16_B374_D848, 1_000_000, 742)),
            LogicalMessage::Begin(expected)
        );
    }

    #[test]
    fn decodes_xid_above_i32_max_as_unsigned() {
        let LogicalMessage::Begin(begin) = decoded(begin(1, 0, u32::MAX)) else {
            panic!("not a Begin")
        };
        assert_eq!(begin.xid, u32::MAX);
    }

    #[test]
    fn decodes_commit() {
        let expected = Commit {
            flags: 0,
            commit_lsn: Lsn(0x100),
            end_lsn: Lsn(0x130),
            commit_time_micros: -5,
        };
        assert_eq!(
            decoded(commit(0, 0x100, 0x130, -5)),
            LogicalMessage::Commit(expected)
        );
    }

    #[test]
    fn decodes_origin() {
        let expected = Origin {
            commit_lsn: Lsn(77),
            name: "pg_16385".to_owned(),
        };
        assert_eq!(
            decoded(origin(77, "pg_16385")),
            LogicalMessage::Origin(expected)
        );
    }

    #[test]
    fn decodes_relation() {
        let wire = relation(
            16384,
            "public",
            "users",
            b'i',
            &[
                (true, "id", 23, -1),
                (false, "name", 1043, 68),
                (false, "", 25, -1),
            ],
        );
        let expected = Relation {
            oid: 16384,
            namespace: "public".to_owned(),
            name: "users".to_owned(),
            replica_identity: ReplicaIdentity::Index,
            columns: vec![
                Column {
                    is_key: true,
                    name: "id".to_owned(),
                    type_oid: 23,
                    type_modifier: -1,
                },
                Column {
                    is_key: false,
                    name: "name".to_owned(),
                    type_oid: 1043,
                    type_modifier: 68,
                },
                Column {
                    is_key: false,
                    name: String::new(),
                    type_oid: 25,
                    type_modifier: -1,
                },
            ],
        };
        assert_eq!(decoded(wire), LogicalMessage::Relation(expected));
    }

    #[test]
    fn decodes_every_replica_identity_setting() {
        let settings = [
            (b'd', ReplicaIdentity::Default),
            (b'n', ReplicaIdentity::Nothing),
            (b'f', ReplicaIdentity::Full),
            (b'i', ReplicaIdentity::Index),
        ];
        for (setting, expected) in settings {
            let LogicalMessage::Relation(relation) = decoded(relation(1, "s", "t", setting, &[]))
            else {
                panic!("not a Relation");
            };
            assert_eq!(relation.replica_identity, expected);
            assert!(relation.columns.is_empty());
        }
    }

    #[test]
    fn empty_namespace_means_pg_catalog() {
        let LogicalMessage::Relation(relation) = decoded(relation(1259, "", "pg_class", b'n', &[]))
        else {
            panic!("not a Relation");
        };
        assert_eq!(relation.namespace, "pg_catalog");
        let LogicalMessage::Type(type_message) = decoded(type_message(16, "", "bool")) else {
            panic!("not a Type");
        };
        assert_eq!(type_message.namespace, "pg_catalog");
    }

    #[test]
    fn decodes_type() {
        let expected = TypeMessage {
            oid: 16400,
            namespace: "public".to_owned(),
            name: "mood".to_owned(),
        };
        assert_eq!(
            decoded(type_message(16400, "public", "mood")),
            LogicalMessage::Type(expected)
        );
    }

    #[test]
    fn decodes_insert_with_every_kind_of_value() {
        let values = vec![
            TupleValue::Null,
            TupleValue::UnchangedToast,
            text("héllo"),
            text(""),
            binary(&[0, 0, 0, 42]),
        ];
        let expected = Insert {
            relation_oid: 16384,
            new: Tuple(values.clone()),
        };
        assert_eq!(
            decoded(insert(16384, &values)),
            LogicalMessage::Insert(expected)
        );
    }

    #[test]
    fn decodes_insert_with_no_columns() {
        let expected = Insert {
            relation_oid: 1,
            new: Tuple::default(),
        };
        assert_eq!(decoded(insert(1, &[])), LogicalMessage::Insert(expected));
    }

    #[test]
    fn column_values_are_zero_copy_slices_of_the_message() {
        let message = insert(1, &[text("abc")]).build();
        let LogicalMessage::Insert(insert) = decode(message.clone()).unwrap() else {
            panic!("not an Insert")
        };
        let TupleValue::Text(value) = &insert.new.0[0] else {
            panic!("not text")
        };
        let message_range = message.as_ptr_range();
        assert!(message_range.contains(&value.as_ptr()), "value was copied");
    }

    #[test]
    fn decodes_update_without_old_tuple() {
        let new = [text("1"), text("new")];
        let expected = Update {
            relation_oid: 16384,
            old: None,
            new: Tuple(new.to_vec()),
        };
        assert_eq!(
            decoded(update(16384, None, &new)),
            LogicalMessage::Update(expected)
        );
    }

    #[test]
    fn decodes_update_with_old_key() {
        let old = [text("1"), TupleValue::Null];
        let new = [text("2"), TupleValue::UnchangedToast];
        let expected = Update {
            relation_oid: 16384,
            old: Some(OldTuple::Key(Tuple(old.to_vec()))),
            new: Tuple(new.to_vec()),
        };
        assert_eq!(
            decoded(update(16384, Some((b'K', &old)), &new)),
            LogicalMessage::Update(expected)
        );
    }

    #[test]
    fn decodes_update_with_old_full_row() {
        let old = [text("1"), text("before")];
        let new = [text("1"), text("after")];
        let expected = Update {
            relation_oid: 16384,
            old: Some(OldTuple::Full(Tuple(old.to_vec()))),
            new: Tuple(new.to_vec()),
        };
        let decoded = decoded(update(16384, Some((b'O', &old)), &new));
        assert_eq!(decoded, LogicalMessage::Update(expected));
        let LogicalMessage::Update(update) = decoded else {
            unreachable!()
        };
        assert_eq!(
            update.old.as_ref().map(OldTuple::tuple),
            Some(&Tuple(old.to_vec()))
        );
    }

    #[test]
    fn decodes_delete_with_old_key_and_with_old_full_row() {
        let old = [text("1"), TupleValue::Null];
        let by_key = Delete {
            relation_oid: 9,
            old: OldTuple::Key(Tuple(old.to_vec())),
        };
        assert_eq!(
            decoded(delete(9, b'K', &old)),
            LogicalMessage::Delete(by_key)
        );
        let full = Delete {
            relation_oid: 9,
            old: OldTuple::Full(Tuple(old.to_vec())),
        };
        assert_eq!(decoded(delete(9, b'O', &old)), LogicalMessage::Delete(full));
    }

    #[test]
    fn decodes_truncate_options() {
        let cases = [
            (0, false, false),
            (1, true, false),
            (2, false, true),
            (3, true, true),
        ];
        for (options, cascade, restart_identity) in cases {
            let expected = Truncate {
                cascade,
                restart_identity,
                relation_oids: vec![16384, 16390],
            };
            assert_eq!(
                decoded(truncate(options, &[16384, 16390])),
                LogicalMessage::Truncate(expected)
            );
        }
    }

    #[test]
    fn decodes_truncate_of_no_relations() {
        let expected = Truncate {
            cascade: false,
            restart_identity: false,
            relation_oids: vec![],
        };
        assert_eq!(
            decoded(truncate(0, &[])),
            LogicalMessage::Truncate(expected)
        );
    }

    #[test]
    fn decodes_transactional_and_non_transactional_messages() {
        for transactional in [true, false] {
            let expected = LogicalDecodingMessage {
                transactional,
                lsn: Lsn(0x2A),
                prefix: "walsync.heartbeat".to_owned(),
                content: Bytes::from_static(b"\x00\xFFpayload"),
            };
            let wire = message(transactional, 0x2A, "walsync.heartbeat", b"\x00\xFFpayload");
            assert_eq!(decoded(wire), LogicalMessage::Message(expected));
        }
    }

    #[test]
    fn decodes_message_with_empty_content() {
        let LogicalMessage::Message(message) = decoded(message(false, 1, "", b"")) else {
            panic!("not a Message");
        };
        assert!(message.content.is_empty());
        assert_eq!(message.prefix, "");
    }

    #[test]
    fn kind_matches_the_tag_byte() {
        for fixture in every_fixture() {
            let kind = decode(fixture.clone()).unwrap().kind();
            assert_eq!(Some(&kind.tag()), fixture.first());
        }
    }

    // -----------------------------------------------------------------------------------------
    // Literal bytes, independent of the builder
    // -----------------------------------------------------------------------------------------

    #[test]
    fn decodes_literal_begin() {
        let bytes: &[u8] = &[
            b'B', //
            0x00, 0x00, 0x00, 0x16, 0xB3, 0x74, 0xD8, 0x48, // final LSN 16/B374D848
            0x00, 0x02, 0x8C, 0x6E, 0x2A, 0x3B, 0x00, 0x00, // commit time
            0x00, 0x00, 0x02, 0xE6, // xid 742
        ];
        let expected = Begin {
            final_lsn: "16/B374D848".parse().unwrap(),
            commit_time_micros: 0x0002_8C6E_2A3B_0000,
            xid: 742,
        };
        assert_eq!(
            decode(Bytes::from_static(bytes)),
            Ok(LogicalMessage::Begin(expected))
        );
    }

    #[test]
    fn decodes_literal_insert() {
        let bytes: &[u8] = &[
            b'I', //
            0x00, 0x00, 0x40, 0x00, // relation OID 16384
            b'N', //
            0x00, 0x03, // 3 columns
            b't', 0x00, 0x00, 0x00, 0x02, b'4', b'2', // text "42"
            b'n', // NULL
            b'b', 0x00, 0x00, 0x00, 0x01, 0xFF, // binary [FF]
        ];
        let expected = Insert {
            relation_oid: 16384,
            new: Tuple(vec![text("42"), TupleValue::Null, binary(&[0xFF])]),
        };
        assert_eq!(
            decode(Bytes::from_static(bytes)),
            Ok(LogicalMessage::Insert(expected))
        );
    }

    // -----------------------------------------------------------------------------------------
    // Relations registry
    // -----------------------------------------------------------------------------------------

    fn relation_message(wire: Wire) -> Relation {
        match decoded(wire) {
            LogicalMessage::Relation(relation) => relation,
            other => panic!("not a Relation: {other:?}"),
        }
    }

    #[test]
    fn newer_relation_message_replaces_the_older_one() {
        let mut relations = Relations::new();
        let before = relation(
            16384,
            "public",
            "users",
            b'd',
            &[(true, "id", 23, -1), (false, "name", 25, -1)],
        );
        relations.apply(relation_message(before));
        let two_columns = Tuple(vec![text("1"), text("ann")]);
        assert_eq!(
            relations
                .resolve(16384, &two_columns)
                .unwrap()
                .columns
                .len(),
            2
        );

        // ALTER TABLE users DROP COLUMN name, ADD COLUMN age bigint, ADD COLUMN email text.
        let after = relation(
            16384,
            "public",
            "users",
            b'd',
            &[
                (true, "id", 23, -1),
                (false, "age", 20, -1),
                (false, "email", 25, -1),
            ],
        );
        let applied = relations.apply(relation_message(after));
        assert_eq!(relations.len(), 1);

        let three_columns = Tuple(vec![text("1"), text("30"), TupleValue::Null]);
        let resolved = relations.resolve(16384, &three_columns).unwrap();
        assert!(Arc::ptr_eq(&resolved, &applied));
        let names: Vec<&str> = resolved
            .columns
            .iter()
            .map(|column| column.name.as_str())
            .collect();
        assert_eq!(names, ["id", "age", "email"]);
        assert_eq!(resolved.columns[1].type_oid, 20);

        let error = relations.resolve(16384, &two_columns).unwrap_err();
        assert_eq!(
            error,
            DecodeError::ColumnCountMismatch {
                oid: 16384,
                namespace: "public".to_owned(),
                name: "users".to_owned(),
                expected: 3,
                found: 2,
            }
        );
        assert_eq!(
            error.to_string(),
            "relation public.users (OID 16384) has 3 columns but the tuple has 2"
        );
    }

    #[test]
    fn resolving_an_unknown_oid_fails_clearly() {
        let relations = Relations::new();
        assert!(relations.is_empty());
        assert!(relations.get(42).is_none());
        let error = relations.resolve(42, &Tuple::default()).unwrap_err();
        assert_eq!(error, DecodeError::UnknownRelation { oid: 42 });
        assert_eq!(error.to_string(), "no Relation message seen for OID 42");
    }

    #[test]
    fn relations_are_kept_per_oid() {
        let mut relations = Relations::new();
        relations.apply(relation_message(relation(
            1,
            "s",
            "a",
            b'd',
            &[(true, "id", 23, -1)],
        )));
        relations.apply(relation_message(relation(2, "s", "b", b'f', &[])));
        assert_eq!(relations.len(), 2);
        assert_eq!(
            relations.get(1).map(|relation| relation.name.as_str()),
            Some("a")
        );
        assert_eq!(relations.resolve(2, &Tuple::default()).unwrap().name, "b");
    }

    // -----------------------------------------------------------------------------------------
    // Timestamps
    // -----------------------------------------------------------------------------------------

    #[test]
    fn converts_pg_epoch_micros_to_unix_millis() {
        assert_eq!(pg_epoch_micros_to_unix_millis(0), 946_684_800_000);
        assert_eq!(pg_epoch_micros_to_unix_millis(1_999), 946_684_800_001);
        assert_eq!(pg_epoch_micros_to_unix_millis(-1), 946_684_799_999);
        assert_eq!(pg_epoch_micros_to_unix_millis(-946_684_800_000_000), 0);
        // 2024-01-01T00:00:00Z is 1704067200 s after the Unix epoch.
        assert_eq!(
            pg_epoch_micros_to_unix_millis(757_382_400_000_000),
            1_704_067_200_000
        );
    }

    #[test]
    fn timestamp_conversion_handles_the_extremes_without_overflow() {
        let offset_millis = 946_684_800_000;
        assert_eq!(
            pg_epoch_micros_to_unix_millis(i64::MAX),
            i64::MAX / 1_000 + offset_millis
        );
        assert_eq!(
            pg_epoch_micros_to_unix_millis(i64::MIN),
            i64::MIN.div_euclid(1_000) + offset_millis
        );
    }

    // -----------------------------------------------------------------------------------------
    // Errors
    // -----------------------------------------------------------------------------------------

    #[test]
    fn every_truncation_of_an_insert_is_an_error() {
        let message = insert(
            16384,
            &[
                TupleValue::Null,
                TupleValue::UnchangedToast,
                text("ab"),
                binary(&[1]),
            ],
        )
        .build();
        for length in 0..message.len() {
            let error = decode(message.slice(..length)).expect_err("a prefix must not decode");
            match length {
                0 => assert_eq!(error, DecodeError::Empty),
                _ => assert!(
                    matches!(
                        error,
                        DecodeError::Truncated {
                            message: MessageKind::Insert,
                            ..
                        }
                    ),
                    "{error}"
                ),
            }
        }
        assert!(decode(message).is_ok());
    }

    #[test]
    fn every_truncation_of_every_message_is_an_error() {
        for fixture in every_fixture() {
            for length in 0..fixture.len() {
                assert!(
                    decode(fixture.slice(..length)).is_err(),
                    "prefix {length} of {fixture:?}"
                );
            }
        }
    }

    #[test]
    fn truncation_error_names_message_field_and_offset() {
        // Cut in the middle of the second value's length word.
        let message = insert(7, &[text("x"), text("yz")]).build();
        let error = decode(message.slice(..16)).unwrap_err();
        assert_eq!(
            error,
            DecodeError::Truncated {
                message: MessageKind::Insert,
                field: Field::of_column("value length", 1),
                offset: 15,
                needed: 4,
                available: 1,
            }
        );
        assert_eq!(
            error.to_string(),
            "Insert ('I') message truncated at byte 15 reading value length of column 1: \
             needs 4 bytes, 1 left"
        );
    }

    #[test]
    fn rejects_empty_input() {
        assert_eq!(decode_error(Bytes::new()), DecodeError::Empty);
    }

    #[test]
    fn rejects_unknown_tags() {
        // Streaming ('S', 'E', 'c', 'A') and two-phase ('b', 'P', 'K', 'r', 's') messages need
        // protocol versions this decoder does not request.
        for tag in [
            b'S', b'E', b'c', b'A', b'b', b'P', b'K', b'r', b's', b'x', 0, 0xFF,
        ] {
            assert_eq!(
                decode_error(vec![tag, 0, 0, 0, 0]),
                DecodeError::UnknownTag { tag }
            );
        }
        let message = decode_error(vec![b'S']).to_string();
        assert!(
            message.contains("'S'") && message.contains("0x53"),
            "{message}"
        );
    }

    #[test]
    fn rejects_trailing_bytes() {
        for fixture in every_fixture() {
            let mut longer = fixture.to_vec();
            longer.extend_from_slice(&[0, 0]);
            let error = decode_error(longer);
            let expected_kind = decode(fixture.clone()).unwrap().kind();
            assert_eq!(
                error,
                DecodeError::TrailingBytes {
                    message: expected_kind,
                    offset: fixture.len(),
                    count: 2
                }
            );
        }
    }

    #[test]
    fn rejects_negative_value_length() {
        let wire = Wire::tag(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(-1);
        assert_eq!(
            decode_error(wire.build()),
            DecodeError::Negative {
                message: MessageKind::Insert,
                field: Field::of_column("value length", 0),
                offset: 9,
                value: -1,
            }
        );
    }

    #[test]
    fn rejects_negative_counts_and_lengths_everywhere() {
        let negatives = [
            (
                Wire::tag(b'I').u32(1).u8(b'N').i16(-1),
                "tuple column count",
            ),
            (
                Wire::tag(b'R')
                    .u32(1)
                    .string("s")
                    .string("t")
                    .u8(b'd')
                    .i16(-3),
                "column count",
            ),
            (Wire::tag(b'T').i32(-1).u8(0), "relation count"),
            (
                Wire::tag(b'M').u8(1).lsn(1).string("p").i32(i32::MIN),
                "content length",
            ),
            (
                Wire::tag(b'D').u32(1).u8(b'K').i16(1).u8(b'b').i32(-7),
                "value length",
            ),
        ];
        for (wire, field_name) in negatives {
            match decode_error(wire.build()) {
                DecodeError::Negative { field, .. } => assert_eq!(field.name, field_name),
                other => panic!("expected a negative {field_name}, got {other}"),
            }
        }
    }

    #[test]
    fn huge_counts_fail_without_huge_allocations() {
        let errors = [
            decode_error(Wire::tag(b'T').i32(i32::MAX).u8(0).build()),
            decode_error(Wire::tag(b'I').u32(1).u8(b'N').i16(i16::MAX).build()),
            decode_error(
                Wire::tag(b'M')
                    .u8(0)
                    .lsn(1)
                    .string("")
                    .i32(i32::MAX)
                    .build(),
            ),
        ];
        for error in errors {
            assert!(matches!(error, DecodeError::Truncated { .. }), "{error}");
        }
    }

    #[test]
    fn rejects_invalid_utf8_in_names() {
        let wire = Wire::tag(b'R')
            .u32(1)
            .string("public")
            .raw(&[b'u', 0xC3, 0x28])
            .u8(0)
            .u8(b'd')
            .i16(0);
        assert_eq!(
            decode_error(wire.build()),
            DecodeError::InvalidUtf8 {
                message: MessageKind::Relation,
                field: Field::named("relation name"),
                offset: 12,
            }
        );
        let column = Wire::tag(b'R')
            .u32(1)
            .string("s")
            .string("t")
            .u8(b'd')
            .i16(1)
            .u8(0)
            .raw(&[0xFF, 0]);
        assert!(matches!(
            decode_error(column.u32(23).i32(-1).build()),
            DecodeError::InvalidUtf8 {
                field: Field {
                    name: "name",
                    item: Some(("column", 0))
                },
                ..
            }
        ));
        let prefix = Wire::tag(b'M').u8(0).lsn(1).raw(&[0x80, 0]).i32(0);
        assert!(matches!(
            decode_error(prefix.build()),
            DecodeError::InvalidUtf8 { .. }
        ));
    }

    #[test]
    fn rejects_unterminated_strings() {
        let wire = Wire::tag(b'O').lsn(1).raw(b"no terminator");
        assert_eq!(
            decode_error(wire.build()),
            DecodeError::UnterminatedString {
                message: MessageKind::Origin,
                field: Field::named("origin name"),
                offset: 9,
            }
        );
    }

    #[test]
    fn rejects_unknown_tuple_value_kind() {
        let wire = Wire::tag(b'I').u32(1).u8(b'N').i16(2).u8(b'n').u8(b'x');
        assert_eq!(
            decode_error(wire.build()),
            DecodeError::UnexpectedByte {
                message: MessageKind::Insert,
                field: Field::of_column("value kind", 1),
                offset: 9,
                found: b'x',
                expected: "'n', 'u', 't' or 'b'",
            }
        );
    }

    #[test]
    fn rejects_wrong_tuple_markers() {
        let insert_without_n = Wire::tag(b'I').u32(1).u8(b'K').i16(0);
        assert!(matches!(
            decode_error(insert_without_n.build()),
            DecodeError::UnexpectedByte { found: b'K', .. }
        ));
        let update_bad_marker = Wire::tag(b'U').u32(1).u8(b'X').i16(0);
        assert!(matches!(
            decode_error(update_bad_marker.build()),
            DecodeError::UnexpectedByte { found: b'X', .. }
        ));
        let update_old_without_new = Wire::tag(b'U').u32(1).u8(b'K').i16(0).u8(b'K').i16(0);
        assert!(matches!(
            decode_error(update_old_without_new.build()),
            DecodeError::UnexpectedByte {
                field: Field {
                    name: "new tuple marker",
                    ..
                },
                found: b'K',
                ..
            }
        ));
        let delete_with_new = Wire::tag(b'D').u32(1).u8(b'N').i16(0);
        assert!(matches!(
            decode_error(delete_with_new.build()),
            DecodeError::UnexpectedByte { found: b'N', .. }
        ));
    }

    #[test]
    fn rejects_unknown_replica_identity_setting() {
        let error = decode_error(relation(1, "s", "t", b'x', &[]).build());
        assert!(matches!(
            error,
            DecodeError::UnexpectedByte {
                message: MessageKind::Relation,
                found: b'x',
                ..
            }
        ));
    }

    #[test]
    fn rejects_unknown_flag_bits() {
        let truncate_options = decode_error(truncate(4, &[1]).build());
        assert!(
            matches!(
                truncate_options,
                DecodeError::UnknownFlags {
                    found: 4,
                    known: 3,
                    ..
                }
            ),
            "{truncate_options}"
        );
        let message_flags = decode_error(Wire::tag(b'M').u8(2).lsn(1).string("p").i32(0).build());
        assert!(
            matches!(
                message_flags,
                DecodeError::UnknownFlags {
                    found: 2,
                    known: 1,
                    ..
                }
            ),
            "{message_flags}"
        );
        let column_flags = Wire::tag(b'R')
            .u32(1)
            .string("s")
            .string("t")
            .u8(b'd')
            .i16(1)
            .u8(0x81);
        let column_flags = decode_error(column_flags.string("id").u32(23).i32(-1).build());
        assert!(
            matches!(column_flags, DecodeError::UnknownFlags { found: 0x81, .. }),
            "{column_flags}"
        );
    }

    // -----------------------------------------------------------------------------------------
    // Properties
    // -----------------------------------------------------------------------------------------

    fn tuple_value() -> impl Strategy<Value = TupleValue> {
        prop_oneof![
            Just(TupleValue::Null),
            Just(TupleValue::UnchangedToast),
            proptest::collection::vec(any::<u8>(), 0..16)
                .prop_map(|bytes| TupleValue::Text(bytes.into())),
            proptest::collection::vec(any::<u8>(), 0..16)
                .prop_map(|bytes| TupleValue::Binary(bytes.into())),
        ]
    }

    const TAGS: &[u8] = b"BCORYIUDTM";

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(Bytes::from(bytes));
        }

        #[test]
        fn arbitrary_bodies_after_a_valid_tag_never_panic(
            tag in proptest::sample::select(TAGS),
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut message = vec![tag];
            message.extend(body);
            let _ = decode(Bytes::from(message));
        }

        #[test]
        fn mutated_valid_messages_never_panic(
            fixture_index in 0..13usize,
            position in any::<proptest::sample::Index>(),
            replacement in any::<u8>(),
        ) {
            let fixtures = every_fixture();
            let mut message = fixtures[fixture_index % fixtures.len()].to_vec();
            let position = position.index(message.len());
            message[position] = replacement;
            let _ = decode(Bytes::from(message));
        }

        #[test]
        fn inserts_round_trip(
            relation_oid in any::<u32>(),
            values in proptest::collection::vec(tuple_value(), 0..24),
        ) {
            let expected = Insert { relation_oid, new: Tuple(values.clone()) };
            let decoded = decode(insert(relation_oid, &values).build());
            prop_assert_eq!(decoded, Ok(LogicalMessage::Insert(expected)));
        }
    }
}
