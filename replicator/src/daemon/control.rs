//! The control socket server: answers `repctl` requests.
//!
//! One request per connection. Requests that change state go to the core
//! through [`Shared::command`]; `down` is handed to the daemon's main task,
//! which owns the shutdown sequence. A malformed request gets an error
//! response; it never affects the daemon.
//!
//! Every connection but a `down` waiting for its answer holds the node (and
//! so the disk); [`ControlServer::close`] ends them all, even a client that
//! never sends its request, so that repd can release the disk before it
//! answers `down`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::shared::{Shared, event_line};
use crate::control::{MAX_REQUEST_LINE, Request, Response};
use crate::core::Command;

use super::DownRequest;

pub struct ControlServer {
    path: PathBuf,
    /// The accept loop and every connection but a waiting `down`.
    tasks: TaskTracker,
}

impl ControlServer {
    pub fn bind(
        path: &Path,
        shared: Arc<Shared>,
        down: mpsc::UnboundedSender<DownRequest>,
        cancel: CancellationToken,
    ) -> std::io::Result<ControlServer> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                // A live repd answers on it; a dead one left it behind.
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        format!(
                            "another repd is answering on control socket {}",
                            path.display()
                        ),
                    ));
                }
                std::fs::remove_file(path)?;
            }
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let tasks = TaskTracker::new();
        let conns = tasks.clone();
        tasks.spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = cancel.cancelled() => break,
                    a = listener.accept() => match a {
                        Ok((s, _)) => s,
                        Err(e) => {
                            warn!("control socket accept failed: {e}");
                            continue;
                        }
                    },
                };
                conns.spawn(serve(stream, shared.clone(), down.clone(), cancel.clone()));
            }
        });
        Ok(ControlServer {
            path: path.to_path_buf(),
            tasks,
        })
    }

    /// Wait until the accept loop and every connection have ended (after
    /// the cancellation token given to `bind` was cancelled), so none holds
    /// the node any more. A `down` waiting for its answer is not waited for.
    pub async fn close(self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(
    stream: UnixStream,
    shared: Arc<Shared>,
    down: mpsc::UnboundedSender<DownRequest>,
    cancel: CancellationToken,
) {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r.take(MAX_REQUEST_LINE as u64));
    tokio::select! {
        _ = cancel.cancelled() => return,
        r = reader.read_line(&mut line) => if r.is_err() {
            return;
        },
    }
    let request: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            debug!("bad control request {line:?}: {e}");
            let _ = reply(&mut w, &Response::error(format!("malformed request: {e}"))).await;
            return;
        }
    };
    let response = match request {
        Request::Status => {
            let mut r = Response::ok("");
            r.status = Some(shared.status());
            r
        }
        Request::Primary { force } => {
            from_command(shared.command(Command::Primary { force }).await)
        }
        Request::Secondary => from_command(shared.command(Command::Secondary).await),
        Request::Connect { discard_my_data } => {
            from_command(shared.command(Command::Connect { discard_my_data }).await)
        }
        Request::Disconnect => from_command(shared.command(Command::Disconnect).await),
        Request::Invalidate => from_command(shared.command(Command::Invalidate).await),
        Request::FenceConfirm => from_command(shared.command(Command::FenceConfirm).await),
        Request::Verify => from_command(shared.command(Command::Verify).await),
        Request::Adjust {
            resync_rate,
            max_buffers,
        } => from_command(
            shared
                .command(Command::Adjust {
                    resync_rate,
                    max_buffers,
                })
                .await,
        ),
        Request::NewCurrentUuid { clear_bitmap } => from_command(
            shared
                .command(Command::NewCurrentUuid { clear_bitmap })
                .await,
        ),
        Request::Down => {
            let (reply, answer) = oneshot::channel();
            let (written_tx, written) = oneshot::channel();
            if down.send(DownRequest { reply, written }).is_err() {
                Response::ok("already stopping")
            } else {
                // The answer comes once the disk is released: wait for it
                // outside the tracked tasks, without holding the node.
                drop(shared);
                tokio::spawn(async move {
                    let response = answer.await.unwrap_or_else(|_| Response::ok("stopped"));
                    let _ = self::reply(&mut w, &response).await;
                    let _ = written_tx.send(());
                });
                return;
            }
        }
        Request::Events => {
            stream_events(&mut w, &shared, cancel).await;
            return;
        }
    };
    let _ = reply(&mut w, &response).await;
}

fn from_command(r: Result<String, crate::core::CommandError>) -> Response {
    match r {
        Ok(msg) => Response::ok(msg),
        Err(e) if e.refused => Response::refused(e.message),
        Err(e) => Response::error(e.message),
    }
}

async fn reply<W: AsyncWriteExt + Unpin>(w: &mut W, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_string(response).expect("response serialises");
    line.push('\n');
    w.write_all(line.as_bytes()).await
}

/// Send the current state, then every change, until the client leaves or
/// the daemon stops.
async fn stream_events<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    shared: &Arc<Shared>,
    cancel: CancellationToken,
) {
    // Subscribe before taking the first snapshot so no change is missed.
    let mut rx = shared.subscribe();
    let first = event_line("current", &shared.status());
    if w.write_all(format!("{first}\n").as_bytes()).await.is_err() {
        return;
    }
    loop {
        let line = tokio::select! {
            _ = cancel.cancelled() => return,
            r = rx.recv() => match r {
                Ok(line) => line,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    // Too slow a reader: say so, then go on with fresh state.
                    warn!("an events reader fell {n} events behind");
                    event_line("lagged", &shared.status())
                }
                Err(_) => return,
            },
        };
        if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
            return;
        }
    }
}
