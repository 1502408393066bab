//! Harness for system tests: real `repd` processes, real clients.
//!
//! A [`Cluster`] owns a temporary directory with a generated configuration,
//! sparse backing files, and the `repd` processes it starts. Dropping it
//! kills the processes it started (by PID) and removes the directory; if
//! the test is failing, the daemons' logs are printed first.

#![allow(dead_code)]

pub mod nbd;
pub mod proxy;
pub mod tools;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const REPD: &str = env!("CARGO_BIN_EXE_repd");
pub const REPCTL: &str = env!("CARGO_BIN_EXE_repctl");

/// Fail with a clear message when an external tool is missing.
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "this test needs `{tool}`; `.ci/run` installs it (apt-get install -y libnbd-bin nbdkit nbdfuse qemu-utils fio nbd-client)"
    );
}

/// Poll `f` until it returns `Some`, or panic after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a command printed and how it exited.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "command failed: {self:?}");
        self
    }
}

pub fn run(cmd: &mut Command) -> Out {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// How a node's NBD server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdKind {
    Unix,
    Tcp,
}

#[derive(Debug)]
pub struct NodeHandle {
    pub name: String,
    pub disk: PathBuf,
    pub control: PathBuf,
    pub nbd_socket: PathBuf,
    pub nbd_port: u16,
    pub nbd_kind: NbdKind,
    pub link_port: u16,
    pub log: PathBuf,
    pub child: Option<Child>,
}

/// Builder for a test resource.
pub struct Spec {
    pub nodes: Vec<&'static str>,
    pub size: u64,
    pub nbd: NbdKind,
    /// Extra TOML appended to the `[resource]` section.
    pub resource_extra: String,
    /// Extra sections appended to the file.
    pub extra_sections: String,
    pub repd_args: Vec<String>,
    /// Nodes whose disk is an existing file or block device (not created).
    pub disks: Vec<(&'static str, PathBuf)>,
    /// Extra TOML lines for a node's `[[node]]` section; `{dir}` in them
    /// is replaced by the cluster's directory.
    pub node_extra: Vec<(&'static str, String)>,
    /// Per-node replacements of the `[resource]` lines after `name`, in
    /// that node's own config file (to make two nodes disagree).
    pub node_resource: Vec<(&'static str, String)>,
    /// Per-node resource names, in that node's own config file.
    pub node_resource_name: Vec<(&'static str, &'static str)>,
    /// Per-node disk sizes.
    pub node_size: Vec<(&'static str, u64)>,
    /// Route the link through an in-process fault proxy.
    pub proxy: bool,
}

impl Spec {
    pub fn single(size: u64) -> Spec {
        Spec {
            nodes: vec!["alpha"],
            size,
            nbd: NbdKind::Unix,
            resource_extra: String::new(),
            extra_sections: String::new(),
            repd_args: Vec::new(),
            disks: Vec::new(),
            node_extra: Vec::new(),
            node_resource: Vec::new(),
            node_resource_name: Vec::new(),
            node_size: Vec::new(),
            proxy: false,
        }
    }

    /// Two nodes, alpha and beta (alpha dials: its name sorts first).
    pub fn pair(size: u64) -> Spec {
        Spec {
            nodes: vec!["alpha", "beta"],
            ..Spec::single(size)
        }
    }

    /// Lines for the `[resource]` section of every node's config.
    pub fn resource(mut self, lines: &str) -> Spec {
        self.resource_extra = lines.to_string();
        self
    }

    /// Lines for the `[resource]` section of `node`'s config only
    /// (replacing the common ones).
    pub fn resource_for(mut self, node: &'static str, lines: &str) -> Spec {
        self.node_resource.push((node, lines.to_string()));
        self
    }

    /// The resource name in `node`'s config.
    pub fn resource_name_for(mut self, node: &'static str, name: &'static str) -> Spec {
        self.node_resource_name.push((node, name));
        self
    }

    /// A different disk size for `node`.
    pub fn size_for(mut self, node: &'static str, size: u64) -> Spec {
        self.node_size.push((node, size));
        self
    }

    /// Extra sections (e.g. `[net]`) for every node's config.
    pub fn sections(mut self, toml: &str) -> Spec {
        self.extra_sections = toml.to_string();
        self
    }

    /// Route the peer link through a fault proxy (see `proxy`).
    pub fn with_proxy(mut self) -> Spec {
        self.proxy = true;
        self
    }

    /// Use `path` (e.g. a loop device) as `node`'s disk instead of a new
    /// sparse file; the cluster neither creates nor removes it.
    /// Add `lines` to `node`'s `[[node]]` section (`{dir}` is the
    /// cluster's directory), e.g. `meta-disk = "{dir}/alpha.md"`.
    pub fn node_toml(mut self, node: &'static str, lines: &str) -> Spec {
        self.node_extra.push((node, lines.to_string()));
        self
    }

    pub fn disk(mut self, node: &'static str, path: impl Into<PathBuf>) -> Spec {
        self.disks.push((node, path.into()));
        self
    }

    pub fn nbd(mut self, kind: NbdKind) -> Spec {
        self.nbd = kind;
        self
    }

    pub fn repd_args(mut self, args: &[&str]) -> Spec {
        self.repd_args = args.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn build(self) -> Cluster {
        Cluster::new(self)
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// The config file of the first node (all nodes share one unless the
    /// spec makes them differ; see `config_of`).
    pub config: PathBuf,
    /// Each node's own config file.
    pub configs: Vec<(String, PathBuf)>,
    pub nodes: Vec<NodeHandle>,
    pub repd_args: Vec<String>,
    /// The link's fault proxy, if the spec asked for one.
    pub proxy: Option<proxy::Proxy>,
}

impl Cluster {
    fn new(spec: Spec) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("tandem-test-")
            .tempdir()
            .unwrap();
        let mut nodes = Vec::new();
        for name in &spec.nodes {
            let size = spec
                .node_size
                .iter()
                .find(|(n, _)| n == name)
                .map_or(spec.size, |(_, s)| *s);
            let disk = match spec.disks.iter().find(|(n, _)| n == name) {
                Some((_, path)) => path.clone(),
                None => {
                    let disk = dir.path().join(format!("{name}.img"));
                    let f = std::fs::File::create(&disk).unwrap();
                    f.set_len(size).unwrap();
                    disk
                }
            };
            nodes.push(NodeHandle {
                name: name.to_string(),
                disk,
                control: dir.path().join(format!("{name}.ctl")),
                nbd_socket: dir.path().join(format!("{name}.nbd")),
                nbd_port: free_port(),
                nbd_kind: spec.nbd,
                link_port: free_port(),
                log: dir.path().join(format!("{name}.log")),
                child: None,
            });
        }
        // The dialing node (the name that sorts first) reaches the other
        // through the proxy when there is one.
        let proxy = (spec.proxy && nodes.len() == 2).then(|| {
            let acceptor = nodes.iter().max_by(|a, b| a.name.cmp(&b.name)).unwrap();
            proxy::Proxy::start(format!("127.0.0.1:{}", acceptor.link_port).parse().unwrap())
        });
        let mut configs = Vec::new();
        for me in &nodes {
            let name = spec
                .node_resource_name
                .iter()
                .find(|(n, _)| *n == me.name)
                .map_or("r0", |(_, r)| *r);
            let extra = spec
                .node_resource
                .iter()
                .find(|(n, _)| *n == me.name)
                .map_or(spec.resource_extra.as_str(), |(_, l)| l.as_str());
            let mut toml = format!("[resource]\nname = \"{name}\"\n{extra}\n");
            for node in &nodes {
                let nbd = match spec.nbd {
                    NbdKind::Unix => format!("unix:{}", node.nbd_socket.display()),
                    NbdKind::Tcp => format!("127.0.0.1:{}", node.nbd_port),
                };
                let port = match &proxy {
                    Some(p) if node.name != me.name && me.name < node.name => p.addr.port(),
                    _ => node.link_port,
                };
                toml += &format!(
                    "\n[[node]]\nname = \"{}\"\naddress = \"127.0.0.1:{}\"\ndisk = \"{}\"\nnbd = \"{}\"\ncontrol = \"{}\"\n",
                    node.name,
                    port,
                    node.disk.display(),
                    nbd,
                    node.control.display()
                );
                for (_, lines) in spec.node_extra.iter().filter(|(n, _)| *n == node.name) {
                    toml += &lines.replace("{dir}", &dir.path().display().to_string());
                    toml += "\n";
                }
            }
            toml += &spec.extra_sections;
            let path = if spec.proxy
                || !spec.node_resource.is_empty()
                || !spec.node_resource_name.is_empty()
            {
                dir.path().join(format!("r0-{}.toml", me.name))
            } else {
                dir.path().join("r0.toml")
            };
            std::fs::write(&path, toml).unwrap();
            configs.push((me.name.clone(), path));
        }
        Cluster {
            config: configs[0].1.clone(),
            configs,
            dir,
            nodes,
            repd_args: spec.repd_args,
            proxy,
        }
    }

    /// `node`'s own config file.
    pub fn config_of(&self, node: &str) -> &Path {
        &self
            .configs
            .iter()
            .find(|(n, _)| n == node)
            .unwrap_or_else(|| panic!("no node {node}"))
            .1
    }

    pub fn node(&self, name: &str) -> &NodeHandle {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn node_mut(&mut self, name: &str) -> &mut NodeHandle {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// `repctl --config … --node NAME args…`
    pub fn repctl(&self, node: &str, args: &[&str]) -> Out {
        run(Command::new(REPCTL)
            .arg("--config")
            .arg(self.config_of(node))
            .arg("--node")
            .arg(node)
            .args(args))
    }

    /// Start `repd` for `node` and wait until it answers `status`.
    pub fn start(&mut self, node: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.node(node).log)
            .unwrap();
        let config = self.config_of(node).to_path_buf();
        let child = Command::new(REPD)
            .arg("--config")
            .arg(&config)
            .arg("--node")
            .arg(node)
            .args(&self.repd_args)
            .env(
                "TANDEM_LOG",
                std::env::var("TANDEM_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn repd");
        self.node_mut(node).child = Some(child);
        let name = node.to_string();
        wait_for(
            &format!("repd {name} to answer"),
            Duration::from_secs(20),
            || {
                if let Some(code) = self.try_exit(&name) {
                    panic!(
                        "repd {name} exited with {code:?} during start:\n{}",
                        self.log(&name)
                    );
                }
                (self.repctl(&name, &["status", "--json"]).code == 0).then_some(())
            },
        );
    }

    /// Run `repd` for `node` in the foreground with extra `args`, for starts
    /// that must fail; kills it and panics if it is still running after 20s.
    pub fn repd_once(&self, node: &str, config: &Path, args: &[&str]) -> Out {
        let mut child = Command::new(REPD)
            .arg("--config")
            .arg(config)
            .arg("--node")
            .arg(node)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn repd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("repd was expected to exit but still runs after 20s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Whether `node`'s repd process is still running.
    pub fn is_running(&mut self, node: &str) -> bool {
        self.node(node).child.is_some() && self.try_exit(node).is_none()
    }

    /// The exit status if `node`'s repd has exited.
    pub fn try_exit(&mut self, node: &str) -> Option<Option<i32>> {
        let child = self.node_mut(node).child.as_mut()?;
        child.try_wait().unwrap().map(|s| s.code())
    }

    /// `create-md`, start, `primary --force`: a serving single node.
    pub fn up_primary(&mut self, node: &str) {
        self.repctl(node, &["create-md"]).ok();
        self.start(node);
        self.repctl(node, &["primary", "--force"]).ok();
    }

    /// `repctl down`, then wait for the process; returns its exit code.
    pub fn down(&mut self, node: &str) -> Option<i32> {
        let out = self.repctl(node, &["down"]);
        assert_eq!(out.code, 0, "repctl down failed: {out:?}");
        self.wait_exit(node)
    }

    pub fn wait_exit(&mut self, node: &str) -> Option<i32> {
        let name = node.to_string();
        wait_for(
            &format!("repd {name} to exit"),
            Duration::from_secs(30),
            || self.try_exit(&name),
        )
    }

    /// SIGKILL `node`'s repd (a crash).
    pub fn kill(&mut self, node: &str) {
        if let Some(mut child) = self.node_mut(node).child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM `node`'s repd and wait; returns its exit code.
    pub fn terminate(&mut self, node: &str) -> Option<i32> {
        let pid = self.node(node).child.as_ref().expect("running").id();
        // SAFETY: kill with a PID we started and have not reaped.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        self.wait_exit(node)
    }

    pub fn pid(&self, node: &str) -> u32 {
        self.node(node).child.as_ref().expect("running").id()
    }

    pub fn status(&self, node: &str) -> Value {
        let out = self.repctl(node, &["status", "--json"]).ok();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("bad status JSON {e}: {}", out.stdout))
    }

    pub fn dump_md(&self, node: &str) -> Value {
        let out = self.repctl(node, &["dump-md"]).ok();
        serde_json::from_str(&out.stdout).unwrap()
    }

    /// The engine's durability counters: (`fdatasyncs`, `dsync_writes`).
    pub fn syncs(&self, node: &str) -> (u64, u64) {
        let s = self.status(node);
        let e = &s["engine"];
        (
            e["fdatasyncs"].as_u64().unwrap(),
            e["dsync_writes"].as_u64().unwrap(),
        )
    }

    /// The exported size (`size_bytes` of the status).
    pub fn size(&self, node: &str) -> u64 {
        self.status(node)["size_bytes"].as_u64().unwrap()
    }

    /// Wait until `node` counts exactly `n` attached NBD clients.
    pub fn wait_clients(&self, node: &str, n: u64) {
        wait_for(
            &format!("{n} NBD clients on {node}"),
            Duration::from_secs(20),
            || (self.status(node)["nbd_clients"].as_u64() == Some(n)).then_some(()),
        );
    }

    /// A connected (not yet negotiated) socket to `node`'s NBD server.
    pub fn connect(&self, node: &str) -> Box<dyn nbd::Stream> {
        let n = self.node(node);
        match n.nbd_kind {
            NbdKind::Unix => nbd::connect_unix(&n.nbd_socket),
            NbdKind::Tcp => nbd::connect_tcp(n.nbd_port),
        }
    }

    /// A raw client in transmission with export `r0` on `node`.
    pub fn client(&self, node: &str) -> nbd::RawClient {
        nbd::RawClient::go(self.connect(node), "r0")
            .unwrap_or_else(|e| panic!("NBD GO refused: {e}"))
    }

    /// Bytes of `node`'s disk, read directly (the data area starts at 0).
    pub fn read_disk(&self, node: &str, offset: u64, len: usize) -> Vec<u8> {
        read_file_range(&self.node(node).disk, offset, len)
    }

    /// An NBD URI for libnbd tools (nbdinfo, nbdcopy, nbdfuse, fio).
    pub fn uri(&self, node: &str) -> String {
        let n = self.node(node);
        match n.nbd_kind {
            NbdKind::Unix => format!("nbd+unix:///r0?socket={}", n.nbd_socket.display()),
            NbdKind::Tcp => format!("nbd://127.0.0.1:{}/r0", n.nbd_port),
        }
    }

    /// qemu's `--image-opts` for the export.
    pub fn qemu_opts(&self, node: &str) -> String {
        let n = self.node(node);
        match n.nbd_kind {
            NbdKind::Unix => format!(
                "driver=nbd,server.type=unix,server.path={},export=r0",
                n.nbd_socket.display()
            ),
            NbdKind::Tcp => format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=r0",
                n.nbd_port
            ),
        }
    }

    /// Run `qemu-io -c CMD…` against the export, with `--cache=writeback`
    /// (qemu-io's default is writethrough, which would make every write a
    /// FUA write): writes are plain unless `-f`, and qemu sends one FLUSH
    /// when it closes the image.
    pub fn qemu_io(&self, node: &str, cmds: &[&str]) -> Out {
        let mut c = Command::new("qemu-io");
        c.arg("--cache=writeback")
            .arg("--image-opts")
            .arg(self.qemu_opts(node));
        for cmd in cmds {
            c.arg("-c").arg(cmd);
        }
        run(&mut c)
    }

    pub fn log(&self, node: &str) -> String {
        std::fs::read_to_string(&self.node(node).log).unwrap_or_default()
    }

    /// Two nodes with fresh metadata, both running and connected, alpha
    /// Primary (forced) and the initial full sync to beta done.
    pub fn up_pair(&mut self) {
        for n in ["alpha", "beta"] {
            self.repctl(n, &["create-md"]).ok();
            self.start(n);
        }
        self.repctl("alpha", &["wait-connect", "--timeout", "20s"])
            .ok();
        self.repctl("alpha", &["primary", "--force"]).ok();
        self.repctl("beta", &["wait-sync", "--timeout", "120s"])
            .ok();
    }

    /// The status field at `path` (e.g. `["peer", "disk"]`) of `node`.
    pub fn field(&self, node: &str, path: &[&str]) -> Value {
        let mut v = self.status(node);
        for p in path {
            v = v[*p].take();
        }
        v
    }

    /// Wait until `node`'s status satisfies `cond`.
    pub fn wait_status(
        &self,
        node: &str,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_for(what, timeout, || {
            let out = self.repctl(node, &["status", "--json"]);
            if out.code != 0 {
                return None;
            }
            let v: Value = serde_json::from_str(&out.stdout).ok()?;
            cond(&v).then_some(v)
        })
    }

    /// Whether the data areas of both nodes' disks are byte-identical.
    pub fn data_identical(&self) -> bool {
        let size = self.size("alpha");
        let a = std::fs::read(&self.node("alpha").disk).unwrap();
        let b = std::fs::read(&self.node("beta").disk).unwrap();
        a[..size as usize] == b[..size as usize]
    }

    pub fn proxy(&self) -> &proxy::Proxy {
        self.proxy.as_ref().expect("spec with_proxy()")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        if std::thread::panicking() {
            for n in &names {
                let log = self.log(n);
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                eprintln!("----- repd {n} log (last 60 lines) -----");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        for n in &names {
            self.kill(n);
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), for test data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn read_file_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// A small seeded generator (xorshift64*) for reproducible random tests.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The seed from `TANDEM_SEED` if set, else `default`; printed so a
    /// failing run can be repeated.
    pub fn seed_from_env(default: u64) -> u64 {
        let seed = std::env::var("TANDEM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default);
        eprintln!("seed {seed} (set TANDEM_SEED to repeat or vary)");
        seed
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Between 0 and `max - 1` random bytes.
    pub fn bytes_below(&mut self, max: u64) -> Vec<u8> {
        let len = self.below(max) as usize;
        self.bytes(len)
    }
}
