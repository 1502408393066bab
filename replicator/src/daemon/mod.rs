//! `repd`: one resource on one node.
//!
//! Start-up order: configuration, backing store (locked exclusively),
//! metadata (must exist and belong to this resource and node), memory
//! protections, storage engine, core, control socket, NBD server. A failure
//! at any step is one line on stderr (a JSON object with `--log-format
//! json`) and a non-zero exit; a bad config, disk or metadata prints nothing
//! else.
//!
//! Stop order (SIGTERM, SIGINT or `repctl down`): the NBD server stops
//! accepting and every connection finishes the requests it has read; then
//! the core demotes and writes a clean-shutdown superblock; then the control
//! connections end and the engines drain; then the disk is closed (its lock
//! released); only then is `repctl down` answered, and the process exits 0.
//! So when `repctl down` returns, the disk is free for `repctl create-md`,
//! `dump-md` or a new repd.

mod control;
mod export;
mod link;
mod link_out;
mod logging;
mod memory;
mod shared;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, MetaDisk, NbdListen};
use crate::control::Response;
use crate::core::bitmap::Bitmap;
use crate::core::{Command, Node, NodeParams};
use crate::metadata::offline::{self, MetaLocation};
use crate::storage::{Backing, EngineChoice, IoMode, OpenOptions, Storage, start_engine};
use control::ControlServer;
use export::NodeExport;
use logging::LogFormat;
use shared::Shared;
use tandem_nbd::{Listen, NbdServer, ServerLimits};
use tandem_proto::peer::LinkConfig;

/// `repd --config FILE [--node NAME]`
#[derive(Debug, Parser)]
#[command(
    name = "repd",
    version,
    about = "Tandem replication daemon: runs one resource on one node, in the foreground"
)]
pub struct RepdArgs {
    /// The resource's configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Which [[node]] of the configuration this is (default: the host name,
    /// or the only node).
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Log lines for people (`human`) or machines (`json`), on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Storage engine: io_uring when the kernel allows it, else threads.
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    pub engine: EngineArg,
    /// Backing store access: `direct` (O_DIRECT, no page cache) or
    /// `buffered` (through the page cache; FLUSH does the writeback).
    #[arg(long, value_enum, default_value_t = IoArg::Direct)]
    pub io: IoArg,
    /// Do not mlockall the daemon's memory.
    #[arg(long)]
    pub no_mlock: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineArg {
    Auto,
    IoUring,
    Threads,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoArg {
    Direct,
    Buffered,
}

/// Entry point of the `repd` binary.
pub fn main() -> ExitCode {
    let args = RepdArgs::parse();
    let format = args.log_format;
    logging::init(format);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, in the format the logs are in: a person reads
            // `repd: …`, a machine reading JSON logs gets a JSON object.
            match format {
                LogFormat::Human => eprintln!("repd: {e:#}"),
                LogFormat::Json => error!("{e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn os_random_u64() -> u64 {
    let mut buf = [0u8; 8];
    match std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
    {
        Ok(()) => u64::from_ne_bytes(buf),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
        }
    }
}

pub fn run(args: RepdArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let node = config.node(args.node.as_deref())?.clone();
    let peer = config.peer_of(&node.name).map(|p| p.name.clone());
    memory::tune_allocator();

    let mode = match args.io {
        IoArg::Direct => IoMode::Direct,
        IoArg::Buffered => IoMode::Buffered,
    };
    let backing = Arc::new(
        Backing::open(&node.disk, OpenOptions { mode })
            .with_context(|| format!("cannot open disk {}", node.disk.display()))?,
    );
    let meta_backing = match &node.meta_disk {
        MetaDisk::Internal => backing.clone(),
        MetaDisk::External(path) => Arc::new(
            Backing::open(path, OpenOptions { mode })
                .with_context(|| format!("cannot open meta-disk {}", path.display()))?,
        ),
    };
    let loc = match &node.meta_disk {
        MetaDisk::Internal => MetaLocation::Internal {
            file: backing.file(),
            size: backing.size(),
        },
        MetaDisk::External(_) => MetaLocation::External {
            file: meta_backing.file(),
            meta_size: meta_backing.size(),
            data_size: backing.size(),
        },
    };
    let sb = offline::load(&loc)
        .with_context(|| format!("no usable metadata for disk {}", node.disk.display()))?;
    let bitmap_bytes = offline::read_bitmap(&loc, &sb.layout).context("cannot read the bitmap")?;
    let bitmap = Bitmap::from_bytes(sb.layout.data_blocks(), &bitmap_bytes);
    let al = offline::read_al(&loc, &sb.layout).context("cannot read the activity log")?;
    if sb.resource != config.resource.name || sb.node != node.name {
        bail!(
            "the metadata on {} belongs to resource {:?} node {:?}, but this is resource {:?} node {:?}; check `disk` in {} (or re-create the metadata with `repctl create-md --force`)",
            node.disk.display(),
            sb.resource,
            sb.node,
            config.resource.name,
            node.name,
            args.config.display()
        );
    }

    // Only now that the disk and its metadata are known good: a start that
    // fails on them prints its one error line and nothing else.
    memory::protect(!args.no_mlock);

    let choice = match args.engine {
        EngineArg::Auto => EngineChoice::Auto,
        EngineArg::IoUring => EngineChoice::IoUring,
        EngineArg::Threads => EngineChoice::Threads,
    };
    let engine =
        start_engine(backing.clone(), choice).context("cannot start the storage engine")?;
    let storage = Storage::new(engine, &backing);
    let meta = if Arc::ptr_eq(&backing, &meta_backing) {
        storage.clone()
    } else {
        let engine = start_engine(meta_backing.clone(), choice)
            .context("cannot start the metadata engine")?;
        Storage::new(engine, &meta_backing)
    };
    info!(
        "disk {}: {} bytes of data, {} engine, {}",
        node.disk.display(),
        sb.layout.data_size,
        storage.engine_kind().as_str(),
        if storage.is_direct() {
            "O_DIRECT"
        } else {
            "buffered"
        }
    );

    let params = NodeParams {
        resource: config.resource.name.clone(),
        node: node.name.clone(),
        peer,
        fencing: config.resource.fencing,
        on_io_error: config.disk.on_io_error,
        max_buffers: config.net.max_buffers,
        al_extents: crate::core::activity::DEFAULT_AL_EXTENTS,
        seed: os_random_u64(),
        resync_rate: config.sync.rate,
        verify_alg: config.sync.verify_alg,
    };
    let data_size = sb.layout.data_size;
    let mut env = vec![
        ("TANDEM_RESOURCE".to_string(), config.resource.name.clone()),
        ("TANDEM_NODE".to_string(), node.name.clone()),
    ];
    if let Some(peer) = config.peer_of(&node.name) {
        env.push(("TANDEM_PEER".to_string(), peer.name.clone()));
        env.push(("TANDEM_PEER_ADDRESS".to_string(), peer.address.to_string()));
    }
    let handlers = shared::Handlers {
        fence_peer: config.handlers.fence_peer.clone(),
        split_brain: config.handlers.split_brain.clone(),
        env,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("repd")
        .build()
        .context("cannot start the async runtime")?;
    let stop = runtime.block_on(async {
        let (shared, link_commands) = Shared::new(
            Node::new(params, sb, bitmap, al),
            storage.clone(),
            meta.clone(),
            handlers,
        );
        serve(&config, &node, shared, link_commands, data_size).await
    });
    // `serve` has let go of the node; once the engines have drained, these
    // are the last handles on the disk.
    storage.shutdown();
    meta.shutdown();
    drop((storage, meta, meta_backing));
    match Arc::try_unwrap(backing) {
        Ok(backing) => drop(backing),
        Err(_) => warn!("the disk is still in use inside repd; it is released when repd exits"),
    }
    let stop = stop?;
    let response = match &stop.result {
        Ok(_) => Response::ok("stopped"),
        Err(e) => Response::error(e.message.clone()),
    };
    for d in stop.downs {
        runtime.block_on(d.respond(response.clone()));
    }
    stop.result
        .map(drop)
        .map_err(|e| anyhow::anyhow!(e.message))
}

/// How `serve` ended: the clean stop's result, and every `repctl down`
/// that asked for it, answered once the disk is released.
struct Stop {
    result: Result<String, crate::core::CommandError>,
    downs: Vec<DownRequest>,
}

async fn serve(
    config: &Config,
    node: &crate::config::NodeConfig,
    shared: Arc<Shared>,
    link_commands: mpsc::UnboundedReceiver<crate::core::LinkCommand>,
    data_size: u64,
) -> anyhow::Result<Stop> {
    let cancel = CancellationToken::new();
    let link_task = match config.peer_of(&node.name) {
        Some(peer) => {
            let settings = link::LinkSettings {
                listen: node.address,
                peer_addr: peer.address,
                link: LinkConfig {
                    resource: config.resource.name.clone(),
                    node: node.name.clone(),
                    peer: peer.name.clone(),
                    size: data_size,
                    secret: config
                        .resource
                        .shared_secret
                        .as_ref()
                        .map(|s| s.as_bytes().to_vec()),
                },
                ping_interval: config.net.ping_interval,
                ping_timeout: config.net.ping_timeout,
                connect_retry: config.net.connect_retry,
            };
            Some(link::start(shared.clone(), settings, link_commands, cancel.clone()).await?)
        }
        None => None,
    };
    // The core's clock: resync rate credit and progress samples.
    let ticker = tokio::spawn({
        let shared = shared.clone();
        let cancel = cancel.clone();
        async move { shared.tick(cancel).await }
    });
    let (down_tx, mut down_rx) = mpsc::unbounded_channel();
    let control = ControlServer::bind(&node.control, shared.clone(), down_tx, cancel.clone())
        .with_context(|| format!("cannot open control socket {}", node.control.display()))?;
    let listen = match &node.nbd {
        NbdListen::Tcp(addr) => Listen::Tcp(*addr),
        NbdListen::Unix(path) => Listen::Unix(path.clone()),
    };
    let export = Arc::new(NodeExport::new(
        shared.clone(),
        &config.resource.name,
        &node.name,
    ));
    let nbd = NbdServer::start(export, &[listen], ServerLimits::default()).await?;
    info!(
        "repd {} of resource {} ready: NBD on {:?}, control on {}",
        node.name,
        config.resource.name,
        nbd.bound(),
        node.control.display()
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let first = tokio::select! {
        _ = term.recv() => { info!("SIGTERM: stopping"); None }
        _ = int.recv() => { info!("SIGINT: stopping"); None }
        Some(d) = down_rx.recv() => { info!("repctl down: stopping"); Some(d) }
    };

    nbd.shutdown().await;
    let result = shared.command(Command::Down).await;
    match &result {
        Ok(_) => info!("clean stop: metadata written"),
        Err(e) => warn!("stop: {}", e.message),
    }
    cancel.cancel();
    let _ = ticker.await;
    if let Some(task) = link_task {
        let _ = task.await;
    }
    control.close().await;
    // Every control connection has ended: any other `repctl down` sent
    // meanwhile is queued by now.
    let mut downs: Vec<DownRequest> = first.into_iter().collect();
    while let Ok(d) = down_rx.try_recv() {
        downs.push(d);
    }
    Ok(Stop { result, downs })
}

/// A `repctl down` waiting for its answer, and for the answer to be written
/// before the process exits.
pub struct DownRequest {
    reply: oneshot::Sender<Response>,
    written: oneshot::Receiver<()>,
}

impl DownRequest {
    async fn respond(self, response: Response) {
        if self.reply.send(response).is_ok() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.written).await;
        }
    }
}
