//! The rules a deserialised config must follow beyond its types (see the
//! "Rules" list in the module documentation of [`super`]). Paths are already
//! resolved when these run.

use std::path::Path;

use super::document::{KeyPath, NO_NODES, Problem, node_path, section_key};
use super::units::format_duration;
use super::{Config, MetaDisk, NbdListen, NetConfig, NodeConfig};

/// The longest unix socket path the kernel takes: `sun_path` is 108 bytes,
/// including the terminating NUL.
const MAX_UNIX_SOCKET_PATH: usize = 107;

/// Every rule `config` breaks.
pub(super) fn validate(config: &Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    problems.extend(check_name(&config.resource.name, section_key("resource", "name")).err());
    if config.resource.shared_secret.as_deref() == Some("") {
        problems.push(Problem::at_key(
            section_key("resource", "shared-secret"),
            "is empty; remove the key to run the link without authentication",
        ));
    }
    problems.extend(check_net(&config.net).err());
    let handlers = [
        ("fence-peer", &config.handlers.fence_peer),
        ("split-brain", &config.handlers.split_brain),
    ];
    for (key, handler) in handlers {
        if handler
            .as_ref()
            .is_some_and(|path| path.as_os_str().is_empty())
        {
            problems.push(Problem::at_key(
                section_key("handlers", key),
                "is empty; remove the key if there is no handler",
            ));
        }
    }
    match config.nodes.len() {
        0 => problems.push(Problem::nowhere(NO_NODES)),
        1 | 2 => {}
        count => problems.push(Problem::at_key(
            node_path(2, None),
            format!("{count} nodes given; a resource has one or two"),
        )),
    }
    for (index, node) in config.nodes.iter().enumerate() {
        problems.extend(check_node(index, node).err());
        for earlier in &config.nodes[..index] {
            problems.extend(check_distinct(index, node, earlier).err());
        }
    }
    problems
}

fn check_net(net: &NetConfig) -> Result<(), Problem> {
    if net.ping_interval.is_zero() {
        return Err(Problem::at_key(
            section_key("net", "ping-interval"),
            "must be longer than 0",
        ));
    }
    if net.ping_timeout <= net.ping_interval {
        return Err(Problem::at_key(
            section_key("net", "ping-timeout"),
            format!(
                "ping-timeout ({}) must be longer than ping-interval ({})",
                format_duration(net.ping_timeout),
                format_duration(net.ping_interval)
            ),
        ));
    }
    if net.connect_retry.is_zero() {
        return Err(Problem::at_key(
            section_key("net", "connect-retry"),
            "must be longer than 0",
        ));
    }
    if net.max_buffers == 0 {
        return Err(Problem::at_key(
            section_key("net", "max-buffers"),
            "must be at least 1",
        ));
    }
    Ok(())
}

fn check_name(name: &str, path: KeyPath) -> Result<(), Problem> {
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(Problem::at_key(
            path,
            format!("{name:?} is not a valid name (use one or more of A-Z a-z 0-9 _ . -)"),
        ))
    }
}

fn check_node(index: usize, node: &NodeConfig) -> Result<(), Problem> {
    let key = |key| node_path(index, Some(key));
    check_name(&node.name, key("name"))?;
    if node.disk.as_os_str().is_empty() {
        return Err(Problem::at_key(
            key("disk"),
            "is empty; give the backing file or device",
        ));
    }
    if let MetaDisk::External(meta) = &node.meta_disk
        && *meta == node.disk
    {
        return Err(Problem::at_key(
            key("meta-disk"),
            "is the same file as disk; use \"internal\" or a separate file",
        ));
    }
    if let NbdListen::Unix(socket) = &node.nbd {
        check_socket_path(socket, key("nbd"))?;
    }
    if node.control.as_os_str().is_empty() {
        return Err(Problem::at_key(
            key("control"),
            "is empty; give the control socket path",
        ));
    }
    check_socket_path(&node.control, key("control"))
}

fn check_socket_path(path: &Path, key: KeyPath) -> Result<(), Problem> {
    let length = path.as_os_str().len();
    if length <= MAX_UNIX_SOCKET_PATH {
        return Ok(());
    }
    Err(Problem::at_key(
        key,
        format!(
            "the socket path {} is {length} bytes; unix sockets allow at most \
             {MAX_UNIX_SOCKET_PATH} (after relative paths are resolved)",
            path.display()
        ),
    ))
}

/// Node `index` must not share a name, link address, NBD endpoint or control
/// socket with an `earlier` one.
fn check_distinct(index: usize, node: &NodeConfig, earlier: &NodeConfig) -> Result<(), Problem> {
    let clash = |key: &str, value: String| {
        Err(Problem::at_key(
            node_path(index, Some(key)),
            format!(
                "{value} is also node {:?}'s {key}; each node needs its own",
                earlier.name
            ),
        ))
    };
    if node.name == earlier.name {
        return Err(Problem::at_key(
            node_path(index, Some("name")),
            format!("{:?} names two nodes; node names must be unique", node.name),
        ));
    }
    if node.address == earlier.address {
        return clash("address", node.address.to_string());
    }
    if node.nbd == earlier.nbd {
        return clash("nbd", node.nbd.to_string());
    }
    if node.control == earlier.control {
        return clash("control", node.control.display().to_string());
    }
    Ok(())
}
