//! Authentication methods and TLS modes against the local PostgreSQL, for both connections
//! walsync opens: the replication client and the metadata (catalog) connection.
//!
//! The stack's pg_hba.conf (scripts/stack) gives each test role one method: `walsync_trust`
//! trust, `walsync_md5` md5, `walsync` SCRAM, `walsync_tls` SCRAM over TLS only (plain text
//! rejected), `walsync_norepl` SCRAM without the REPLICATION attribute. Passwords are the role
//! names. The server certificate is for `localhost` and `127.0.0.1`, signed by `PG_TLS_CA`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{stack, unique_name};
use walsync::postgres::catalog::{Catalog, ConnectError};
use walsync::postgres::replication::{
    ConnectParams, ReplicationClient, ReplicationError, SslMode, TlsError,
};

/// A URL to the stack's PostgreSQL as `user` (password = user name unless `None`), on `host`,
/// with extra query parameters.
fn url(user: &str, password: Option<&str>, host: &str, query: &str) -> String {
    let base = ConnectParams::from_url(&stack().pg_url).expect("PG_URL parses");
    let credentials = match password {
        Some(password) => format!("{user}:{password}"),
        None => user.to_owned(),
    };
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!(
        "postgres://{credentials}@{host}:{}/{}{query}",
        base.port, base.dbname
    )
}

fn params(url: &str) -> ConnectParams {
    ConnectParams::from_url(url).expect("test URL parses")
}

fn tls_ca() -> &'static str {
    &stack().pg_tls_ca
}

/// Connects the replication client, runs IDENTIFY_SYSTEM, and returns whether the server
/// reports the session as encrypted.
async fn replication_session(params: &ConnectParams) -> bool {
    let mut client = ReplicationClient::connect(params)
        .await
        .unwrap_or_else(|error| panic!("replication connect as {}: {error}", params.user));
    let identity = client.identify_system().await.expect("IDENTIFY_SYSTEM");
    assert_eq!(identity.database.as_deref(), Some(params.dbname.as_str()));
    // A replication=database connection also runs plain SQL: ask the server about itself.
    let rows = client
        .simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
        .expect("pg_stat_ssl on the replication connection");
    let server_says = rows == vec![vec![Some("t".to_owned())]];
    assert_eq!(
        client.is_encrypted(),
        server_says,
        "client and server disagree about TLS"
    );
    server_says
}

/// Connects the catalog, runs `SELECT 1`, and returns whether the server reports the session
/// as encrypted.
async fn catalog_session(params: &ConnectParams) -> bool {
    let catalog = Catalog::connect(params)
        .await
        .unwrap_or_else(|error| panic!("catalog connect as {}: {error}", params.user));
    let one: i32 = catalog
        .client()
        .query_one("SELECT 1", &[])
        .await
        .expect("SELECT 1")
        .get(0);
    assert_eq!(one, 1);
    catalog
        .client()
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl on the catalog connection")
        .get(0)
}

/// Both clients as `user`, in plain text (sslmode=disable) and with the default mode
/// (prefer, which the stack's TLS-enabled server accepts).
async fn both_clients_with_and_without_tls(user: &str, password: Option<&str>) {
    let plain = params(&url(user, password, "127.0.0.1", "sslmode=disable"));
    assert!(
        !replication_session(&plain).await,
        "{user}: disable is plain"
    );
    assert!(!catalog_session(&plain).await, "{user}: disable is plain");
    let preferred = params(&url(user, password, "127.0.0.1", ""));
    assert_eq!(preferred.ssl_mode, SslMode::Prefer);
    assert!(
        replication_session(&preferred).await,
        "{user}: prefer uses TLS"
    );
    assert!(catalog_session(&preferred).await, "{user}: prefer uses TLS");
}

#[tokio::test]
async fn trust_authentication_needs_no_password() {
    both_clients_with_and_without_tls("walsync_trust", None).await;
}

#[tokio::test]
async fn md5_authentication() {
    both_clients_with_and_without_tls("walsync_md5", Some("walsync_md5")).await;
}

#[tokio::test]
async fn scram_authentication() {
    both_clients_with_and_without_tls("walsync", Some("walsync")).await;
}

#[tokio::test]
async fn verify_full_connects_by_name_and_by_ip_address() {
    for host in ["localhost", "127.0.0.1"] {
        let params = params(&url(
            "walsync_tls",
            Some("walsync_tls"),
            host,
            &format!("sslmode=verify-full&sslrootcert={}", tls_ca()),
        ));
        assert_eq!(params.ssl_mode, SslMode::VerifyFull);
        assert!(replication_session(&params).await, "{host}: encrypted");
        assert!(catalog_session(&params).await, "{host}: encrypted");
    }
}

#[tokio::test]
async fn verify_full_in_key_value_form() {
    let base = ConnectParams::from_url(&stack().pg_url).expect("PG_URL parses");
    let params = params(&format!(
        "host=localhost port={} dbname={} user=walsync_tls password=walsync_tls sslmode=verify-full sslrootcert='{}'",
        base.port,
        base.dbname,
        tls_ca()
    ));
    assert!(replication_session(&params).await);
    assert!(catalog_session(&params).await);
}

#[tokio::test]
async fn verify_ca_checks_the_chain_only() {
    let params = params(&url(
        "walsync_tls",
        Some("walsync_tls"),
        "localhost",
        &format!("sslmode=verify-ca&sslrootcert={}", tls_ca()),
    ));
    assert!(replication_session(&params).await);
    assert!(catalog_session(&params).await);
}

#[tokio::test]
async fn require_encrypts_without_a_ca() {
    let params = params(&url(
        "walsync_tls",
        Some("walsync_tls"),
        "127.0.0.1",
        "sslmode=require",
    ));
    assert_eq!(params.ca_file, None);
    assert!(replication_session(&params).await);
    assert!(catalog_session(&params).await);
}

/// A throwaway self-signed CA that signed nothing the server has.
fn wrong_ca() -> PathBuf {
    let dir = std::env::temp_dir().join(unique_name("walsync-wrong-ca"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cert = dir.join("ca.crt");
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=walsync wrong test CA"])
        .arg("-keyout")
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        status.status.success(),
        "openssl failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    cert
}

fn assert_untrusted(error: &TlsError, ca: &Path) {
    assert!(
        matches!(error, TlsError::UntrustedCertificate { .. }),
        "expected an untrusted certificate, got {error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains(
            "set postgres.tls.ca_file (sslrootcert) to the CA that signed the server certificate"
        ),
        "{message}"
    );
    assert!(
        message.contains(&ca.display().to_string()),
        "names the CA file: {message}"
    );
}

#[tokio::test]
async fn verify_full_with_the_wrong_ca_fails_and_says_what_to_set() {
    let ca = wrong_ca();
    let params = params(&url(
        "walsync_tls",
        Some("walsync_tls"),
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    ));

    let error = ReplicationClient::connect(&params)
        .await
        .err()
        .expect("an untrusted server certificate must fail the replication connection");
    let ReplicationError::Tls(tls) = &error else {
        panic!("expected a TLS error, got {error:?}");
    };
    assert_untrusted(tls, &ca);

    let error = Catalog::connect(&params)
        .await
        .err()
        .expect("an untrusted server certificate must fail the catalog connection");
    let ConnectError::Tls(tls) = &error else {
        panic!("expected a TLS error, got {error:?}");
    };
    assert_untrusted(tls, &ca);
    std::fs::remove_dir_all(ca.parent().expect("temp dir")).ok();
}

#[tokio::test]
async fn a_missing_ca_file_is_named_before_connecting() {
    let params = params(&url(
        "walsync_tls",
        Some("walsync_tls"),
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/walsync-ca.pem",
    ));
    let error = ReplicationClient::connect(&params)
        .await
        .err()
        .expect("fails");
    assert!(
        matches!(
            error,
            ReplicationError::Tls(TlsError::CaFileUnreadable { .. })
        ),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("/nonexistent/walsync-ca.pem"),
        "{error}"
    );
    let error = Catalog::connect(&params).await.err().expect("fails");
    assert!(
        matches!(error, ConnectError::Tls(TlsError::CaFileUnreadable { .. })),
        "{error:?}"
    );
}

#[tokio::test]
async fn plain_text_is_rejected_for_a_tls_only_role() {
    let params = params(&url(
        "walsync_tls",
        Some("walsync_tls"),
        "127.0.0.1",
        "sslmode=disable",
    ));

    let error = ReplicationClient::connect(&params)
        .await
        .err()
        .expect("hostnossl reject");
    let ReplicationError::Server(server) = &error else {
        panic!("expected the server's refusal, got {error:?}");
    };
    assert_eq!(server.code, "28000", "{error}");
    let message = error.to_string();
    assert!(
        message.contains("pg_hba.conf rejects connection") && message.contains("no encryption"),
        "{message}"
    );
    assert!(message.contains("postgres.tls.mode"), "hint: {message}");

    let error = Catalog::connect(&params)
        .await
        .err()
        .expect("hostnossl reject");
    assert_eq!(error.code(), Some("28000"), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("pg_hba.conf rejects connection") && message.contains("no encryption"),
        "{message}"
    );
}

#[tokio::test]
async fn a_wrong_password_fails_the_catalog_with_28p01_and_a_hint() {
    let params = params(&url("walsync", Some("not-the-password"), "127.0.0.1", ""));
    let error = Catalog::connect(&params)
        .await
        .err()
        .expect("authentication must fail");
    assert!(matches!(error, ConnectError::Postgres(_)), "{error:?}");
    assert_eq!(error.code(), Some("28P01"), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("password authentication failed for user \"walsync\""),
        "{message}"
    );
    assert!(message.contains("check the password"), "{message}");
    assert!(
        !message.contains("not-the-password"),
        "the password is never shown: {message}"
    );
}

#[tokio::test]
async fn a_role_without_replication_cannot_open_a_replication_connection() {
    let params = params(&url(
        "walsync_norepl",
        Some("walsync_norepl"),
        "127.0.0.1",
        "",
    ));
    let error = ReplicationClient::connect(&params)
        .await
        .err()
        .expect("no REPLICATION attribute");
    let ReplicationError::Server(server) = &error else {
        panic!("expected the server's refusal, got {error:?}");
    };
    assert_eq!(server.code, "42501", "{error}");
    let catalog = Catalog::connect(&params).await.expect("catalog connects");
    assert!(!catalog.role().await.expect("role").can_replicate());
}

/// A server that declines TLS: answers `N` to the SSLRequest, then hangs up. The counter says
/// how many connections opened with an SSLRequest (checked by the test, not inside the task,
/// where a failed assertion would vanish with the task).
async fn server_declining_tls() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let ssl_requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&ssl_requests);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = [0u8; 8];
            // 80877103: the SSLRequest code.
            if socket.read_exact(&mut request).await.is_ok()
                && request[4..] == 80877103i32.to_be_bytes()
            {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = socket.write_all(b"N").await;
            }
        }
    });
    (port, ssl_requests)
}

#[tokio::test]
async fn required_tls_fails_clearly_when_the_server_declines_it() {
    let (port, ssl_requests) = server_declining_tls().await;
    for (attempt, mode) in ["require", "verify-full"].into_iter().enumerate() {
        let params = params(&format!(
            "postgres://walsync:walsync@127.0.0.1:{port}/walsync?sslmode={mode}&sslrootcert={}",
            tls_ca()
        ));
        let error = ReplicationClient::connect(&params)
            .await
            .err()
            .expect("fails");
        assert!(
            matches!(
                error,
                ReplicationError::Tls(TlsError::DeclinedByServer { .. })
            ),
            "{error:?}"
        );
        assert!(
            error
                .to_string()
                .starts_with("the server does not accept TLS;"),
            "{error}"
        );
        assert!(error.to_string().contains(mode), "{error}");

        let error = Catalog::connect(&params).await.err().expect("fails");
        assert!(
            matches!(error, ConnectError::Tls(TlsError::DeclinedByServer { .. })),
            "{error:?}"
        );
        assert_eq!(
            ssl_requests.load(std::sync::atomic::Ordering::SeqCst),
            2 * (attempt + 1),
            "both clients opened with an SSLRequest"
        );
    }
}

/// A CA and a server certificate it signed for `otherhost` only, made with openssl.
fn ca_and_certificate_for_another_host() -> (PathBuf, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(unique_name("walsync-other-host"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let run = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run openssl");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=other CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=otherhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:otherhost\n").expect("write");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
    (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

/// The words the fake TLS server answers every startup message with.
const FAKE_SERVER_MESSAGE: &str = "fake server: the TLS handshake was accepted";

/// A server that accepts TLS with `certificate`, reads the startup message and answers it
/// with a FATAL error naming [`FAKE_SERVER_MESSAGE`].
async fn fake_tls_server(certificate: &Path, key: &Path) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let chain = CertificateDer::pem_file_iter(certificate)
        .expect("server certificate")
        .collect::<Result<Vec<_>, _>>()
        .expect("server certificate");
    let key = PrivateKeyDer::from_pem_file(key).expect("server key");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 8];
                socket.read_exact(&mut request).await.ok()?;
                socket.write_all(b"S").await.ok()?;
                let mut tls = acceptor.accept(socket).await.ok()?;
                let length = tls.read_i32().await.ok()?;
                let mut startup = vec![0u8; usize::try_from(length).ok()? - 4];
                tls.read_exact(&mut startup).await.ok()?;
                let mut fields = Vec::new();
                for (kind, value) in [
                    (b'S', "FATAL"),
                    (b'V', "FATAL"),
                    (b'C', "08P01"),
                    (b'M', FAKE_SERVER_MESSAGE),
                ] {
                    fields.push(kind);
                    fields.extend_from_slice(value.as_bytes());
                    fields.push(0);
                }
                fields.push(0);
                let mut message = vec![b'E'];
                message.extend_from_slice(&(fields.len() as i32 + 4).to_be_bytes());
                message.extend_from_slice(&fields);
                tls.write_all(&message).await.ok()?;
                tls.flush().await.ok()?;
                tls.shutdown().await.ok()
            });
        }
    });
    port
}

#[tokio::test]
async fn verify_ca_accepts_a_certificate_for_another_name_and_verify_full_does_not() {
    let (ca, certificate, key) = ca_and_certificate_for_another_host();
    let port = fake_tls_server(&certificate, &key).await;
    let url = |mode: &str| {
        format!(
            "postgres://walsync:walsync@127.0.0.1:{port}/walsync?sslmode={mode}&sslrootcert={}",
            ca.display()
        )
    };

    // verify-ca: the chain is good, so the handshake passes and the server's answer arrives.
    let verify_ca = params(&url("verify-ca"));
    let error = ReplicationClient::connect(&verify_ca)
        .await
        .err()
        .expect("the fake server refuses");
    assert!(
        error.to_string().contains(FAKE_SERVER_MESSAGE),
        "handshake passed: {error}"
    );
    let error = Catalog::connect(&verify_ca)
        .await
        .err()
        .expect("the fake server refuses");
    assert!(
        error.to_string().contains(FAKE_SERVER_MESSAGE),
        "handshake passed: {error}"
    );

    // verify-full: the certificate names otherhost, not 127.0.0.1.
    let verify_full = params(&url("verify-full"));
    let error = ReplicationClient::connect(&verify_full)
        .await
        .err()
        .expect("wrong host");
    assert!(
        matches!(error, ReplicationError::Tls(TlsError::WrongHost { .. })),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("sslmode=verify-ca"),
        "says what to do: {error}"
    );
    let error = Catalog::connect(&verify_full)
        .await
        .err()
        .expect("wrong host");
    assert!(
        matches!(error, ConnectError::Tls(TlsError::WrongHost { .. })),
        "{error:?}"
    );
    std::fs::remove_dir_all(ca.parent().expect("temp dir")).ok();
}
