//! The one rustls client configuration for connections to the upstream (passthrough, metadata,
//! export paging) and to its token endpoint, from `[upstream.tls]`: the CA certificates to trust
//! (`ca_file`, else the system's), the client certificate for mutual TLS (`client_cert`,
//! `client_key`). Hostnames are always verified (rustls' WebPKI verifier; there is no switch).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use hyper_rustls::ConfigBuilderExt as _;
use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::UpstreamTlsConfig;

/// The client configuration (no ALPN: each client sets its own protocols on a copy).
pub fn client_config(tls: &UpstreamTlsConfig) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .context("TLS protocol versions")?;
    let builder = match &tls.ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in load_certs("upstream.tls.ca_file", path)? {
                roots.add(cert).with_context(|| {
                    format!(
                        "upstream.tls.ca_file: a certificate in {} is not a usable CA certificate",
                        path.display()
                    )
                })?;
            }
            builder.with_root_certificates(roots)
        }
        None => builder
            .with_native_roots()
            .context("no system CA certificates: set upstream.tls.ca_file")?,
    };
    let config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(
                load_certs("upstream.tls.client_cert", cert)?,
                load_key("upstream.tls.client_key", key)?,
            )
            .context(
                "upstream.tls.client_cert and client_key do not form a usable certificate and key",
            )?,
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The certificates of a PEM file; at least one. Errors name `key` and the file.
pub fn load_certs(key: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem =
        std::fs::read(path).with_context(|| format!("{key}: cannot read {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{key}: unreadable PEM in {}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{key}: no PEM certificate in {}",
        path.display()
    );
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1). Errors name `key` and the file.
pub fn load_key(key: &str, path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem =
        std::fs::read(path).with_context(|| format!("{key}: cannot read {}", path.display()))?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(found) => Ok(found),
        Err(pem::Error::NoItemsFound) => {
            anyhow::bail!("{key}: no PEM private key in {}", path.display())
        }
        Err(e) => {
            Err(anyhow::Error::new(e)
                .context(format!("{key}: unreadable PEM in {}", path.display())))
        }
    }
}
