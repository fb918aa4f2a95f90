//! The one rustls client configuration for connections to the upstream (passthrough, metadata,
//! export paging) and to its token endpoint, from `[upstream.tls]`: the CA certificates to trust
//! (`ca_file`, else the system's), the client certificate for mutual TLS (`client_cert`,
//! `client_key`). Hostnames are always verified (rustls' WebPKI verifier; there is no switch).

use std::sync::Arc;

use crate::config::UpstreamTlsConfig;
use crate::config::pem::{certificates, private_key};
use anyhow::Context as _;
use hyper_rustls::ConfigBuilderExt as _;

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
            for cert in certificates("upstream.tls.ca_file", path)? {
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
                certificates("upstream.tls.client_cert", cert)?,
                private_key("upstream.tls.client_key", key)?,
            )
            .context(
                "upstream.tls.client_cert and client_key do not form a usable certificate and key",
            )?,
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
