//! Accepting gRPC connections within limits: a cap on connections served at once, bounded TLS
//! handshakes, an idle timeout for connections that send nothing, and an accept loop that backs
//! off (and says so, now and then) when the process runs out of file descriptors instead of
//! spinning on the error.
//!
//! HTTP/2 settings (streams per connection, keep-alive pings) are tonic's; see
//! [`ConnectionLimits`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::shutdown::Shutdown;

/// Limits on connections and on the HTTP/2 streams of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections served at once, per port; beyond it new ones wait in the kernel's accept
    /// queue. Keep it below the open-file limit (`ulimit -n`), less some room for the store.
    pub max_connections: usize,
    /// Streams (calls) open at once on one connection, advertised as HTTP/2
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`; a client opening more gets them refused.
    pub max_concurrent_streams: u32,
    /// A connection that sends nothing (not even an answer to a keep-alive ping) for this long
    /// is closed. Longer than the keep-alive interval, so that a live client is never idle.
    pub idle_timeout: Option<Duration>,
    /// The server pings a connection that has been quiet this long, and closes it if the ping
    /// is not answered within `keepalive_timeout`.
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    /// TLS handshakes in progress at once, so that slow handshakes cannot tie up the port.
    pub max_handshakes: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 10_000,
            // Far more than a client needs (one stream per call or subscription), far fewer
            // than would let one connection hold the server's memory.
            max_concurrent_streams: 1024,
            idle_timeout: Some(Duration::from_secs(5 * 60)),
            keepalive_interval: Some(Duration::from_secs(60)),
            keepalive_timeout: Duration::from_secs(20),
            max_handshakes: 256,
        }
    }
}

/// Connections accepted and not yet taken by the server.
const ACCEPTED_QUEUE: usize = 64;
/// A client has this long to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Waits between accepts while the process has no file descriptor to spare: short enough that
/// service resumes within a fraction of a second, long enough that the loop costs no CPU.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_millis(200));
/// At most one warning per this long about failing accepts or the connection cap.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Accepted cleartext connections, for tonic.
pub fn accept_tcp(
    listener: TcpListener,
    limits: ConnectionLimits,
    shutdown: Shutdown,
    tasks: &TaskTracker,
) -> mpsc::Receiver<Connection<TcpStream>> {
    let (sender, receiver) = mpsc::channel(ACCEPTED_QUEUE);
    tasks.spawn(async move {
        let mut acceptor = Acceptor::new(listener, &limits);
        loop {
            let (tcp, _peer, permit) = tokio::select! {
                accepted = acceptor.next() => accepted,
                () = shutdown.wait() => return,
            };
            if sender
                .send(Connection::new(tcp, permit, limits.idle_timeout))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    receiver
}

/// Accepted and handshaken TLS connections, with their peer address.
pub fn accept_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: ConnectionLimits,
    shutdown: Shutdown,
    tasks: &TaskTracker,
) -> mpsc::Receiver<(Connection<TlsStream<TcpStream>>, SocketAddr)> {
    let (sender, receiver) = mpsc::channel(ACCEPTED_QUEUE);
    let handshake_tasks = tasks.clone();
    tasks.spawn(async move {
        let handshakes = Arc::new(Semaphore::new(limits.max_handshakes.max(1)));
        let mut tcp_acceptor = Acceptor::new(listener, &limits);
        loop {
            // A handshake slot first: while every slot is busy, nothing more is accepted.
            let handshake = tokio::select! {
                permit = handshakes.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                () = shutdown.wait() => return,
            };
            let (tcp, peer, permit) = tokio::select! {
                accepted = tcp_acceptor.next() => accepted,
                () = shutdown.wait() => return,
            };
            let (acceptor, sender) = (acceptor.clone(), sender.clone());
            let idle_timeout = limits.idle_timeout;
            // Each handshake in its own task: a slow client never holds up the others.
            handshake_tasks.spawn(async move {
                let _handshake = handshake;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = sender
                            .send((Connection::new(tls, permit, idle_timeout), peer))
                            .await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    receiver
}

/// The accept half shared by both: a connection permit, then a TCP connection.
struct Acceptor {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    max_connections: usize,
    backoff: Duration,
    failures: Warnings,
    at_cap: Warnings,
}

impl Acceptor {
    fn new(listener: TcpListener, limits: &ConnectionLimits) -> Acceptor {
        let max_connections = limits.max_connections.max(1);
        Acceptor {
            listener,
            permits: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            backoff: BACKOFF.0,
            failures: Warnings::default(),
            at_cap: Warnings::default(),
        }
    }

    async fn next(&mut self) -> (TcpStream, SocketAddr, OwnedSemaphorePermit) {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if let Some(waited) = self.at_cap.due() {
                    warn!(
                        max_connections = self.max_connections,
                        times = waited,
                        "connection limit reached; new connections wait until one closes \
                         (--max-connections)"
                    );
                }
                match self.permits.clone().acquire_owned().await {
                    Ok(permit) => permit,
                    // The semaphore is never closed.
                    Err(_) => std::future::pending().await,
                }
            }
        };
        loop {
            match self.listener.accept().await {
                Ok((tcp, peer)) => {
                    self.backoff = BACKOFF.0;
                    let _ = tcp.set_nodelay(true);
                    return (tcp, peer, permit);
                }
                // The peer gave up before it was accepted: nothing wrong here.
                Err(e) if is_per_connection(&e) => debug!(error = %e, "accept failed"),
                Err(e) => {
                    if let Some(failed) = self.failures.due() {
                        warn!(
                            error = %e,
                            times = failed,
                            "cannot accept connections (out of file descriptors?); retrying \
                             with back-off until some close"
                        );
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(BACKOFF.1);
                }
            }
        }
    }
}

/// Errors that concern one connection only; anything else (EMFILE, ENFILE, ENOBUFS, ENOMEM)
/// concerns the process, and accepting again at once would fail the same way.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Counts occurrences and says when the next warning is due (the first at once, then at most
/// one per [`WARN_EVERY`]) and how many happened since the last.
#[derive(Default)]
struct Warnings {
    last: Option<Instant>,
    count: u64,
}

impl Warnings {
    fn due(&mut self) -> Option<u64> {
        self.count += 1;
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < WARN_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// An accepted connection: holds its place under the connection cap until dropped, and fails
/// its reads once it has sent nothing for the idle timeout (the server then closes it).
pub struct Connection<IO> {
    io: IO,
    _permit: OwnedSemaphorePermit,
    idle: Option<Idle>,
}

struct Idle {
    timeout: Duration,
    last_read: Instant,
    timer: Pin<Box<Sleep>>,
}

impl<IO> Connection<IO> {
    fn new(io: IO, permit: OwnedSemaphorePermit, idle_timeout: Option<Duration>) -> Self {
        Connection {
            io,
            _permit: permit,
            idle: idle_timeout.map(|timeout| Idle {
                timeout,
                last_read: Instant::now(),
                timer: Box::pin(tokio::time::sleep(timeout)),
            }),
        }
    }
}

impl Idle {
    /// Ready with an error once nothing was read for the timeout. The timer is re-armed only
    /// when it fires, not on every read.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            ready!(self.timer.as_mut().poll(cx));
            let deadline = self.last_read + self.timeout;
            if Instant::now() >= deadline {
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle: nothing received within the idle timeout",
                ));
            }
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Connection<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if let Some(idle) = &mut this.idle
                    && buf.filled().len() > before
                {
                    idle.last_read = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match &mut this.idle {
                Some(idle) => match idle.poll_expired(cx) {
                    Poll::Ready(e) => {
                        debug!("closing an idle connection");
                        Poll::Ready(Err(e))
                    }
                    Poll::Pending => Poll::Pending,
                },
                None => Poll::Pending,
            },
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Connection<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: Connected> Connected for Connection<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
