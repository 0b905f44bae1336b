//! The replication protocol client, built on `postgres-protocol` because upstream
//! `tokio-postgres` has no replication mode.
//!
//! Owns the replication connection (startup with `replication=database`, authentication by
//! trust, cleartext, md5 or SCRAM-SHA-256), replication commands (IDENTIFY_SYSTEM,
//! CREATE_REPLICATION_SLOT, START_REPLICATION) and the CopyBoth stream. Once streaming starts
//! the connection splits in two: a [`ReplicationStream`] that is read only when the pipeline
//! has room, and a [`StatusSender`] that keeps sending standby status updates whatever the
//! reader is doing, so a back-pressured pipeline never looks dead to the walsender.
//!
//! The session pins the settings the type codec relies on (see `postgres::types`), so values
//! streamed here render exactly as the snapshot path renders them.

pub mod frames;

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::postgres::lsn::Lsn;
use crate::postgres::types::SESSION_SETTINGS;
use frames::{ErrorAction, Frame, FrameError, ReplicationMessage, ServerError, StatusUpdate};

/// Where and as whom to connect, parsed from a libpq-style URL or key=value string.
#[derive(Clone)]
pub struct ConnectParams {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub application_name: String,
}

impl std::fmt::Debug for ConnectParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .finish()
    }
}

impl ConnectParams {
    pub fn from_url(url: &str) -> Result<Self, ReplicationError> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| ReplicationError::Url(format!("{e}")))?;
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            Some(_) => {
                return Err(ReplicationError::Url(
                    "Unix sockets are not supported for replication; use host=…".into(),
                ));
            }
            None => "localhost".into(),
        };
        let user = config
            .get_user()
            .ok_or_else(|| ReplicationError::Url("the URL names no user".into()))?
            .to_owned();
        let password = config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        Ok(Self {
            host,
            port: config.get_ports().first().copied().unwrap_or(5432),
            dbname: config.get_dbname().unwrap_or(&user).to_owned(),
            user,
            password,
            application_name: config
                .get_application_name()
                .unwrap_or("walsync")
                .to_owned(),
        })
    }

    fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// The result of IDENTIFY_SYSTEM: which cluster history the LSNs belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    pub xlog_position: Lsn,
    pub database: Option<String>,
}

/// A slot created by CREATE_REPLICATION_SLOT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    pub name: String,
    /// The slot's consistent point `cp`: snapshot rows are versioned at `cp − 1`.
    pub consistent_point: Lsn,
    /// The exported snapshot, usable while this connection stays idle.
    pub snapshot_name: Option<String>,
}

/// Whether CREATE_REPLICATION_SLOT exports a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotSnapshot {
    Export,
    NoExport,
}

/// One row of a simple query's result, in text form.
pub type TextRow = Vec<Option<String>>;

/// A replication connection before streaming starts.
pub struct ReplicationClient {
    stream: TcpStream,
    read_buffer: BytesMut,
    write_buffer: BytesMut,
}

impl ReplicationClient {
    /// Connects, authenticates and waits until the server is ready for commands.
    pub async fn connect(params: &ConnectParams) -> Result<Self, ReplicationError> {
        let stream = TcpStream::connect(params.address())
            .await
            .map_err(|source| ReplicationError::Connect {
                address: params.address(),
                source,
            })?;
        stream.set_nodelay(true)?;
        let mut client = Self {
            stream,
            read_buffer: BytesMut::with_capacity(64 * 1024),
            write_buffer: BytesMut::with_capacity(1024),
        };
        client.startup(params).await?;
        Ok(client)
    }

    async fn startup(&mut self, params: &ConnectParams) -> Result<(), ReplicationError> {
        let options: String = SESSION_SETTINGS
            .iter()
            .map(|(name, value)| format!("-c {name}={value} "))
            .collect();
        let startup = [
            ("user", params.user.as_str()),
            ("database", params.dbname.as_str()),
            ("replication", "database"),
            ("application_name", params.application_name.as_str()),
            ("client_encoding", "UTF8"),
            ("options", options.trim_end()),
        ];
        frontend::startup_message(startup.iter().copied(), &mut self.write_buffer)?;
        self.flush().await?;
        self.authenticate(params).await?;
        self.wait_until_ready().await
    }

    async fn authenticate(&mut self, params: &ConnectParams) -> Result<(), ReplicationError> {
        let password = || {
            params
                .password
                .as_deref()
                .map(str::as_bytes)
                .ok_or_else(|| ReplicationError::PasswordRequired {
                    user: params.user.clone(),
                })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.read_message().await? {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?, &mut self.write_buffer)?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        params.user.as_bytes(),
                        password()?,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write_buffer)?;
                }
                Message::AuthenticationSasl(body) => {
                    let mechanisms: Vec<String> = body
                        .mechanisms()
                        .map(|m| Ok(m.to_owned()))
                        .collect()
                        .map_err(ReplicationError::Io)?;
                    if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                        return Err(ReplicationError::UnsupportedAuth(mechanisms.join(", ")));
                    }
                    let state = ScramSha256::new(password()?, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        SCRAM_SHA_256,
                        state.message(),
                        &mut self.write_buffer,
                    )?;
                    scram = Some(state);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let state = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL continue before SASL start".into())
                    })?;
                    state.update(body.data())?;
                    frontend::sasl_response(state.message(), &mut self.write_buffer)?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let state = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL final before SASL start".into())
                    })?;
                    state.finish(body.data())?;
                    continue;
                }
                Message::ErrorResponse(body) => {
                    return Err(ReplicationError::Server(server_error(&body)?));
                }
                _ => {
                    return Err(ReplicationError::UnsupportedAuth(
                        "GSS, SSPI or Kerberos".into(),
                    ));
                }
            }
            self.flush().await?;
        }
    }

    async fn wait_until_ready(&mut self) -> Result<(), ReplicationError> {
        loop {
            match self.read_message().await? {
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => {
                    return Err(ReplicationError::Server(server_error(&body)?));
                }
                _ => {}
            }
        }
    }

    /// Runs one command with the simple query protocol and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<TextRow>, ReplicationError> {
        frontend::query(sql, &mut self.write_buffer)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut failure = None;
        loop {
            match self.read_message().await? {
                Message::DataRow(row) => rows.push(text_row(&row)?),
                Message::ErrorResponse(body) => failure = Some(server_error(&body)?),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match failure {
            Some(error) => Err(ReplicationError::Server(error)),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = single_row(rows, "IDENTIFY_SYSTEM")?;
        Ok(SystemIdentity {
            system_id: column(&row, 0, "systemid")?,
            timeline: column(&row, 1, "timeline")?
                .parse()
                .map_err(|_| ReplicationError::Protocol("timeline is not a number".into()))?,
            xlog_position: parse_lsn(&column(&row, 2, "xlogpos")?)?,
            database: row.get(3).cloned().flatten(),
        })
    }

    /// Creates a logical slot for pgoutput, optionally exporting its snapshot.
    pub async fn create_logical_slot(
        &mut self,
        name: &str,
        temporary: bool,
        snapshot: SlotSnapshot,
    ) -> Result<CreatedSlot, ReplicationError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} {}LOGICAL pgoutput {}",
            quote_identifier(name),
            if temporary { "TEMPORARY " } else { "" },
            match snapshot {
                SlotSnapshot::Export => "EXPORT_SNAPSHOT",
                SlotSnapshot::NoExport => "NOEXPORT_SNAPSHOT",
            }
        );
        let row = single_row(self.simple_query(&sql).await?, "CREATE_REPLICATION_SLOT")?;
        Ok(CreatedSlot {
            name: column(&row, 0, "slot_name")?,
            consistent_point: parse_lsn(&column(&row, 1, "consistent_point")?)?,
            snapshot_name: row.get(2).cloned().flatten(),
        })
    }

    /// Starts streaming pgoutput (protocol 1, logical decoding messages on) from `start`.
    /// Returns the reading half and the status-update half of the connection.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<(ReplicationStream, StatusSender), ReplicationError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} (proto_version '1', publication_names {}, messages 'true')",
            quote_identifier(slot),
            quote_literal(&quote_identifier(publication)),
        );
        frontend::query(&sql, &mut self.write_buffer)?;
        self.flush().await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'W' => break,
                b'E' => {
                    let message = parse_known(frame)?;
                    if let Message::ErrorResponse(body) = message {
                        return Err(ReplicationError::Server(server_error(&body)?));
                    }
                }
                b'N' | b'S' => {}
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "START_REPLICATION answered with '{}' instead of CopyBothResponse",
                        char::from(other)
                    )));
                }
            }
        }
        let (read, write) = self.stream.into_split();
        Ok((
            ReplicationStream {
                read,
                buffer: self.read_buffer,
            },
            StatusSender {
                write,
                buffer: BytesMut::with_capacity(64),
            },
        ))
    }

    async fn flush(&mut self) -> Result<(), ReplicationError> {
        self.stream.write_all(&self.write_buffer).await?;
        self.write_buffer.clear();
        Ok(())
    }

    async fn read_frame(&mut self) -> Result<Frame, ReplicationError> {
        read_frame(&mut self.stream, &mut self.read_buffer).await
    }

    async fn read_message(&mut self) -> Result<Message, ReplicationError> {
        let frame = self.read_frame().await?;
        parse_known(frame)
    }
}

async fn read_frame<R: AsyncReadExt + Unpin>(
    reader: &mut R,
    buffer: &mut BytesMut,
) -> Result<Frame, ReplicationError> {
    loop {
        if let Some(frame) = frames::split_frame(buffer)? {
            return Ok(frame);
        }
        if buffer.capacity() - buffer.len() < 8 * 1024 {
            buffer.reserve(64 * 1024);
        }
        if reader.read_buf(buffer).await? == 0 {
            return Err(ReplicationError::Closed);
        }
    }
}

/// Hands a frame `postgres-protocol` knows to its parser.
fn parse_known(frame: Frame) -> Result<Message, ReplicationError> {
    let mut bytes = BytesMut::with_capacity(frame.body.len() + 5);
    bytes.extend_from_slice(&[frame.tag]);
    bytes.extend_from_slice(&(frame.body.len() as i32 + 4).to_be_bytes());
    bytes.extend_from_slice(&frame.body);
    Message::parse(&mut bytes)?.ok_or_else(|| ReplicationError::Protocol("incomplete frame".into()))
}

fn server_error(
    body: &postgres_protocol::message::backend::ErrorResponseBody,
) -> Result<ServerError, ReplicationError> {
    let fields: Vec<(u8, Vec<u8>)> = body
        .fields()
        .map(|field| Ok((field.type_(), field.value_bytes().to_vec())))
        .collect()?;
    Ok(ServerError::from_fields(
        fields.iter().map(|(kind, value)| (*kind, value.as_slice())),
    ))
}

fn text_row(
    row: &postgres_protocol::message::backend::DataRowBody,
) -> Result<TextRow, ReplicationError> {
    let buffer = row.buffer();
    row.ranges()
        .map(|range| Ok(range.map(|range| String::from_utf8_lossy(&buffer[range]).into_owned())))
        .collect()
        .map_err(ReplicationError::Io)
}

fn single_row(mut rows: Vec<TextRow>, command: &str) -> Result<TextRow, ReplicationError> {
    if rows.len() != 1 {
        return Err(ReplicationError::Protocol(format!(
            "{command} returned {} rows instead of one",
            rows.len()
        )));
    }
    Ok(rows.remove(0))
}

fn column(row: &TextRow, index: usize, name: &str) -> Result<String, ReplicationError> {
    row.get(index)
        .cloned()
        .flatten()
        .ok_or_else(|| ReplicationError::Protocol(format!("column {name} is missing or null")))
}

fn parse_lsn(text: &str) -> Result<Lsn, ReplicationError> {
    text.parse()
        .map_err(|_| ReplicationError::Protocol(format!("`{text}` is not an LSN")))
}

/// Quotes an SQL identifier (slot and publication names come from configuration).
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The reading half of a streaming replication connection.
pub struct ReplicationStream {
    read: OwnedReadHalf,
    buffer: BytesMut,
}

impl ReplicationStream {
    /// The next XLogData or keepalive. Reading nothing leaves the WAL on the server: that is
    /// how back-pressure reaches PostgreSQL.
    pub async fn next(&mut self) -> Result<ReplicationMessage, ReplicationError> {
        loop {
            let frame = read_frame(&mut self.read, &mut self.buffer).await?;
            match frame.tag {
                b'd' => return Ok(frames::parse_copy_data(frame.body)?),
                b'E' => {
                    if let Message::ErrorResponse(body) = parse_known(frame)? {
                        return Err(ReplicationError::Server(server_error(&body)?));
                    }
                }
                b'c' => return Err(ReplicationError::Closed),
                _ => {}
            }
        }
    }
}

/// The writing half: standby status updates, independent of the reader.
pub struct StatusSender {
    write: OwnedWriteHalf,
    buffer: BytesMut,
}

impl StatusSender {
    pub async fn send(&mut self, update: StatusUpdate) -> Result<(), ReplicationError> {
        self.buffer.clear();
        update.encode(unix_micros_now(), &mut self.buffer);
        self.write.write_all(&self.buffer).await?;
        Ok(())
    }
}

fn unix_micros_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(
        "cannot connect to PostgreSQL at {address}: {source}; check postgres.url and that the server listens there"
    )]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("invalid postgres.url: {0}")]
    Url(String),
    #[error(
        "PostgreSQL asked for a password for user {user} but postgres.url has none; add it to the URL or set WALSYNC_POSTGRES__URL"
    )]
    PasswordRequired { user: String },
    #[error(
        "PostgreSQL asked for an authentication method walsync does not support ({0}); use scram-sha-256, md5, password or trust in pg_hba.conf"
    )]
    UnsupportedAuth(String),
    #[error("PostgreSQL: {0}")]
    Server(ServerError),
    #[error("the replication connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the replication connection was closed by the server")]
    Closed,
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("unexpected replication protocol exchange: {0}")]
    Protocol(String),
}

impl ReplicationError {
    /// Whether reconnecting can help, or an operator must act first.
    pub fn action(&self) -> ErrorAction {
        match self {
            Self::Connect { .. } | Self::Io(_) | Self::Closed => ErrorAction::Retry,
            Self::Server(error) => error.action(),
            _ => ErrorAction::Stop,
        }
    }
}
