//! TLS for both ports: certificate files read and checked at startup (a missing, unreadable or
//! mismatched file stops startup with a message naming it), then TLS terminated here with
//! rustls for gRPC (ALPN h2) and the admin HTTP port (ALPN http/1.1).
//!
//! `--tls-client-ca` makes the gRPC port require client certificates signed by that CA. The admin
//! port never does: orchestrators probe `/healthz` and `/readyz` without client certificates.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::connections::{Connection, ConnectionLimits, accept_tls};
use crate::shutdown::Shutdown;
use tokio_util::task::TaskTracker;

/// The certificate files of `--tls-cert`, `--tls-key` and `--tls-client-ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read TLS file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS file {path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("TLS key file {path} holds no PEM private key: {reason}")]
    NoKey { path: PathBuf, reason: String },
    #[error("TLS key {key} does not belong to certificate {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS client CA file {path} is not usable: {reason}")]
    ClientCa { path: PathBuf, reason: String },
}

/// The server-side TLS settings of both ports.
#[derive(Clone)]
pub struct Tls {
    grpc: TlsAcceptor,
    admin: TlsAcceptor,
}

impl Tls {
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = read_certificates(&files.cert)?;
        let key =
            PrivateKeyDer::from_pem_slice(&read(&files.key)?).map_err(|e| TlsError::NoKey {
                path: files.key.clone(),
                reason: e.to_string(),
            })?;
        let builder = || {
            ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("the ring provider supports the default protocol versions")
        };
        let mismatch = |e: rustls::Error| TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: e.to_string(),
        };
        let mut admin = builder()
            .with_no_client_auth()
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(mismatch)?;
        admin.alpn_protocols = vec![b"http/1.1".to_vec()];
        let grpc_builder = match &files.client_ca {
            None => builder().with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certificates(path)? {
                    roots.add(cert).map_err(|e| TlsError::ClientCa {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| TlsError::ClientCa {
                            path: path.clone(),
                            reason: e.to_string(),
                        })?;
                builder().with_client_cert_verifier(verifier)
            }
        };
        let mut grpc = grpc_builder
            .with_single_cert(certs, key)
            .map_err(mismatch)?;
        grpc.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Tls {
            grpc: TlsAcceptor::from(Arc::new(grpc)),
            admin: TlsAcceptor::from(Arc::new(admin)),
        })
    }

    /// Connections of the gRPC port, handshaken.
    pub fn accept_grpc(
        &self,
        listener: TcpListener,
        limits: ConnectionLimits,
        shutdown: Shutdown,
        tasks: &TaskTracker,
    ) -> Accepted {
        accept_tls(listener, self.grpc.clone(), limits, shutdown, tasks)
    }

    /// Connections of the admin port, handshaken.
    pub fn accept_admin(
        &self,
        listener: TcpListener,
        limits: ConnectionLimits,
        shutdown: Shutdown,
        tasks: &TaskTracker,
    ) -> Accepted {
        accept_tls(listener, self.admin.clone(), limits, shutdown, tasks)
    }
}

/// Handshaken TLS connections, as they complete (see [`accept_tls`]: bounded handshakes, a
/// connection cap, back-off when out of file descriptors).
pub type Accepted = mpsc::Receiver<(Connection<TlsStream<TcpStream>>, SocketAddr)>;

/// The admin port's TLS connections as an axum listener.
pub struct AdminListener {
    pub accepted: Accepted,
    pub local_addr: SocketAddr,
}

impl axum::serve::Listener for AdminListener {
    type Io = Connection<TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(connection) => connection,
            // The accept loop stopped (shutdown): no more connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}
