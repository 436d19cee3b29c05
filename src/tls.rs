//! TLS on the feed, both directions, with rustls (through tonic): the origin serves with a
//! certificate and may require client certificates (mTLS); the sidecar verifies the origin
//! against a CA file and may present its own certificate.
//!
//! PEM files are read when a server starts and whenever the feed client dials, so a renewed
//! certificate (cert-manager, a rotated Secret) is picked up by the next connection without a
//! restart.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// A TLS file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `[tls]` of `origin.toml`: serve Feed over TLS.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(
    deny_unknown_fields,
    expecting = "a table tls = { cert = \"...\", key = \"...\" } (client_ca for mTLS)"
)]
pub struct ServerTls {
    /// The origin's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// When set, every client must present a certificate signed by this CA (PEM): mutual TLS.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// `tls` of an `[[origin]]` in `viewcar.toml`: dial the origin over TLS (`https://` address).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(
    deny_unknown_fields,
    expecting = "a table tls = { ca = \"...\" } (cert and key for mTLS)"
)]
pub struct ClientTls {
    /// CA certificate(s) (PEM) the origin's certificate must chain to.
    pub ca: PathBuf,
    /// The sidecar's own certificate chain and key (PEM), for origins that require mTLS.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The name to verify the origin's certificate against, when it is not the address's host.
    #[serde(default)]
    pub domain: Option<String>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

impl ServerTls {
    pub(crate) fn load(&self) -> Result<ServerTlsConfig, TlsError> {
        let identity = Identity::from_pem(
            read("certificate", &self.cert)?,
            read("private key", &self.key)?,
        );
        let mut cfg = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            cfg = cfg
                .client_ca_root(Certificate::from_pem(read("client CA", ca)?))
                .client_auth_optional(false);
        }
        Ok(cfg)
    }

    /// The files named, for checks at config load.
    pub(crate) fn files(&self) -> Vec<(&'static str, &Path)> {
        let mut v = vec![("cert", self.cert.as_path()), ("key", self.key.as_path())];
        if let Some(ca) = &self.client_ca {
            v.push(("client_ca", ca.as_path()));
        }
        v
    }
}

impl ClientTls {
    pub(crate) fn load(&self) -> Result<ClientTlsConfig, TlsError> {
        let mut cfg = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("CA certificate", &self.ca)?));
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            cfg = cfg.identity(Identity::from_pem(
                read("certificate", cert)?,
                read("private key", key)?,
            ));
        }
        if let Some(d) = &self.domain {
            cfg = cfg.domain_name(d.clone());
        }
        Ok(cfg)
    }

    pub(crate) fn files(&self) -> Vec<(&'static str, &Path)> {
        let mut v = vec![("ca", self.ca.as_path())];
        if let Some(c) = &self.cert {
            v.push(("cert", c.as_path()));
        }
        if let Some(k) = &self.key {
            v.push(("key", k.as_path()));
        }
        v
    }
}
