//! TLS to Postgres with libpq's `sslmode` meanings (`database.sslmode`, `database.ssl_root_cert`).
//!
//! Both kinds of connection use rustls with the same roots: tokio-postgres through
//! [`connector`], the replication stream through pgwire-replication's own rustls client
//! ([`replication`]). Without `ssl_root_cert`, verification uses the Mozilla roots
//! (webpki-roots), as pgwire-replication does, so both connections accept the same servers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{DatabaseConfig, PgSslMode};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    ReadRootCert { path: PathBuf, reason: String },
    #[error("{path} holds no usable CA certificate")]
    NoRootCert { path: PathBuf },
    #[error("cannot set up TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot set up certificate verification: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// The CA certificates in a PEM file; an error when it cannot be read or holds none.
pub fn load_root_certs(path: &Path) -> Result<RootCertStore, TlsError> {
    let read_error = |e: &dyn std::fmt::Display| TlsError::ReadRootCert {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_error(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_error(&e))?;
    let mut roots = RootCertStore::empty();
    let (added, _unparsable) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsError::NoRootCert {
            path: path.to_owned(),
        });
    }
    Ok(roots)
}

/// tokio-postgres's own setting: it knows plaintext, "try TLS" and "TLS or nothing"; what a
/// verifying mode checks is the connector's business.
pub fn driver_mode(mode: PgSslMode) -> tokio_postgres::config::SslMode {
    use tokio_postgres::config::SslMode;
    match mode {
        PgSslMode::Disable => SslMode::Disable,
        PgSslMode::Prefer => SslMode::Prefer,
        PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull => SslMode::Require,
    }
}

/// The connector for tokio-postgres connections. Built per connection: connections are few and
/// long-lived, and a rotated `ssl_root_cert` is then picked up by the next reconnect.
pub fn connector(cfg: &DatabaseConfig) -> Result<MakeRustlsConnect, TlsError> {
    // Explicit provider: with several rustls crypto back ends linked in, the process default
    // is ambiguous.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = if cfg.sslmode.verifies() {
        let roots = Arc::new(roots(cfg)?);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider).build()?;
        let verifier: Arc<dyn ServerCertVerifier> = match cfg.sslmode {
            PgSslMode::VerifyCa => Arc::new(ChainOnly(webpki)),
            _ => webpki,
        };
        builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth()
    } else {
        // prefer / require: encryption against passive listeners only, as in libpq.
        let algorithms = provider.signature_verification_algorithms;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(algorithms)))
            .with_no_client_auth()
    };
    Ok(MakeRustlsConnect::new(config))
}

/// The same settings for the replication connection.
pub fn replication(cfg: &DatabaseConfig) -> pgwire_replication::TlsConfig {
    use pgwire_replication::TlsConfig;
    let ca = cfg.ssl_root_cert.clone();
    match cfg.sslmode {
        PgSslMode::Disable => TlsConfig::disabled(),
        PgSslMode::Prefer => TlsConfig {
            mode: pgwire_replication::SslMode::Prefer,
            ..TlsConfig::disabled()
        },
        PgSslMode::Require => TlsConfig::require(),
        PgSslMode::VerifyCa => TlsConfig::verify_ca(ca),
        PgSslMode::VerifyFull => TlsConfig::verify_full(ca),
    }
}

fn roots(cfg: &DatabaseConfig) -> Result<RootCertStore, TlsError> {
    match &cfg.ssl_root_cert {
        Some(path) => load_root_certs(path),
        None => Ok(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        }),
    }
}

/// `verify-ca`: the chain must verify; the name in the certificate may be any.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            // webpki checks the name only after the chain, so these errors mean "trusted, but
            // issued for another name".
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
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` / `require`: any certificate, but the handshake signatures are still checked, so
/// the session key really belongs to whoever presented the certificate.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_root_cert_file_is_a_precise_error() {
        let missing = load_root_certs(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(
            missing.to_string().contains("/nonexistent/ca.pem"),
            "{missing}"
        );
        let empty = tempfile::NamedTempFile::new().unwrap();
        let err = load_root_certs(empty.path()).unwrap_err();
        assert!(matches!(err, TlsError::NoRootCert { .. }), "{err}");
    }

    #[test]
    fn every_mode_builds_a_connector() {
        for mode in [
            PgSslMode::Disable,
            PgSslMode::Prefer,
            PgSslMode::Require,
            PgSslMode::VerifyCa,
            PgSslMode::VerifyFull,
        ] {
            let cfg = DatabaseConfig {
                sslmode: mode,
                ..DatabaseConfig::default()
            };
            connector(&cfg).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
            assert_eq!(
                replication(&cfg).mode.requires_tls(),
                matches!(
                    mode,
                    PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull
                ),
                "{mode:?}"
            );
        }
    }
}
