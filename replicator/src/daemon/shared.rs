//! The shared node handle: the core under one lock, and the executor of its
//! outputs.
//!
//! Every input to the core goes through [`Shared::run`], which locks the
//! core, applies the input and drains its outputs while still holding the
//! lock. Two kinds of output are carried out right there: messages to the
//! peer (queued on the current link's [`LinkOut`], so they reach the wire
//! in exactly the order the core produced them, and only on the link the
//! core believes is current) and events (so they see the state that
//! produced them). Everything else runs *after* the lock is released, in
//! order, starting with writing the queued messages to the socket (so a
//! replicated write's peer half is on its way before the local half, which
//! the storage may do on this very thread, starts): storage submissions in
//! particular, since a completion may run synchronously and re-enter `run`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tandem_proto::peer::Message;
use tokio::sync::{broadcast, mpsc, oneshot};

use super::link_out::LinkOut;
use crate::core::fencing::Handler;
use crate::core::{Command, CommandError, Device, IoResult, LinkCommand, Node, Output};
use crate::status::{EngineStatus, Status};
use crate::storage::{Op, Storage};
use tracing::{error, info, warn};

thread_local! {
    /// This thread writes queued link messages itself (see
    /// [`Shared::execute_all`]).
    static DIRECT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How a client request's answer gets back to the waiting NBD task.
pub type Token = oneshot::Sender<IoResult>;

pub struct Inner {
    pub core: Node<Token>,
    commands: HashMap<u64, oneshot::Sender<Result<String, CommandError>>>,
    next_command: u64,
    /// The sending side of the link the core is connected over, if any.
    link_tx: Option<(u64, Arc<LinkOut>)>,
}

/// Bytes sent and received on the peer link.
#[derive(Default)]
pub struct NetCounters {
    /// Shared with each link's sending side.
    pub sent: Arc<AtomicU64>,
    pub received: AtomicU64,
}

/// The configured handler programs and their environment.
#[derive(Debug, Clone, Default)]
pub struct Handlers {
    pub fence_peer: Option<std::path::PathBuf>,
    pub split_brain: Option<std::path::PathBuf>,
    /// `TANDEM_RESOURCE`, `TANDEM_NODE`, `TANDEM_PEER`, `TANDEM_PEER_ADDRESS`.
    pub env: Vec<(String, String)>,
}

pub struct Shared {
    inner: Mutex<Inner>,
    handlers: Handlers,
    storage: Storage,
    /// The metadata device's storage (the same as `storage` when internal).
    meta: Storage,
    events: broadcast::Sender<String>,
    link_cmds: mpsc::UnboundedSender<LinkCommand>,
    pub net: NetCounters,
}

enum Action {
    /// Write the messages queued on a link.
    Push(Arc<LinkOut>),
    Submit {
        id: u64,
        device: Device,
        op: Op,
    },
    Reply {
        token: Token,
        result: IoResult,
    },
    Command {
        tx: oneshot::Sender<Result<String, CommandError>>,
        result: Result<String, CommandError>,
    },
    Link(LinkCommand),
    Handler {
        id: u64,
        handler: Handler,
    },
}

impl Shared {
    /// The shared handle, and the receiving end of link commands for the
    /// link manager.
    pub fn new(
        core: Node<Token>,
        storage: Storage,
        meta: Storage,
        handlers: Handlers,
    ) -> (Arc<Shared>, mpsc::UnboundedReceiver<LinkCommand>) {
        let (events, _) = broadcast::channel(1024);
        let (link_cmds, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                core,
                commands: HashMap::new(),
                next_command: 0,
                link_tx: None,
            }),
            handlers,
            storage,
            meta,
            events,
            link_cmds,
            net: NetCounters::default(),
        });
        // Carry out whatever the core queued while attaching.
        shared.run(|_| ());
        (shared, rx)
    }

    /// Apply one input to the core and carry out what it decides.
    pub fn run<R>(self: &Arc<Self>, f: impl FnOnce(&mut Node<Token>) -> R) -> R {
        let (r, actions) = {
            let mut inner = self.inner.lock().expect("core lock poisoned");
            let r = f(&mut inner.core);
            let actions = self.collect(&mut inner);
            (r, actions)
        };
        self.execute_all(actions);
        r
    }

    /// Send an administrator command to the core and wait for its answer.
    pub async fn command(self: &Arc<Self>, command: Command) -> Result<String, CommandError> {
        let (tx, rx) = oneshot::channel();
        let actions = {
            let mut inner = self.inner.lock().expect("core lock poisoned");
            let id = inner.next_command;
            inner.next_command += 1;
            inner.commands.insert(id, tx);
            inner.core.handle_command(id, command);
            self.collect(&mut inner)
        };
        self.execute_all(actions);
        rx.await.unwrap_or_else(|_| {
            Err(CommandError {
                refused: false,
                message: "repd dropped the command".into(),
            })
        })
    }

    /// A link (number `id`) finished its handshake: make it the current one.
    pub fn link_up(self: &Arc<Self>, id: u64, tx: Arc<LinkOut>, version: u16) {
        let actions = {
            let mut inner = self.inner.lock().expect("core lock poisoned");
            inner.link_tx = Some((id, tx));
            inner.core.handle_link_up(version);
            self.collect(&mut inner)
        };
        self.execute_all(actions);
    }

    /// Link `id` ended. Ignored if the core already moved on from it.
    pub fn link_down(self: &Arc<Self>, id: u64, reason: &str) {
        let actions = {
            let mut inner = self.inner.lock().expect("core lock poisoned");
            if inner.link_tx.as_ref().is_none_or(|(cur, _)| *cur != id) {
                return;
            }
            inner.link_tx = None;
            inner.core.handle_link_down(reason);
            self.collect(&mut inner)
        };
        self.execute_all(actions);
    }

    /// A connection failed the link handshake; returns whether the reason
    /// is new since the last refusal (so repeated retries log it once).
    pub fn link_refused(self: &Arc<Self>, reason: &str) -> bool {
        self.run(|core| core.handle_link_refused(reason))
    }

    /// A message from link `id`.
    pub fn peer_message(self: &Arc<Self>, id: u64, msg: Message) {
        let actions = {
            let mut inner = self.inner.lock().expect("core lock poisoned");
            if inner.link_tx.as_ref().is_none_or(|(cur, _)| *cur != id) {
                return; // a message from a link the core already left
            }
            inner.core.handle_peer_message(msg);
            self.collect(&mut inner)
        };
        self.execute_all(actions);
    }

    fn collect(&self, inner: &mut Inner) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut queued = false;
        while let Some(out) = inner.core.poll_output() {
            match out {
                Output::Submit { id, device, op } => {
                    actions.push(Action::Submit { id, device, op })
                }
                Output::Reply { token, result } => actions.push(Action::Reply { token, result }),
                Output::CommandDone { id, result } => {
                    if let Some(tx) = inner.commands.remove(&id) {
                        actions.push(Action::Command { tx, result });
                    }
                }
                Output::Send(msg) => {
                    // In order, under the lock, to the current link only.
                    if let Some((_, out)) = &inner.link_tx {
                        out.queue(msg);
                        if !queued {
                            // Written first thing once the lock is let go:
                            // the peer's half of a write or FLUSH starts
                            // before a local half that may run, blocking,
                            // on this thread (`tandem_nbd::inline`), so the
                            // two run in parallel, not in series.
                            actions.insert(0, Action::Push(out.clone()));
                            queued = true;
                        }
                    }
                }
                Output::Link(cmd) => {
                    if matches!(cmd, LinkCommand::StandAlone | LinkCommand::Drop(_)) {
                        inner.link_tx = None;
                    }
                    actions.push(Action::Link(cmd));
                }
                Output::RunHandler { id, handler } => actions.push(Action::Handler { id, handler }),
                Output::StateChanged { event } => {
                    let status = self.status_locked(inner);
                    let _ = self.events.send(event_line(event, &status));
                }
            }
        }
        actions
    }

    /// Carry out `actions` in order. Messages queued on the link are
    /// written from this thread when it runs on behalf of a request that
    /// someone waits for alone (the NBD connection's or the link reader's
    /// [`tandem_nbd::inline`] hint, seen at the outermost call on this
    /// thread; what runs inline beneath it inherits it): the
    /// acknowledgement or the peer's half leaves without waking another
    /// thread. Otherwise (a run of requests, completions on an engine
    /// thread) the link's writer task is woken and writes them together:
    /// one `writev` per run, not one per message, which at queue depth 32
    /// would swamp the loopback with small segments (docs/benchmarks.md).
    fn execute_all(self: &Arc<Self>, actions: Vec<Action>) {
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                DIRECT.set(self.0);
            }
        }
        let outer = DIRECT.get();
        let _restore = Restore(outer);
        DIRECT.set(outer || tandem_nbd::inline::allowed());
        for action in actions {
            self.execute(action);
        }
    }

    fn execute(self: &Arc<Self>, action: Action) {
        match action {
            Action::Push(out) => {
                if DIRECT.get() {
                    out.push()
                } else {
                    out.kick()
                }
            }
            Action::Submit { id, device, op } => {
                let me = self.clone();
                let storage = match device {
                    Device::Data => &self.storage,
                    Device::Meta => &self.meta,
                };
                storage.submit(
                    op,
                    Box::new(move |r| me.run(|core| core.handle_io_done(id, r))),
                );
            }
            Action::Reply { token, result } => {
                // The NBD task may have gone (client vanished); nothing to do.
                let _ = token.send(result);
            }
            Action::Command { tx, result } => {
                let _ = tx.send(result);
            }
            Action::Link(cmd) => {
                let _ = self.link_cmds.send(cmd);
            }
            Action::Handler { id, handler } => self.spawn_handler(id, handler),
        }
    }

    /// Run a handler program; its exit status goes back to the core.
    fn spawn_handler(self: &Arc<Self>, id: u64, handler: Handler) {
        let (path, name) = match handler {
            Handler::FencePeer => (self.handlers.fence_peer.clone(), "fence-peer"),
            Handler::SplitBrain => (self.handlers.split_brain.clone(), "split-brain"),
        };
        let Some(path) = path else {
            if handler == Handler::FencePeer {
                warn!(
                    "no fence-peer handler is configured ([handlers] fence-peer): fencing cannot be confirmed automatically"
                );
            }
            self.run(|core| core.handle_handler_exit(id, None));
            return;
        };
        let me = self.clone();
        let env = self.handlers.env.clone();
        tokio::spawn(async move {
            info!("running the {name} handler {}", path.display());
            let status = tokio::process::Command::new(&path)
                .envs(env)
                .stdin(std::process::Stdio::null())
                .status()
                .await;
            let code = match &status {
                Ok(s) => {
                    info!("the {name} handler exited with {s}");
                    s.code()
                }
                Err(e) => {
                    error!("cannot run the {name} handler {}: {e}", path.display());
                    None
                }
            };
            me.run(|core| core.handle_handler_exit(id, code));
        });
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

    fn status_locked(&self, inner: &Inner) -> Status {
        // The resync rate and ETA come from the core, which samples the
        // progress on every tick (`Node::handle_tick`).
        let mut status = inner.core.status(self.engine_status());
        status.counters.net_sent_bytes = self.net.sent.load(Ordering::Relaxed);
        status.counters.net_received_bytes = self.net.received.load(Ordering::Relaxed);
        status
    }

    /// Feed the core its clock, forever (until `cancel`): a tick earns a
    /// capped resync its credit and samples the progress. Returns when
    /// cancelled.
    pub async fn tick(self: &Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        let origin = Instant::now();
        loop {
            let now = origin.elapsed().as_nanos() as u64;
            let next = self.run(|core| {
                core.handle_tick(now);
                core.tick_interval()
            });
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(next) => {}
            }
        }
    }

    pub fn status(self: &Arc<Self>) -> Status {
        let inner = self.inner.lock().expect("core lock poisoned");
        self.status_locked(&inner)
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
