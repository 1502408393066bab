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
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::connection::{self, Stop};
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
    /// Payload bytes one connection may have buffered in flight (plus a
    /// small per-request charge, so the number of requests is bounded too).
    /// A single request larger than this is let through on its own.
    pub max_buffered_bytes: u32,
    /// A client that has not finished negotiating after this is dropped.
    pub handshake_timeout: Duration,
    /// On shutdown, how long to wait for clients to read the replies to
    /// the requests already executed before dropping them.
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
    stop: Stop,
    shutdown_grace: Duration,
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
        let binding = async {
            for listen in listens {
                match listen {
                    Listen::Tcp(addr) => {
                        let l = TcpListener::bind(addr).await.map_err(|e| {
                            io::Error::new(
                                e.kind(),
                                format!("cannot listen for NBD on {addr}: {e}"),
                            )
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
            io::Result::Ok(())
        };
        if let Err(e) = binding.await {
            // Bind nothing: the listeners close when dropped, and the socket
            // files of unix endpoints bound so far go too.
            remove_socket_files(&bound);
            return Err(e);
        }
        let stop = Stop::default();
        let tracker = TaskTracker::new();
        for l in tcp {
            let (export, stop, conns) = (export.clone(), stop.clone(), tracker.clone());
            tracker.spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        _ = stop.drain.cancelled() => break,
                        a = l.accept() => a,
                    };
                    match accepted {
                        Ok((stream, peer)) => {
                            if let Err(e) = stream.set_nodelay(true) {
                                warn!("NBD client {peer}: cannot set TCP_NODELAY: {e}");
                            }
                            let (r, w) = stream.into_split();
                            let (export, stop) = (export.clone(), stop.clone());
                            let peer = peer.to_string();
                            conns.spawn(connection::serve(r, w, export, limits, stop, peer));
                        }
                        Err(e) => accept_error(&e).await,
                    }
                }
            });
        }
        for l in unix {
            let (export, stop, conns) = (export.clone(), stop.clone(), tracker.clone());
            tracker.spawn(async move {
                let mut n = 0u64;
                loop {
                    let accepted = tokio::select! {
                        _ = stop.drain.cancelled() => break,
                        a = l.accept() => a,
                    };
                    match accepted {
                        Ok((stream, _)) => {
                            n += 1;
                            let (r, w) = stream.into_split();
                            let (export, stop) = (export.clone(), stop.clone());
                            conns.spawn(connection::serve(
                                r,
                                w,
                                export,
                                limits,
                                stop,
                                format!("unix#{n}"),
                            ));
                        }
                        Err(e) => accept_error(&e).await,
                    }
                }
            });
        }
        Ok(NbdServer {
            stop,
            shutdown_grace: limits.shutdown_grace,
            tracker,
            bound,
        })
    }

    pub fn bound(&self) -> &[BoundAddr] {
        &self.bound
    }

    /// Stop accepting, let every connection answer what it has read, close
    /// them, and remove unix socket files.
    pub async fn shutdown(self) {
        self.stop.drain.cancel();
        self.tracker.close();
        if tokio::time::timeout(self.shutdown_grace, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                "NBD clients did not read their replies within {:?}; closing their connections",
                self.shutdown_grace
            );
            self.stop.abandon.cancel();
            self.tracker.wait().await;
        }
        remove_socket_files(&self.bound);
        debug!("NBD server stopped");
    }
}

impl Drop for NbdServer {
    /// Dropped without `shutdown()`: stop every task at once.
    fn drop(&mut self) {
        self.stop.drain.cancel();
        self.stop.abandon.cancel();
    }
}

fn remove_socket_files(bound: &[BoundAddr]) {
    for b in bound {
        if let BoundAddr::Unix(path) = b {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Errors from `accept` are per-connection (e.g. the client reset before we
/// accepted) or resource exhaustion (EMFILE); neither may stop the server.
/// Back off briefly so an fd shortage does not spin.
async fn accept_error(e: &io::Error) {
    warn!("NBD accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// A unix socket path left behind by a previous run is removed; a socket
/// some live server still accepts on (another repd with a clashing `nbd`
/// path) is an error, never taken over; any other kind of file there is an
/// error, never deleted.
fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another server is accepting connections on {}; refusing to take it over",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)
        }
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
