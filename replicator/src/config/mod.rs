//! The resource configuration: one TOML file per resource, read into a typed,
//! checked [`Config`].
//!
//! This module owns the file format of CONTRACT.md section 2: the keys, their
//! defaults, the rules that make a configuration valid, the error a person
//! sees when it is not, and the choice of which `[[node]]` is "this" node.
//! Nothing else in Tandem reads the TOML itself.
//!
//! # Format
//!
//! Keys are kebab-case. Only `[resource] name` and the `[[node]]` keys `name`,
//! `address`, `disk`, `nbd` and `control` are required; everything else has
//! the default a DRBD administrator expects:
//!
//! | key | default |
//! |---|---|
//! | `[resource] protocol` | `"C"` (the only protocol) |
//! | `[resource] shared-secret` | none: the link is not authenticated |
//! | `[resource] fencing` | `"dont-care"` (DRBD's default) |
//! | `[net] ping-interval`, `ping-timeout`, `connect-retry` | `1s`, `10s`, `1s` |
//! | `[net] max-buffers` | `8192` |
//! | `[sync] rate`, `verify-alg` | `0` (unlimited), `"crc32"` |
//! | `[disk] on-io-error` | `"detach"` |
//! | `[handlers] fence-peer`, `split-brain` | none |
//! | `[[node]] meta-disk` | `"internal"` |
//!
//! Sizes and durations follow [`units`]. Keyword values (`protocol`,
//! `fencing`, `verify-alg`, `on-io-error`) are matched without regard to
//! ASCII case.
//!
//! # Rules
//!
//! - One or two `[[node]]` entries; a single node runs without a peer.
//! - Resource and node names are non-empty and made of `A-Z a-z 0-9 _ . -`;
//!   node names are unique.
//! - `address` is an IP socket address (`192.0.2.1:7788`, `[2001:db8::1]:7788`)
//!   with a non-zero port and a specific IP, because the peer dials it. Host
//!   names are not accepted, so no lookup can stall or change the meaning of
//!   the file.
//! - `nbd` is an IP socket address (here `0.0.0.0` is fine) or `unix:PATH`.
//! - `address`, `nbd` and `control` differ between the nodes. `disk` may be
//!   the same path on both: on two machines, `/dev/sdb1` each is normal.
//! - An external `meta-disk` is not the `disk` itself.
//! - `shared-secret` and the handlers, when given, are not empty.
//! - `max-buffers` is at least 1, `ping-interval` and `connect-retry` are not
//!   zero, and `ping-timeout` is longer than `ping-interval`.
//! - Unix socket paths (`control`, `nbd = "unix:..."`) fit the kernel's limit
//!   of 107 bytes.
//! - Unknown keys are errors.
//!
//! # Relative paths
//!
//! Every relative path in the file (`disk`, an external `meta-disk`,
//! `control`, a `unix:` NBD socket and the handlers) is taken relative to the
//! directory that holds the config file, as given to [`Config::load`] or
//! [`Config::parse`]. If the config path is itself relative (`r0.toml`), the
//! resolved paths are relative too, and name the right files as long as the
//! current directory stays where it was.
//!
//! # Errors
//!
//! A bad file gives one [`ConfigError`] whose `Display` is a single line
//! naming the file, the line and the key, e.g.
//! `r0.toml:7: [sync] rate: "12XB" is not a size (use e.g. 4096, 64KiB, 1G)`.
//! A file with several problems gets one error at a time: first TOML syntax,
//! then unknown or missing keys, then values, then the rules above; within
//! the key and rule checks, the problem nearest the top of the file.

mod document;
mod error;
pub mod units;
mod validate;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use error::ConfigError;

/// A value that is not one of the accepted spellings. The message quotes the
/// value and says what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(String);

/// Declares a keyword enum: its variants with their config spellings,
/// `as_str`, `Display`, `FromStr` (ASCII case-insensitive) and `Deserialize`.
macro_rules! keyword_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident => $spelling:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in the order the documentation lists them.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The spelling used in the config file.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $spelling,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = InvalidValue;

            fn from_str(text: &str) -> Result<Self, InvalidValue> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|value| value.as_str().eq_ignore_ascii_case(text))
                    .ok_or_else(|| {
                        let expected: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                        InvalidValue(format!(
                            "{text:?} is not {} (expected one of: {})",
                            $what,
                            expected.join(", ")
                        ))
                    })
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserialize_from_str(deserializer)
            }
        }
    };
}

/// Deserialises a string and parses it with `FromStr`, keeping the parser's
/// message.
fn deserialize_from_str<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = InvalidValue>,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

keyword_enum! {
    /// When a write counts as done. Only protocol C exists: after both disks.
    pub enum Protocol ("a replication protocol") {
        /// Acknowledge a write once it is on the local and the peer's disk.
        #[default]
        C => "C",
    }
}

keyword_enum! {
    /// What a Primary does when it loses its peer (CONTRACT.md section 6).
    pub enum Fencing ("a fencing policy") {
        /// No fencing: promotion without a peer is not restricted.
        #[default]
        DontCare => "dont-care",
        /// Run `fence-peer`; refuse promotion until the peer is known fenced
        /// or outdated.
        ResourceOnly => "resource-only",
        /// As `resource-only`, and also suspend I/O until `fence-peer`
        /// confirms.
        ResourceAndStonith => "resource-and-stonith",
    }
}

keyword_enum! {
    /// The block checksum used by online verify.
    pub enum VerifyAlg ("a verify algorithm") {
        /// CRC-32 (crc32fast).
        #[default]
        Crc32 => "crc32",
        /// SHA-256.
        Sha256 => "sha256",
    }
}

keyword_enum! {
    /// What the node does when its backing disk reports an I/O error.
    pub enum OnIoError ("an on-io-error policy") {
        /// Drop the local disk and serve from the peer (Diskless).
        #[default]
        Detach => "detach",
        /// Report the error to the NBD client.
        PassOn => "pass-on",
    }
}

/// Where a node keeps its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum MetaDisk {
    /// At the end of the backing disk.
    #[default]
    Internal,
    /// In a separate file or device.
    External(PathBuf),
}

impl FromStr for MetaDisk {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<Self, InvalidValue> {
        if text.eq_ignore_ascii_case("internal") {
            Ok(Self::Internal)
        } else if text.is_empty() {
            Err(InvalidValue(
                "\"\" is not a metadata location (use \"internal\" or a path)".to_owned(),
            ))
        } else {
            Ok(Self::External(PathBuf::from(text)))
        }
    }
}

/// The config spelling: `internal` or the path.
impl fmt::Display for MetaDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Internal => f.write_str("internal"),
            Self::External(path) => write!(f, "{}", path.display()),
        }
    }
}

impl<'de> Deserialize<'de> for MetaDisk {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_from_str(deserializer)
    }
}

/// Where a node serves NBD.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NbdListen {
    /// A TCP socket address.
    Tcp(SocketAddr),
    /// A unix socket path (`unix:PATH` in the file).
    Unix(PathBuf),
}

impl FromStr for NbdListen {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<Self, InvalidValue> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(InvalidValue(format!(
                    "{text:?} names no socket path (use e.g. unix:/run/tandem/r0.nbd)"
                )));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let addr: SocketAddr = text.parse().map_err(|_| {
            InvalidValue(format!(
                "{text:?} is not an NBD endpoint (use IP:port, e.g. 127.0.0.1:10809 or \
                 [::1]:10809, or unix:/path/to/socket; host names are not resolved)"
            ))
        })?;
        if addr.port() == 0 {
            return Err(InvalidValue(format!(
                "{text:?} has port 0; give the fixed port NBD clients connect to"
            )));
        }
        Ok(Self::Tcp(addr))
    }
}

/// The config spelling: `IP:port` or `unix:PATH`.
impl fmt::Display for NbdListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl<'de> Deserialize<'de> for NbdListen {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_from_str(deserializer)
    }
}

/// Parses a replication-link `address`: an IP socket address the peer can
/// dial, so neither port 0 nor an unspecified IP (`0.0.0.0`, `::`).
pub fn parse_link_address(text: &str) -> Result<SocketAddr, InvalidValue> {
    let addr: SocketAddr = text.parse().map_err(|_| {
        InvalidValue(format!(
            "{text:?} is not a socket address (use IP:port, e.g. 192.0.2.1:7788 or \
             [2001:db8::1]:7788; host names are not resolved)"
        ))
    })?;
    if addr.port() == 0 {
        return Err(InvalidValue(format!(
            "{text:?} has port 0; the peer dials this address, give a fixed port"
        )));
    }
    if addr.ip().is_unspecified() {
        return Err(InvalidValue(format!(
            "{text:?} is not an address the peer can dial; give this node's own IP"
        )));
    }
    Ok(addr)
}

fn deserialize_link_address<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_link_address(&text).map_err(serde::de::Error::custom)
}

/// Deserialises a count given as a TOML integer, with a message that does not
/// talk about Rust integer types.
fn deserialize_count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    struct CountVisitor;

    impl serde::de::Visitor<'_> for CountVisitor {
        type Value = u32;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a whole number such as 8192")
        }

        fn visit_i64<E: serde::de::Error>(self, count: i64) -> Result<u32, E> {
            u32::try_from(count)
                .map_err(|_| E::custom(format!("{count} is out of range (0 to {})", u32::MAX)))
        }

        fn visit_u64<E: serde::de::Error>(self, count: u64) -> Result<u32, E> {
            u32::try_from(count)
                .map_err(|_| E::custom(format!("{count} is out of range (0 to {})", u32::MAX)))
        }
    }

    deserializer.deserialize_any(CountVisitor)
}

/// `[resource]`: what the resource is and how its nodes trust each other.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ResourceConfig {
    /// The resource name; also the NBD export name.
    pub name: String,
    /// The replication protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// The secret for the link's challenge-response, if any.
    #[serde(default)]
    pub shared_secret: Option<String>,
    /// The fencing policy.
    #[serde(default)]
    pub fencing: Fencing,
}

/// Shows the resource without its shared secret, so that logging a config
/// does not leak it.
impl fmt::Debug for ResourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResourceConfig")
            .field("name", &self.name)
            .field("protocol", &self.protocol)
            .field(
                "shared_secret",
                &self.shared_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("fencing", &self.fencing)
            .finish()
    }
}

/// `[net]`: the replication link's timers and queue depth.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct NetConfig {
    /// How often to send a keepalive when the link is idle.
    #[serde(deserialize_with = "units::deserialize_duration")]
    pub ping_interval: Duration,
    /// How long without an answer before the peer is declared dead.
    #[serde(deserialize_with = "units::deserialize_duration")]
    pub ping_timeout: Duration,
    /// How long to wait between connection attempts.
    #[serde(deserialize_with = "units::deserialize_duration")]
    pub connect_retry: Duration,
    /// Requests in flight toward the peer.
    #[serde(deserialize_with = "deserialize_count")]
    pub max_buffers: u32,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(1),
            ping_timeout: Duration::from_secs(10),
            connect_retry: Duration::from_secs(1),
            max_buffers: 8192,
        }
    }
}

/// `[sync]`: resynchronisation and online verify.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct SyncConfig {
    /// Resync bandwidth cap in bytes per second; 0 means unlimited.
    #[serde(deserialize_with = "units::deserialize_size")]
    pub rate: u64,
    /// The checksum online verify compares.
    pub verify_alg: VerifyAlg,
}

/// `[disk]`: the local backing disk.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiskConfig {
    /// What to do on an I/O error.
    pub on_io_error: OnIoError,
}

/// `[handlers]`: programs run on cluster events.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct HandlersConfig {
    /// Run when a Primary loses its peer and fencing is on.
    pub fence_peer: Option<PathBuf>,
    /// Run when a split-brain is detected (alerting only).
    pub split_brain: Option<PathBuf>,
}

/// One `[[node]]`. After [`Config::parse`], its paths are resolved against
/// the config file's directory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeConfig {
    /// The node name; by default the host name selects the node.
    pub name: String,
    /// The replication link: this node listens here and its peer dials it.
    #[serde(deserialize_with = "deserialize_link_address")]
    pub address: SocketAddr,
    /// The backing file or block device.
    pub disk: PathBuf,
    /// Where the metadata lives.
    #[serde(default)]
    pub meta_disk: MetaDisk,
    /// Where NBD clients connect.
    pub nbd: NbdListen,
    /// The control socket `repctl` talks to.
    pub control: PathBuf,
}

/// The whole file as serde sees it; [`Config`] adds the path and the checks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    resource: ResourceConfig,
    #[serde(default)]
    net: NetConfig,
    #[serde(default)]
    sync: SyncConfig,
    #[serde(default)]
    disk: DiskConfig,
    #[serde(default)]
    handlers: HandlersConfig,
    node: Vec<NodeConfig>,
}

/// A checked resource configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from, as given.
    pub path: PathBuf,
    /// `[resource]`.
    pub resource: ResourceConfig,
    /// `[net]`.
    pub net: NetConfig,
    /// `[sync]`.
    pub sync: SyncConfig,
    /// `[disk]`.
    pub disk: DiskConfig,
    /// `[handlers]`.
    pub handlers: HandlersConfig,
    /// The `[[node]]` entries in file order: one or two.
    pub nodes: Vec<NodeConfig>,
}

impl Config {
    /// Reads and checks the config file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let read_error = |cause| ConfigError::Read {
            path: path.to_owned(),
            cause,
        };
        let bytes = std::fs::read(path).map_err(read_error)?;
        let text = String::from_utf8(bytes).map_err(|_| {
            read_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the file is not UTF-8 text",
            ))
        })?;
        Self::parse(&text, path)
    }

    /// Checks config `text` that was read from `path`. The path names the file
    /// in errors and anchors relative paths; it is not read.
    pub fn parse(text: &str, path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let (document, source) = document::Source::read(text, path)?;
        let mut config = Config {
            path: path.to_owned(),
            resource: document.resource,
            net: document.net,
            sync: document.sync,
            disk: document.disk,
            handlers: document.handlers,
            nodes: document.node,
        };
        config.resolve_paths();
        source.first_error(validate::validate(&config))?;
        Ok(config)
    }

    /// Makes every relative path relative to the config file's directory.
    fn resolve_paths(&mut self) {
        let base = self.path.parent().unwrap_or(Path::new("")).to_owned();
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() && !path.as_os_str().is_empty() {
                *path = base.join(&*path);
            }
        };
        let handlers = &mut self.handlers;
        for handler in [&mut handlers.fence_peer, &mut handlers.split_brain]
            .into_iter()
            .flatten()
        {
            resolve(handler);
        }
        for node in &mut self.nodes {
            resolve(&mut node.disk);
            resolve(&mut node.control);
            if let MetaDisk::External(path) = &mut node.meta_disk {
                resolve(path);
            }
            if let NbdListen::Unix(path) = &mut node.nbd {
                resolve(path);
            }
        }
    }

    /// Picks the node this process runs as.
    ///
    /// With `Some(name)` (`--node NAME`), that node must exist. With `None`,
    /// the node named like this host (`uname -n`, or its first label, so
    /// `alpha.example.com` selects `alpha`); failing that, the only node of a
    /// single-node resource. Otherwise the error asks for `--node`.
    pub fn node(&self, requested: Option<&str>) -> Result<&NodeConfig, ConfigError> {
        match requested {
            Some(name) => self.node_named(name),
            None => self.node_for_host(host_name().as_deref()),
        }
    }

    fn node_named(&self, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes
            .iter()
            .find(|node| node.name == name)
            .ok_or_else(|| ConfigError::UnknownNode {
                path: self.path.clone(),
                requested: name.to_owned(),
                names: self.node_names(),
            })
    }

    /// [`Config::node`] without a `--node`, for the given host name.
    fn node_for_host(&self, host: Option<&str>) -> Result<&NodeConfig, ConfigError> {
        let by_name = |name: &str| self.nodes.iter().find(|node| node.name == name);
        let found = host.and_then(|host| {
            let short = host.split_once('.').map_or(host, |(short, _)| short);
            by_name(host).or_else(|| by_name(short))
        });
        match (found, self.nodes.as_slice()) {
            (Some(node), _) | (None, [node]) => Ok(node),
            (None, _) => Err(ConfigError::NoNodeForHost {
                path: self.path.clone(),
                host: host.map(str::to_owned),
                names: self.node_names(),
            }),
        }
    }

    fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|node| node.name.clone()).collect()
    }

    /// The other node of the resource, if `name` is one of its nodes and it
    /// has two.
    pub fn peer_of(&self, name: &str) -> Option<&NodeConfig> {
        if !self.nodes.iter().any(|node| node.name == name) {
            return None;
        }
        self.nodes.iter().find(|node| node.name != name)
    }
}

/// This machine's host name (`uname -n`), if it is readable text.
fn host_name() -> Option<String> {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_str().ok()?;
    (!name.is_empty()).then(|| name.to_owned())
}
