//! Listening sockets, the accept loops, and clean shutdown.
//!
//! [`NbdServer::start`] binds every configured endpoint (TCP with
//! `TCP_NODELAY`, or a unix socket) and spawns one accept loop per endpoint.
//! Every accepted connection runs as its own task, tracked so that
//! [`NbdServer::shutdown`] can stop accepting, tell every connection to stop
//! reading new requests, and wait until each has answered the requests it
//! already read.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::connection;
use crate::export::Export;

/// An endpoint to listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// An endpoint actually bound (with the real port when 0 was asked for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Per-connection resource limits.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Largest READ or WRITE payload; larger writes close the connection.
    pub max_payload: u32,
    /// Bytes one connection may have buffered in flight: write payloads
    /// and read data until their replies are written (plus a small
    /// per-request charge, so the number of requests is bounded too).
    pub max_buffered_bytes: u32,
    /// A client that has not finished negotiating after this is dropped.
    pub handshake_timeout: Duration,
    /// On shutdown, how long a client may take to read the answers to the
    /// requests it had sent; after that its connection is dropped (the
    /// requests still run to completion, only their answers are lost).
    pub shutdown_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_payload: 32 * 1024 * 1024,
            max_buffered_bytes: 256 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// A running NBD server.
pub struct NbdServer {
    cancel: CancellationToken,
    tracker: TaskTracker,
    bound: Vec<BoundAddr>,
}

impl NbdServer {
    /// Bind every endpoint and start serving `export`. Fails (binding
    /// nothing) if any endpoint cannot be bound.
    pub async fn start<E: Export>(
        export: Arc<E>,
        listens: &[Listen],
        limits: ServerLimits,
    ) -> io::Result<NbdServer> {
        let mut tcp = Vec::new();
        let mut unix = Vec::new();
        let mut bound = Vec::new();
        for listen in listens {
            match listen {
                Listen::Tcp(addr) => {
                    let l = TcpListener::bind(addr).await.map_err(|e| {
                        io::Error::new(e.kind(), format!("cannot listen for NBD on {addr}: {e}"))
                    })?;
                    bound.push(BoundAddr::Tcp(l.local_addr()?));
                    tcp.push(l);
                }
                Listen::Unix(path) => {
                    remove_stale_socket(path)?;
                    let l = UnixListener::bind(path).map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("cannot listen for NBD on unix:{}: {e}", path.display()),
                        )
                    })?;
                    bound.push(BoundAddr::Unix(path.clone()));
                    unix.push(l);
                }
            }
        }
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        for l in tcp {
            let (export, cancel, conns) = (export.clone(), cancel.clone(), tracker.clone());
            tracker.spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        _ = cancel.cancelled() => break,
                        a = l.accept() => a,
                    };
                    match accepted {
                        Ok((stream, peer)) => {
                            if let Err(e) = stream.set_nodelay(true) {
                                warn!("NBD client {peer}: cannot set TCP_NODELAY: {e}");
                            }
                            let (r, w) = stream.into_split();
                            let (export, cancel) = (export.clone(), cancel.clone());
                            let peer = peer.to_string();
                            conns.spawn(connection::serve(r, w, export, limits, cancel, peer));
                        }
                        Err(e) => accept_error(&e).await,
                    }
                }
            });
        }
        for l in unix {
            let (export, cancel, conns) = (export.clone(), cancel.clone(), tracker.clone());
            tracker.spawn(async move {
                let mut n = 0u64;
                loop {
                    let accepted = tokio::select! {
                        _ = cancel.cancelled() => break,
                        a = l.accept() => a,
                    };
                    match accepted {
                        Ok((stream, _)) => {
                            n += 1;
                            let (r, w) = stream.into_split();
                            let (export, cancel) = (export.clone(), cancel.clone());
                            conns.spawn(connection::serve(
                                r,
                                w,
                                export,
                                limits,
                                cancel,
                                format!("unix#{n}"),
                            ));
                        }
                        Err(e) => accept_error(&e).await,
                    }
                }
            });
        }
        Ok(NbdServer {
            cancel,
            tracker,
            bound,
        })
    }

    pub fn bound(&self) -> &[BoundAddr] {
        &self.bound
    }

    /// Stop accepting, let every connection answer what it has read, close
    /// them, and remove unix socket files. A connection stops reading at
    /// once, even mid-request (a request not fully read was never in
    /// flight); a client that does not take its answers within
    /// [`ServerLimits::shutdown_grace`] is disconnected without them.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        for b in &self.bound {
            if let BoundAddr::Unix(path) = b {
                let _ = std::fs::remove_file(path);
            }
        }
        debug!("NBD server stopped");
    }
}

/// Errors from `accept` are per-connection (e.g. the client reset before we
/// accepted) or resource exhaustion (EMFILE); neither may stop the server.
/// Back off briefly so an fd shortage does not spin.
async fn accept_error(e: &io::Error) {
    warn!("NBD accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// A unix socket path left behind by a previous run is removed; any other
/// kind of file there is an error, never deleted.
fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
