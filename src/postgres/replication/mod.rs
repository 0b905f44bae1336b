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
//! TLS follows libpq's `sslmode` (see [`tls`]): an SSLRequest before the startup message,
//! then rustls; the stream type carries either, and splits the same way.
//!
//! The session pins the settings the type codec relies on (see `postgres::types`), so values
//! streamed here render exactly as the snapshot path renders them.

pub mod frames;
pub mod tls;

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::config::Config;
use crate::lsn::Lsn;
use crate::postgres::types::SESSION_SETTINGS;
use crate::retry::Disposition;
use frames::{Frame, FrameError, ReplicationMessage, ServerError, StatusUpdate};
pub use tls::{SslMode, TlsError};

/// Where and as whom to connect, parsed from a libpq-style URL or key=value string.
#[derive(Clone)]
pub struct ConnectParams {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub application_name: String,
    /// libpq's `sslmode`; `prefer` when the URL does not say.
    pub ssl_mode: SslMode,
    /// libpq's `sslrootcert`: the CA (PEM) the server certificate must chain to, or `system`
    /// for the system trust store (also used by verify-* when this is unset).
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for ConnectParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .field("ssl_mode", &self.ssl_mode)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl ConnectParams {
    /// Parses a libpq URL (`postgres://…?sslmode=verify-full&sslrootcert=/ca.pem`) or
    /// key=value string. `sslmode` and `sslrootcert` are taken out here, because the
    /// tokio-postgres parser knows neither `sslrootcert` nor the verify-* modes.
    pub fn from_url(url: &str) -> Result<Self, ReplicationError> {
        let (rest, tls) = split_tls_params(url)?;
        let config: tokio_postgres::Config = rest.parse().map_err(|e: tokio_postgres::Error| {
            let reason = std::error::Error::source(&e)
                .map(|source| format!("{e}: {source}"))
                .unwrap_or_else(|| e.to_string());
            ReplicationError::Url(reason)
        })?;
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
            ssl_mode: tls.mode.unwrap_or_default(),
            ca_file: tls.root_cert,
        })
    }

    fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// libpq's TLS parameters found in a connection string.
#[derive(Debug, Default, PartialEq, Eq)]
struct TlsParams {
    mode: Option<SslMode>,
    root_cert: Option<PathBuf>,
}

impl TlsParams {
    /// Takes `key=value` if it is a TLS parameter; `false` leaves it to tokio-postgres.
    fn take(&mut self, key: &str, value: &str) -> Result<bool, ReplicationError> {
        match key {
            "sslmode" => {
                self.mode = Some(tls::parse_mode(value).ok_or_else(|| {
                    ReplicationError::Url(format!(
                        "sslmode={value} is not supported; use disable, prefer, require, verify-ca or verify-full"
                    ))
                })?);
                Ok(true)
            }
            "sslrootcert" => {
                self.root_cert = (!value.is_empty()).then(|| PathBuf::from(value));
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// Removes `sslmode` and `sslrootcert` from a URL's query or a key=value string, returning
/// the rest (for tokio-postgres) and their values.
fn split_tls_params(url: &str) -> Result<(String, TlsParams), ReplicationError> {
    let mut tls = TlsParams::default();
    let Some(rest) = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|prefix| url.strip_prefix(prefix))
    else {
        let kept = split_key_values(url, &mut tls)?;
        return Ok((kept, tls));
    };
    // As tokio-postgres reads it: credentials end at the first `@`, the query starts at the
    // next `?`.
    let authority_start = url.len() - rest.len() + rest.find('@').map_or(0, |at| at + 1);
    let Some(question) = url[authority_start..].find('?') else {
        return Ok((url.to_owned(), tls));
    };
    let (base, query) = url.split_at(authority_start + question);
    let mut kept = Vec::new();
    for pair in query[1..].split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !tls.take(&percent_decode(key)?, &percent_decode(value)?)? {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, tls))
}

/// The key=value form (`host=db sslmode='verify-full' …`): values may be single-quoted, with
/// backslash escapes, and `=` may have spaces around it. Returns the other pairs, unchanged.
/// Text that does not parse is left whole for tokio-postgres to report.
fn split_key_values(text: &str, tls: &mut TlsParams) -> Result<String, ReplicationError> {
    let mut kept: Vec<&str> = Vec::new();
    let mut chars = text.char_indices().peekable();
    let skip_spaces = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_spaces(&mut chars);
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        skip_spaces(&mut chars);
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            return Ok(text.to_owned());
        }
        skip_spaces(&mut chars);
        let mut value = String::new();
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut closed = !quoted;
        while let Some(&(_, c)) = chars.peek() {
            if !quoted && c.is_whitespace() {
                break;
            }
            chars.next();
            match c {
                '\\' => match chars.next() {
                    Some((_, escaped)) => value.push(escaped),
                    None => return Ok(text.to_owned()),
                },
                '\'' if quoted => {
                    closed = true;
                    break;
                }
                c => value.push(c),
            }
        }
        if !closed {
            return Ok(text.to_owned());
        }
        let end = chars.peek().map_or(text.len(), |&(index, _)| index);
        if !tls.take(&key, &value)? {
            kept.push(&text[start..end]);
        }
    }
    Ok(kept.join(" "))
}

fn percent_decode(text: &str) -> Result<String, ReplicationError> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let hex = |offset: usize| {
            bytes
                .get(index + offset)
                .and_then(|b| char::from(*b).to_digit(16))
        };
        match (bytes[index], hex(1), hex(2)) {
            (b'%', Some(high), Some(low)) => {
                decoded.push((high * 16 + low) as u8);
                index += 3;
            }
            (byte, _, _) => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8(decoded)
        .map_err(|_| ReplicationError::Url("a URL parameter is not valid UTF-8".into()))
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

/// The connection's byte stream: plain TCP, or TLS over it.
enum PgStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Asks for TLS (SSLRequest) when the mode wants it and runs the handshake if the server
/// agrees; a server that declines gets a plain-text session only under `prefer`.
async fn negotiate_tls(
    mut tcp: TcpStream,
    params: &ConnectParams,
) -> Result<PgStream, ReplicationError> {
    let Some(config) = tls::client_config(params.ssl_mode, params.ca_file.as_deref())? else {
        return Ok(PgStream::Plain(tcp));
    };
    let mut request = BytesMut::with_capacity(8);
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await?;
    // Exactly one byte: whatever follows it before the handshake is unauthenticated and must
    // not be read as protocol (CVE-2021-23222).
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {}
        b'N' if !tls::tls_required(params.ssl_mode) => return Ok(PgStream::Plain(tcp)),
        b'N' => {
            return Err(TlsError::DeclinedByServer {
                mode: tls::mode_name(params.ssl_mode),
            }
            .into());
        }
        b'E' => {
            // A server too old to know SSLRequest answers with an error message.
            let mut buffer = BytesMut::from(&b"E"[..]);
            if let Message::ErrorResponse(body) =
                parse_known(read_frame(&mut tcp, &mut buffer).await?)?
            {
                return Err(ReplicationError::Server(server_error(&body)?));
            }
            return Err(ReplicationError::Protocol(
                "unexpected answer to SSLRequest".into(),
            ));
        }
        other => {
            return Err(ReplicationError::Protocol(format!(
                "the server answered the SSLRequest with byte {other:#04x}"
            )));
        }
    }
    let name = tls::server_name(&params.host, params.ssl_mode)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    match connector.connect(name, tcp).await {
        Ok(stream) => Ok(PgStream::Tls(Box::new(stream))),
        Err(error) => Err(
            match tls::find_failure(
                &error,
                &params.host,
                params.ssl_mode,
                params.ca_file.as_deref(),
            ) {
                Some(failure) => failure.into(),
                None => error.into(),
            },
        ),
    }
}

/// A replication connection before streaming starts.
pub struct ReplicationClient {
    stream: PgStream,
    read_buffer: BytesMut,
    write_buffer: BytesMut,
}

impl ReplicationClient {
    /// Connects (with TLS as `params.ssl_mode` says), authenticates and waits until the
    /// server is ready for commands.
    pub async fn connect(params: &ConnectParams) -> Result<Self, ReplicationError> {
        let tcp = TcpStream::connect(params.address())
            .await
            .map_err(|source| ReplicationError::Connect {
                address: params.address(),
                source,
            })?;
        tcp.set_nodelay(true)?;
        let stream = negotiate_tls(tcp, params).await?;
        let mut client = Self {
            stream,
            read_buffer: BytesMut::with_capacity(64 * 1024),
            write_buffer: BytesMut::with_capacity(1024),
        };
        client.startup(params).await?;
        Ok(client)
    }

    /// Whether the session runs over TLS.
    pub fn is_encrypted(&self) -> bool {
        matches!(self.stream, PgStream::Tls(_))
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
        let (read, write) = tokio::io::split(self.stream);
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
        // TLS buffers records until flushed.
        self.stream.flush().await?;
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
    read: ReadHalf<PgStream>,
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
    write: WriteHalf<PgStream>,
    buffer: BytesMut,
}

impl StatusSender {
    pub async fn send(&mut self, update: StatusUpdate) -> Result<(), ReplicationError> {
        self.buffer.clear();
        update.encode(unix_micros_now(), &mut self.buffer);
        self.write.write_all(&self.buffer).await?;
        self.write.flush().await?;
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
    #[error("PostgreSQL: {0}{hint}", hint = connection_hint(&.0.code))]
    Server(ServerError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the replication connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the replication connection was closed by the server")]
    Closed,
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("unexpected replication protocol exchange: {0}")]
    Protocol(String),
}

/// What to change when the server refuses a connection, by SQLSTATE (empty otherwise).
pub(crate) fn connection_hint(code: &str) -> &'static str {
    match code {
        "28P01" => {
            "; check the password (in postgres.url, postgres.password or postgres.password_file)"
        }
        "28000" => {
            "; pg_hba.conf has no entry that lets this user in from this address with this encryption: add one, or change postgres.tls.mode (sslmode)"
        }
        _ => "",
    }
}

impl ReplicationError {
    /// Whether reconnecting can help, or an operator must act first.
    pub fn disposition(&self) -> Disposition {
        match self {
            Self::Connect { .. } | Self::Io(_) | Self::Closed => Disposition::Retry,
            Self::Server(error) => error.disposition(),
            _ => Disposition::Stop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, TlsParams) {
        split_tls_params(url).expect("valid")
    }

    #[test]
    fn url_form_loses_sslmode_and_sslrootcert_and_keeps_the_rest() {
        let (rest, tls) = split(
            "postgres://u:p%3Fw@db:5433/app?application_name=x&sslmode=verify-full&sslrootcert=/etc/ca%20dir/ca.pem&connect_timeout=5",
        );
        assert_eq!(
            rest,
            "postgres://u:p%3Fw@db:5433/app?application_name=x&connect_timeout=5"
        );
        assert_eq!(tls.mode, Some(SslMode::VerifyFull));
        assert_eq!(tls.root_cert, Some(PathBuf::from("/etc/ca dir/ca.pem")));
    }

    #[test]
    fn url_form_drops_the_question_mark_when_nothing_is_left() {
        let (rest, tls) = split("postgresql://u@db/app?sslmode=verify-ca");
        assert_eq!(rest, "postgresql://u@db/app");
        assert_eq!(tls.mode, Some(SslMode::VerifyCa));
        let (rest, tls) = split("postgres://u@db/app");
        assert_eq!(rest, "postgres://u@db/app");
        assert_eq!(tls, TlsParams::default());
    }

    #[test]
    fn a_question_mark_in_the_credentials_does_not_start_the_query() {
        let (rest, tls) = split("postgres://u:a?b@db/app?sslmode=require");
        assert_eq!(rest, "postgres://u:a?b@db/app");
        assert_eq!(tls.mode, Some(SslMode::Require));
    }

    #[test]
    fn key_value_form_loses_sslmode_and_sslrootcert_quoted_or_not() {
        let (rest, tls) = split(
            "host=db sslmode = verify-full port=5433 sslrootcert='/etc/my ca/it\\'s.pem' user=u",
        );
        assert_eq!(rest, "host=db port=5433 user=u");
        assert_eq!(tls.mode, Some(SslMode::VerifyFull));
        assert_eq!(tls.root_cert, Some(PathBuf::from("/etc/my ca/it's.pem")));
        let (rest, _) = split("password='a b' sslmode=disable dbname=x");
        assert_eq!(rest, "password='a b' dbname=x");
    }

    #[test]
    fn an_unknown_sslmode_is_refused_by_name() {
        let error = split_tls_params("postgres://u@db/app?sslmode=allow").unwrap_err();
        assert!(error.to_string().contains("sslmode=allow"), "{error}");
    }

    #[test]
    fn from_url_reads_tls_settings_in_both_forms_and_defaults_to_prefer() {
        let params = ConnectParams::from_url(
            "postgres://u:pw@localhost:15432/app?sslmode=verify-full&sslrootcert=/ca.pem",
        )
        .expect("URL form");
        assert_eq!(params.ssl_mode, SslMode::VerifyFull);
        assert_eq!(params.ca_file, Some(PathBuf::from("/ca.pem")));
        assert_eq!((params.host.as_str(), params.port), ("localhost", 15432));
        assert_eq!(params.password.as_deref(), Some("pw"));

        let params = ConnectParams::from_url(
            "host=127.0.0.1 user=u dbname=app sslmode=verify-ca sslrootcert=/ca.pem",
        )
        .expect("key=value form");
        assert_eq!(params.ssl_mode, SslMode::VerifyCa);
        assert_eq!(params.ca_file, Some(PathBuf::from("/ca.pem")));
        assert_eq!(params.dbname, "app");

        let params = ConnectParams::from_url("postgres://u@db/app").expect("plain");
        assert_eq!(params.ssl_mode, SslMode::Prefer);
        assert_eq!(params.ca_file, None);
    }

    #[test]
    fn debug_never_shows_the_password() {
        let params =
            ConnectParams::from_url("postgres://u:s3cret@db/app?sslmode=require").expect("valid");
        let text = format!("{params:?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("Require"), "{text}");
    }
}

impl ConnectParams {
    /// The parameters of `config`: `postgres.url`, with the configured password and TLS
    /// settings applied, and the application name `walsync-<slot>`.
    ///
    /// TLS: the URL's `sslmode` and `sslrootcert` come first; `[postgres.tls]` overrides them
    /// where it is set: `mode` when it is not the default (`prefer`), `ca_file` whenever
    /// present. So `mode = "prefer"` in the file cannot weaken a URL's `sslmode=verify-full`.
    pub fn from_config(config: &Config) -> Result<Self, ReplicationError> {
        let mut params = ConnectParams::from_url(&config.postgres.url)?;
        if let Some(password) = &config.postgres.password {
            params.password = Some(password.expose().to_owned());
        }
        let tls = &config.postgres.tls;
        if tls.mode != SslMode::default() {
            params.ssl_mode = tls.mode;
        }
        if let Some(ca_file) = &tls.ca_file {
            params.ca_file = Some(ca_file.clone());
        }
        params.application_name = format!("walsync-{}", config.postgres.slot);
        Ok(params)
    }
}

#[cfg(test)]
mod from_config_tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::Config;

    fn config(url: &str) -> Config {
        let mut config = Config::default();
        config.postgres.url = url.into();
        config
    }

    #[test]
    fn the_urls_tls_settings_apply_when_the_file_leaves_the_defaults() {
        let params = ConnectParams::from_config(&config(
            "postgres://u@db/app?sslmode=verify-full&sslrootcert=/url-ca.pem",
        ))
        .expect("valid");
        assert_eq!(params.ssl_mode, SslMode::VerifyFull);
        assert_eq!(params.ca_file, Some(PathBuf::from("/url-ca.pem")));
    }

    #[test]
    fn postgres_tls_overrides_the_url_where_it_is_set() {
        let mut config = config("postgres://u@db/app?sslmode=require&sslrootcert=/url-ca.pem");
        config.postgres.tls.mode = SslMode::VerifyCa;
        config.postgres.tls.ca_file = Some("/file-ca.pem".into());
        let params = ConnectParams::from_config(&config).expect("valid");
        assert_eq!(params.ssl_mode, SslMode::VerifyCa);
        assert_eq!(params.ca_file, Some(PathBuf::from("/file-ca.pem")));

        let mut config = self::config("postgres://u@db/app?sslmode=disable");
        config.postgres.tls.ca_file = Some("/file-ca.pem".into());
        let params = ConnectParams::from_config(&config).expect("valid");
        assert_eq!(
            params.ssl_mode,
            SslMode::Disable,
            "the default mode keeps the URL's"
        );
    }

    #[test]
    fn without_any_tls_setting_the_mode_is_prefer() {
        let params = ConnectParams::from_config(&config("postgres://u@db/app")).expect("valid");
        assert_eq!(params.ssl_mode, SslMode::Prefer);
        assert_eq!(params.ca_file, None);
    }
}
