//! TLS of the injector: the serving certificate and key from PEM files (a mounted Secret), re-read when
//! they change (cert-manager or the chart rotating them), and a listener whose handshakes run in their own
//! tasks (bounded in number and time) so a slow client holds up nobody.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::util::{escape_path, io_reason};

/// Most connections open (or in their handshake) at once; more are closed as soon as accepted.
pub const MAX_CONNECTIONS: usize = 256;
/// A TLS handshake not done by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The certificate chain and key files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        format!(
            "--{flag} '{}': cannot read: {}",
            escape_path(path),
            io_reason(&e)
        )
    })
}

/// Load and check the pair. Errors name the flag and the file, never any of its content.
fn load(files: &CertFiles) -> Result<([u8; 32], Arc<CertifiedKey>), String> {
    let cert_pem = read(&files.cert, "tls-cert-file")?;
    let key_pem = read(&files.key, "tls-key-file")?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| {
            format!(
                "--tls-cert-file '{}': not a PEM certificate chain",
                escape_path(&files.cert)
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "--tls-cert-file '{}': no CERTIFICATE in it",
            escape_path(&files.cert)
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        format!(
            "--tls-key-file '{}': no PEM private key (PKCS#8, PKCS#1 or SEC1) in it",
            escape_path(&files.key)
        )
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|_| {
        format!(
            "--tls-key-file '{}': unsupported key type (use RSA, ECDSA P-256/P-384 or Ed25519)",
            escape_path(&files.key)
        )
    })?;
    let certified = CertifiedKey::new(certs, signing);
    if let Err(rustls::Error::InconsistentKeys(_)) = certified.keys_match() {
        return Err(format!(
            "--tls-key-file '{}' is not the key of --tls-cert-file '{}'",
            escape_path(&files.key),
            escape_path(&files.cert)
        ));
    }
    let mut digest = Sha256::new();
    digest.update(&cert_pem);
    digest.update(&key_pem);
    Ok((digest.finalize().into(), Arc::new(certified)))
}

/// Serves the current certificate; [`Reloading::reload`] swaps it when the files changed.
pub struct Reloading {
    files: CertFiles,
    current: RwLock<([u8; 32], Arc<CertifiedKey>)>,
}

impl std::fmt::Debug for Reloading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Reloading {
    pub fn new(files: CertFiles) -> Result<Reloading, String> {
        let current = load(&files)?;
        Ok(Reloading {
            files,
            current: RwLock::new(current),
        })
    }

    /// Re-read the files: `Ok(true)` when they changed and the new pair is served from now on. On an
    /// error the previous pair stays.
    pub fn reload(&self) -> Result<bool, String> {
        let (digest, key) = load(&self.files)?;
        let mut current = self
            .current
            .write()
            .map_err(|_| "the certificate lock is poisoned".to_owned())?;
        if current.0 == digest {
            return Ok(false);
        }
        *current = (digest, key);
        Ok(true)
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.1.clone())
    }
}

/// TLS 1.2 and 1.3 with ring, HTTP/1.1 only (ALPN).
pub fn server_config(resolver: Arc<Reloading>) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A listener handing axum connections whose TLS handshake is done.
pub struct TlsListener {
    rx: mpsc::Receiver<(Conn, SocketAddr)>,
    local: SocketAddr,
}

/// Accept on `tcp` until `cancel`, each handshake in its own task; `failed` counts failed handshakes.
pub fn listen(
    tcp: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    failed: impl Fn() + Send + Sync + 'static,
    cancel: CancellationToken,
) -> io::Result<TlsListener> {
    let local = tcp.local_addr()?;
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let failed = Arc::new(failed);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => break,
                r = tcp.accept() => r,
            };
            let (stream, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!("injector: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!("injector: {MAX_CONNECTIONS} connections open, closing a new one");
                continue;
            };
            let (acceptor, tx, failed) = (acceptor.clone(), tx.clone(), failed.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((Conn { tls, _slot: slot }, addr)).await;
                    }
                    Ok(Err(e)) => {
                        failed();
                        tracing::debug!(%addr, "injector: TLS handshake failed: {e}");
                    }
                    Err(_) => {
                        failed();
                        tracing::debug!(%addr, "injector: TLS handshake timed out");
                    }
                }
            });
        }
    });
    Ok(TlsListener { rx, local })
}

impl axum::serve::Listener for TlsListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop stopped (cancelled): the graceful shutdown ends the server.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// One TLS connection, holding its slot.
pub struct Conn {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}
