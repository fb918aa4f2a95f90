//! PEM files named by the configuration (`server.tls`, `upstream.tls`): certificates and private
//! keys, read at start with errors that name the key and the file.

use std::path::Path;

use anyhow::Context as _;
use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The certificates of the PEM file `path` (configured as `key`); at least one.
pub fn certificates(key: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem =
        std::fs::read(path).with_context(|| format!("{key}: cannot read {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{key}: no PEM certificates in {}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{key}: no certificate in {}",
        path.display()
    );
    Ok(certs)
}

/// The private key (PKCS#8, PKCS#1 or SEC1) of the PEM file `path` (configured as `key`).
pub fn private_key(key: &str, path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem =
        std::fs::read(path).with_context(|| format!("{key}: cannot read {}", path.display()))?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(found) => Ok(found),
        Err(pem::Error::NoItemsFound) => {
            anyhow::bail!("{key}: no private key in {}", path.display())
        }
        Err(e) => {
            Err(anyhow::Error::new(e)
                .context(format!("{key}: unreadable PEM in {}", path.display())))
        }
    }
}
