//! The shared node handle: the core under one lock, and the executor of its
//! outputs.
//!
//! Every input to the core goes through [`Shared::run`], which locks the
//! core, applies the input, drains the outputs into a list of actions while
//! still holding the lock, and then carries the actions out *after*
//! releasing it. Storage submissions in particular happen outside the lock:
//! a completion may run synchronously and re-enter `run`.
//!
//! Events are the exception: each is built and published while the lock is
//! held (publishing never blocks), so every event shows the state that
//! produced it and events reach readers in the order of the changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{broadcast, oneshot};

use crate::core::{Command, CommandError, IoResult, Node, Output};
use crate::status::{EngineStatus, Status};
use crate::storage::{Done, Op, Storage};

/// How a client request's answer gets back to the waiting NBD task.
pub type Token = oneshot::Sender<IoResult>;

pub struct Inner {
    pub core: Node<Token>,
    commands: HashMap<u64, oneshot::Sender<Result<String, CommandError>>>,
    next_command: u64,
}

pub struct Shared {
    inner: Mutex<Inner>,
    storage: Storage,
    /// The metadata device's storage (the same as `storage` when internal).
    meta: Storage,
    events: broadcast::Sender<String>,
}

enum Action {
    Submit {
        id: u64,
        op: Op,
    },
    WriteMeta {
        seq: u64,
        offset: u64,
        data: Bytes,
    },
    Reply {
        token: Token,
        result: IoResult,
    },
    Command {
        tx: oneshot::Sender<Result<String, CommandError>>,
        result: Result<String, CommandError>,
    },
}

impl Shared {
    pub fn new(core: Node<Token>, storage: Storage, meta: Storage) -> Arc<Shared> {
        let (events, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                core,
                commands: HashMap::new(),
                next_command: 0,
            }),
            storage,
            meta,
            events,
        });
        // Carry out whatever the core queued while attaching.
        shared.run(|_| ());
        shared
    }

    /// Apply one input to the core and carry out what it decides.
    pub fn run<R>(self: &Arc<Self>, f: impl FnOnce(&mut Node<Token>) -> R) -> R {
        let (r, actions) = {
            let mut inner = self.inner.lock().expect("core lock poisoned");
            let r = f(&mut inner.core);
            (r, self.collect(&mut inner))
        };
        for action in actions {
            self.execute(action);
        }
        r
    }

    /// Send an administrator command to the core and wait for its answer.
    pub async fn command(self: &Arc<Self>, command: Command) -> Result<String, CommandError> {
        let (tx, rx) = oneshot::channel();
        let (actions, ()) = {
            let mut inner = self.inner.lock().expect("core lock poisoned");
            let id = inner.next_command;
            inner.next_command += 1;
            inner.commands.insert(id, tx);
            inner.core.handle_command(id, command);
            (self.collect(&mut inner), ())
        };
        for action in actions {
            self.execute(action);
        }
        rx.await.unwrap_or_else(|_| {
            Err(CommandError {
                refused: false,
                message: "repd dropped the command".into(),
            })
        })
    }

    fn collect(&self, inner: &mut Inner) -> Vec<Action> {
        let mut actions = Vec::new();
        while let Some(out) = inner.core.poll_output() {
            actions.push(match out {
                Output::Submit { id, op } => Action::Submit { id, op },
                Output::WriteMeta { seq, offset, data } => Action::WriteMeta { seq, offset, data },
                Output::Reply { token, result } => Action::Reply { token, result },
                Output::CommandDone { id, result } => match inner.commands.remove(&id) {
                    Some(tx) => Action::Command { tx, result },
                    None => continue,
                },
                Output::StateChanged { event } => {
                    // Published under the lock: two threads that each
                    // changed the state cannot publish in the wrong order.
                    let status = inner.core.status(self.engine_status());
                    // No subscriber is not an error.
                    let _ = self.events.send(event_line(event, &status));
                    continue;
                }
            });
        }
        actions
    }

    fn execute(self: &Arc<Self>, action: Action) {
        match action {
            Action::Submit { id, op } => {
                let me = self.clone();
                self.storage.submit(
                    op,
                    Box::new(move |r| me.run(|core| core.handle_local_done(id, r))),
                );
            }
            Action::WriteMeta { seq, offset, data } => {
                let me = self.clone();
                let op = Op::Write {
                    offset,
                    data,
                    fua: true,
                };
                self.meta.submit(
                    op,
                    Box::new(move |r| {
                        me.run(|core| core.handle_meta_written(seq, r.map(|_: Done| ())))
                    }),
                );
            }
            Action::Reply { token, result } => {
                // The NBD task may have gone (client vanished); nothing to do.
                let _ = token.send(result);
            }
            Action::Command { tx, result } => {
                let _ = tx.send(result);
            }
        }
    }

    pub fn engine_status(&self) -> EngineStatus {
        let s = self.storage.stats();
        EngineStatus {
            kind: self.storage.engine_kind().as_str().to_string(),
            direct_io: self.storage.is_direct(),
            fua: self.storage.fua_mode().as_str().to_string(),
            fdatasyncs: s.fdatasyncs,
            dsync_writes: s.dsync_writes,
        }
    }

    pub fn status(self: &Arc<Self>) -> Status {
        let engine = self.engine_status();
        self.run(|core| core.status(engine))
    }

    /// Subscribe to events; the first line is built by the caller from
    /// [`Shared::status`].
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }
}

/// One `repctl events` line: the status object with `event` and a
/// timestamp added.
pub fn event_line(event: &str, status: &Status) -> String {
    let mut value = serde_json::to_value(status).expect("status serialises");
    if let Some(obj) = value.as_object_mut() {
        obj.insert("event".into(), event.into());
        let timestamp = crate::status::rfc3339_utc(std::time::SystemTime::now());
        obj.insert("timestamp".into(), timestamp.into());
    }
    value.to_string()
}
