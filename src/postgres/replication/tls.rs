//! TLS for both PostgreSQL connections (the replication client and the metadata connection),
//! with libpq's `sslmode` semantics on rustls:
//!
//! | mode          | encrypted                 | certificate checked                               |
//! |---------------|---------------------------|---------------------------------------------------|
//! | `disable`     | no                        | —                                                 |
//! | `prefer`      | if the server accepts TLS | only the chain, and only when a CA file is given  |
//! | `require`     | yes                       | only the chain, and only when a CA file is given  |
//! | `verify-ca`   | yes                       | chain against the CA file (else the system store) |
//! | `verify-full` | yes                       | chain and host name (an IP literal: an IP SAN)    |
//!
//! As in libpq, giving a CA file to `prefer` or `require` makes them check the chain, and
//! `sslrootcert=system` means the system trust store. Unlike libpq, `prefer` does not retry
//! in plain text when the TLS handshake itself fails: only a server that declines TLS
//! (answers `N` to the SSLRequest) gets a plain-text session.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, IpAddr, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

pub use crate::config::SslMode;

/// libpq's name of a mode, as written in `sslmode=`.
pub fn mode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

/// Parses libpq's `sslmode` value. `allow` (plain text first) is not supported.
pub fn parse_mode(text: &str) -> Option<SslMode> {
    match text {
        "disable" => Some(SslMode::Disable),
        "prefer" => Some(SslMode::Prefer),
        "require" => Some(SslMode::Require),
        "verify-ca" => Some(SslMode::VerifyCa),
        "verify-full" => Some(SslMode::VerifyFull),
        _ => None,
    }
}

/// Whether the connection must fail when the server declines TLS.
pub fn tls_required(mode: SslMode) -> bool {
    matches!(
        mode,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
    )
}

/// `sslrootcert=system`: the system trust store instead of a file.
const SYSTEM_ROOTS: &str = "system";

/// ALPN protocol name PostgreSQL 17+ expects (older servers ignore ALPN).
const ALPN_POSTGRESQL: &[u8] = b"postgresql";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verification {
    /// Encrypted, any certificate (`prefer`/`require` without a CA file).
    Nothing,
    /// The chain must lead to a trusted root; the host name is not checked.
    Chain,
    /// Chain and host name.
    ChainAndHost,
}

fn verification(mode: SslMode, ca_file: Option<&Path>) -> Option<Verification> {
    match mode {
        SslMode::Disable => None,
        SslMode::Prefer | SslMode::Require if ca_file.is_some() => Some(Verification::Chain),
        SslMode::Prefer | SslMode::Require => Some(Verification::Nothing),
        SslMode::VerifyCa => Some(Verification::Chain),
        SslMode::VerifyFull => Some(Verification::ChainAndHost),
    }
}

/// The rustls configuration for `mode`, or `None` when TLS is disabled. Reads the CA file
/// (or the system store) now, so a bad file is reported before any connection is made.
pub fn client_config(
    mode: SslMode,
    ca_file: Option<&Path>,
) -> Result<Option<ClientConfig>, TlsError> {
    let Some(verification) = verification(mode, ca_file) else {
        return Ok(None);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Config(error.to_string()))?;
    let mut config = match verification {
        Verification::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
            .with_no_client_auth(),
        Verification::Chain => {
            let roots = trusted_roots(mode, ca_file)?;
            let chain = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|error| TlsError::Config(error.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly { chain }))
                .with_no_client_auth()
        }
        Verification::ChainAndHost => builder
            .with_root_certificates(trusted_roots(mode, ca_file)?)
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Some(config))
}

/// The name the certificate is checked against (verify-full) and sent as SNI. Modes that do
/// not check the host accept any host text; an unusable one then goes without SNI.
pub fn server_name(host: &str, mode: SslMode) -> Result<ServerName<'static>, TlsError> {
    match ServerName::try_from(host.to_owned()) {
        Ok(name) => Ok(name),
        Err(_) if mode != SslMode::VerifyFull => Ok(ServerName::IpAddress(IpAddr::from(
            std::net::IpAddr::from([127, 0, 0, 1]),
        ))),
        Err(_) => Err(TlsError::InvalidHostName {
            host: host.to_owned(),
        }),
    }
}

fn trusted_roots(mode: SslMode, ca_file: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) if path != Path::new(SYSTEM_ROOTS) => {
            let pem = std::fs::read(path).map_err(|source| TlsError::CaFileUnreadable {
                path: path.to_owned(),
                source,
            })?;
            let invalid = |reason: String| TlsError::CaFileInvalid {
                path: path.to_owned(),
                reason,
            };
            for certificate in CertificateDer::pem_slice_iter(&pem) {
                let certificate = certificate.map_err(|error| invalid(error.to_string()))?;
                roots
                    .add(certificate)
                    .map_err(|error| invalid(error.to_string()))?;
            }
            if roots.is_empty() {
                return Err(invalid("no CERTIFICATE section found".into()));
            }
        }
        _ => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(TlsError::NoTrustedRoots {
                    mode: mode_name(mode),
                });
            }
        }
    }
    Ok(roots)
}

/// `prefer`/`require` without a CA file: encryption without authentication, like libpq. The
/// handshake signature is still verified, so the session is bound to the presented key.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `verify-ca`: the full WebPKI check, except that a certificate issued for another name is
/// accepted. The name is checked last, after the chain, so a name error means a good chain.
#[derive(Debug)]
struct ChainOnly {
    chain: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.chain.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// Where the trust came from, for messages.
fn trust_source(ca_file: Option<&Path>) -> String {
    match ca_file {
        Some(path) if path != Path::new(SYSTEM_ROOTS) => format!("CA file {}", path.display()),
        _ => "the system trust store".into(),
    }
}

/// Turns a rustls failure during the handshake into an error that says what to change.
pub fn handshake_failure(error: &rustls::Error, host: &str, ca_file: Option<&Path>) -> TlsError {
    let host = host.to_owned();
    let reason = error.to_string();
    match error {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => TlsError::WrongHost { host, reason },
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => TlsError::UntrustedCertificate {
            host,
            reason,
            trusted: trust_source(ca_file),
        },
        rustls::Error::InvalidCertificate(_) => TlsError::BadCertificate { host, reason },
        _ => TlsError::Handshake { host, reason },
    }
}

/// Finds the rustls failure (or a declined SSLRequest) behind an I/O or tokio-postgres error.
pub fn find_failure(
    error: &(dyn std::error::Error + 'static),
    host: &str,
    mode: SslMode,
    ca_file: Option<&Path>,
) -> Option<TlsError> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(rustls) = error.downcast_ref::<rustls::Error>() {
            return Some(handshake_failure(rustls, host, ca_file));
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && let Some(rustls) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            return Some(handshake_failure(rustls, host, ca_file));
        }
        // tokio-postgres's words when the server answers `N` and TLS is required.
        if error.to_string() == "server does not support TLS" {
            return Some(TlsError::DeclinedByServer {
                mode: mode_name(mode),
            });
        }
        current = error.source();
    }
    None
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "cannot read postgres.tls.ca_file (sslrootcert) {path}: {source}; point it to the PEM file of the CA that signed the server certificate"
    )]
    CaFileUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "postgres.tls.ca_file (sslrootcert) {path} holds no usable PEM certificate ({reason}); point it to the CA that signed the server certificate"
    )]
    CaFileInvalid { path: PathBuf, reason: String },
    #[error(
        "sslmode={mode} checks the server certificate, but no CA file is set and the system trust store is empty; set postgres.tls.ca_file (sslrootcert) to the CA that signed the server certificate"
    )]
    NoTrustedRoots { mode: &'static str },
    #[error(
        "the server does not accept TLS; sslmode={mode} requires it: turn on ssl in the server's postgresql.conf, or use sslmode=prefer (or disable) if an unencrypted connection is acceptable"
    )]
    DeclinedByServer { mode: &'static str },
    #[error(
        "the server certificate of {host} is not trusted by {trusted} ({reason}); set postgres.tls.ca_file (sslrootcert) to the CA that signed the server certificate"
    )]
    UntrustedCertificate {
        host: String,
        reason: String,
        trusted: String,
    },
    #[error(
        "the server certificate is not valid for host {host} ({reason}); connect with a host name or IP address the certificate names, or use sslmode=verify-ca to check only the chain"
    )]
    WrongHost { host: String, reason: String },
    #[error(
        "the server certificate of {host} is rejected: {reason}; the server needs a valid certificate"
    )]
    BadCertificate { host: String, reason: String },
    #[error("the TLS handshake with {host} failed: {reason}")]
    Handshake { host: String, reason: String },
    #[error(
        "{host} is not a host name or IP address a certificate can name; sslmode=verify-full needs one (or use sslmode=verify-ca)"
    )]
    InvalidHostName { host: String },
    #[error("cannot set up TLS: {0}")]
    Config(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_round_trips_through_its_libpq_name() {
        for mode in [
            SslMode::Disable,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            assert_eq!(parse_mode(mode_name(mode)), Some(mode));
        }
        assert_eq!(parse_mode("allow"), None);
    }

    #[test]
    fn a_ca_file_makes_prefer_and_require_check_the_chain() {
        let ca = Some(Path::new("/ca.pem"));
        assert_eq!(verification(SslMode::Disable, ca), None);
        assert_eq!(
            verification(SslMode::Require, None),
            Some(Verification::Nothing)
        );
        assert_eq!(
            verification(SslMode::Require, ca),
            Some(Verification::Chain)
        );
        assert_eq!(verification(SslMode::Prefer, ca), Some(Verification::Chain));
        assert_eq!(
            verification(SslMode::VerifyFull, None),
            Some(Verification::ChainAndHost)
        );
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let error =
            client_config(SslMode::VerifyFull, Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(matches!(error, TlsError::CaFileUnreadable { .. }));
        assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_rejected() {
        let path =
            std::env::temp_dir().join(format!("walsync-empty-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate\n").expect("write");
        let error = client_config(SslMode::VerifyCa, Some(&path)).unwrap_err();
        std::fs::remove_file(&path).ok();
        assert!(matches!(error, TlsError::CaFileInvalid { .. }), "{error}");
    }

    #[test]
    fn hosts_that_are_not_names_only_fail_verify_full() {
        assert!(server_name("db host", SslMode::Require).is_ok());
        assert!(matches!(
            server_name("db host", SslMode::VerifyFull),
            Err(TlsError::InvalidHostName { .. })
        ));
        assert!(matches!(
            server_name("127.0.0.1", SslMode::VerifyFull),
            Ok(ServerName::IpAddress(_))
        ));
    }
}
