use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

/// The example of CONTRACT.md section 2, with every key.
const FULL: &str = r#"[resource]
name = "r0"
protocol = "C"                 # only C exists
shared-secret = "change-me"    # optional
fencing = "resource-and-stonith"   # or "resource-only", "dont-care"

[net]
ping-interval = "1s"
ping-timeout = "10s"
connect-retry = "1s"
max-buffers = 8192             # requests in flight toward the peer

[sync]
rate = "0"                     # resync bytes/s cap; "0" = unlimited
verify-alg = "crc32"            # crc32 or sha256

[disk]
on-io-error = "detach"         # or "pass-on"

[handlers]
fence-peer = "/usr/lib/tandem/fence-peer"
split-brain = "/usr/lib/tandem/notify"      # optional

[[node]]
name = "alpha"
address = "127.0.0.1:7788"     # replication link: listen here, dial the peer's
disk = "/var/lib/tandem/r0.img"
meta-disk = "internal"         # or a path to an external metadata file/device
nbd = "127.0.0.1:10809"        # or "unix:/run/tandem/r0-alpha.nbd"
control = "/run/tandem/r0-alpha.ctl"

[[node]]
name = "beta"
address = "127.0.0.2:7788"
disk = "/var/lib/tandem/r0-beta.img"
meta-disk = "internal"
nbd = "127.0.0.2:10809"
control = "/run/tandem/r0-beta.ctl"
"#;

/// Only the required keys, one node.
const MINIMAL: &str = r#"[resource]
name = "r0"

[[node]]
name = "alpha"
address = "127.0.0.1:7788"
disk = "/var/lib/tandem/r0.img"
nbd = "127.0.0.1:10809"
control = "/run/tandem/r0-alpha.ctl"
"#;

/// Two nodes with only their required keys; `beta` starts on line 11.
const TWO_NODES: &str = r#"[resource]
name = "r0"

[[node]]
name = "alpha"
address = "127.0.0.1:7788"
disk = "/var/lib/tandem/r0.img"
nbd = "127.0.0.1:10809"
control = "/run/tandem/r0-alpha.ctl"

[[node]]
name = "beta"
address = "127.0.0.2:7788"
disk = "/var/lib/tandem/r0.img"
nbd = "127.0.0.2:10809"
control = "/run/tandem/r0-beta.ctl"
"#;

const PATH: &str = "/etc/tandem/r0.toml";

fn parse(text: &str) -> Config {
    match Config::parse(text, PATH) {
        Ok(config) => config,
        Err(error) => panic!("{error}\n--- in ---\n{text}"),
    }
}

/// The one-line error for `text`; also checks that it is one line.
fn error(text: &str) -> String {
    let message = Config::parse(text, PATH)
        .expect_err("the config should be refused")
        .to_string();
    assert!(!message.contains('\n'), "{message:?} is not one line");
    message
}

/// `text` with the first `from` replaced by `to`; `from` must be there.
fn with(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} not in the config");
    text.replacen(from, to, 1)
}

/// `text` with `line` inserted so that it becomes line `number`.
fn insert_line(text: &str, number: usize, line: &str) -> String {
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(number - 1, line);
    lines.join("\n") + "\n"
}

fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

// ---- the full example and the defaults --------------------------------

#[test]
fn full_example_parses_to_the_expected_values() {
    let config = parse(FULL);
    let expected = Config {
        path: PathBuf::from(PATH),
        resource: ResourceConfig {
            name: "r0".to_owned(),
            protocol: Protocol::C,
            shared_secret: Some("change-me".to_owned()),
            fencing: Fencing::ResourceAndStonith,
        },
        net: NetConfig {
            ping_interval: secs(1),
            ping_timeout: secs(10),
            connect_retry: secs(1),
            max_buffers: 8192,
        },
        sync: SyncConfig {
            rate: 0,
            verify_alg: VerifyAlg::Crc32,
        },
        disk: DiskConfig {
            on_io_error: OnIoError::Detach,
        },
        handlers: HandlersConfig {
            fence_peer: Some(PathBuf::from("/usr/lib/tandem/fence-peer")),
            split_brain: Some(PathBuf::from("/usr/lib/tandem/notify")),
        },
        nodes: vec![
            NodeConfig {
                name: "alpha".to_owned(),
                address: addr("127.0.0.1:7788"),
                disk: PathBuf::from("/var/lib/tandem/r0.img"),
                meta_disk: MetaDisk::Internal,
                nbd: NbdListen::Tcp(addr("127.0.0.1:10809")),
                control: PathBuf::from("/run/tandem/r0-alpha.ctl"),
            },
            NodeConfig {
                name: "beta".to_owned(),
                address: addr("127.0.0.2:7788"),
                disk: PathBuf::from("/var/lib/tandem/r0-beta.img"),
                meta_disk: MetaDisk::Internal,
                nbd: NbdListen::Tcp(addr("127.0.0.2:10809")),
                control: PathBuf::from("/run/tandem/r0-beta.ctl"),
            },
        ],
    };
    assert_eq!(config, expected);
}

#[test]
fn omitted_keys_take_the_documented_defaults() {
    let config = parse(MINIMAL);
    assert_eq!(config.resource.protocol, Protocol::C);
    assert_eq!(config.resource.shared_secret, None);
    assert_eq!(config.resource.fencing, Fencing::DontCare);
    assert_eq!(config.net.ping_interval, secs(1));
    assert_eq!(config.net.ping_timeout, secs(10));
    assert_eq!(config.net.connect_retry, secs(1));
    assert_eq!(config.net.max_buffers, 8192);
    assert_eq!(config.sync.rate, 0);
    assert_eq!(config.sync.verify_alg, VerifyAlg::Crc32);
    assert_eq!(config.disk.on_io_error, OnIoError::Detach);
    assert_eq!(config.handlers, HandlersConfig::default());
    assert_eq!(config.nodes.len(), 1);
    assert_eq!(config.nodes[0].meta_disk, MetaDisk::Internal);
}

#[test]
fn sections_may_be_empty_and_keys_quoted_dotted_or_inline() {
    let text = insert_line(MINIMAL, 1, "net.ping-timeout = \"20s\"");
    let text = with(&text, "[[node]]", "[sync]\n[disk]\n[handlers]\n\n[[node]]");
    assert_eq!(parse(&text).net.ping_timeout, secs(20));

    let text = with(MINIMAL, "name = \"r0\"", "\"name\" = \"r0\"");
    assert_eq!(parse(&text).resource.name, "r0");

    let text = format!("{MINIMAL}\n[net]\nmax-buffers = 1\n");
    assert_eq!(parse(&text).net.max_buffers, 1);

    let text = r#"
resource = { name = "r0" }
node = [{ name = "a", address = "127.0.0.1:1", disk = "d", nbd = "unix:n", control = "c" }]
"#;
    let config = parse(text);
    assert_eq!(config.nodes[0].nbd, NbdListen::Unix("/etc/tandem/n".into()));
}

// ---- units inside the file ---------------------------------------------

#[test]
fn sizes_and_durations_in_the_file() {
    let config = |section: &str| parse(&format!("{MINIMAL}\n{section}\n"));
    for (rate, bytes) in [
        ("\"0\"", 0),
        ("0", 0),
        ("4096", 4096),
        ("\"4096\"", 4096),
        ("\"64KiB\"", 64 << 10),
        ("\"64k\"", 64 << 10),
        ("\"512MiB\"", 512 << 20),
        ("\"1G\"", 1 << 30),
        ("\"1 GB\"", 1 << 30),
    ] {
        assert_eq!(config(&format!("[sync]\nrate = {rate}")).sync.rate, bytes);
    }
    for (interval, duration) in [
        ("\"500ms\"", Duration::from_millis(500)),
        ("\"2s\"", secs(2)),
        ("2", secs(2)),
        ("\"2\"", secs(2)),
    ] {
        let net = config(&format!("[net]\nping-interval = {interval}")).net;
        assert_eq!(net.ping_interval, duration);
    }
    let net = config("[net]\nping-timeout = \"2m\"\nconnect-retry = \"1h\"").net;
    assert_eq!(net.ping_timeout, secs(120));
    assert_eq!(net.connect_retry, secs(3600));
}

#[test]
fn a_bad_size_names_file_line_section_and_key() {
    let text = format!(
        "[resource]\nname = \"r0\"\n\n[net]\nping-interval = \"1s\"\n[sync]\nrate = \"12XB\"\n\n{}",
        &TWO_NODES[TWO_NODES.find("[[node]]").unwrap()..]
    );
    let message = Config::parse(&text, "r0.toml").unwrap_err().to_string();
    assert_eq!(
        message,
        r#"r0.toml:7: [sync] rate: "12XB" is not a size (use e.g. 4096, 64KiB, 1G)"#
    );
}

#[test]
fn bad_sizes_and_durations_are_refused() {
    for (section, key, value, expected) in [
        ("sync", "rate", "\"1.5G\"", r#""1.5G" is not a size"#),
        ("sync", "rate", "-1", r#""-1" is not a size"#),
        ("sync", "rate", "\"16EiB\"", "too large a size"),
        ("sync", "rate", "1.5", "a size such as 4096, 64KiB or 1G"),
        (
            "net",
            "ping-timeout",
            "\"10x\"",
            r#""10x" is not a duration"#,
        ),
        (
            "net",
            "ping-timeout",
            "\"1.5s\"",
            r#""1.5s" is not a duration"#,
        ),
        (
            "net",
            "connect-retry",
            "\"-1s\"",
            r#""-1s" is not a duration"#,
        ),
        ("net", "ping-interval", "-3", r#""-3" is not a duration"#),
        (
            "net",
            "ping-interval",
            "true",
            "a duration such as 500ms, 10s or 2m",
        ),
    ] {
        let text = format!("{MINIMAL}\n[{section}]\n{key} = {value}\n");
        let line = text.lines().count();
        let message = error(&text);
        let prefix = format!("{PATH}:{line}: [{section}] {key}: ");
        assert!(message.starts_with(&prefix), "{message:?}");
        assert!(message.contains(expected), "{message:?}");
    }
}

#[test]
fn other_wrong_types_name_the_key() {
    let text = format!("{MINIMAL}\n[net]\nmax-buffers = \"many\"\n");
    let message = error(&text);
    assert!(
        message.ends_with(&format!(
            "{PATH}:12: [net] max-buffers: invalid type: string \"many\", \
             expected a whole number such as 8192"
        )),
        "{message:?}"
    );

    let text = with(MINIMAL, "disk = \"/var/lib/tandem/r0.img\"", "disk = 5");
    let message = error(&text);
    assert!(
        message.starts_with(&format!("{PATH}:7: [[node]] disk: invalid type")),
        "{message:?}"
    );
}

// ---- keyword values -----------------------------------------------------

#[test]
fn keyword_values_round_trip_through_as_str() {
    for &value in Protocol::ALL {
        assert_eq!(value.as_str().parse(), Ok(value));
    }
    for &value in Fencing::ALL {
        assert_eq!(value.as_str().parse(), Ok(value));
    }
    for &value in VerifyAlg::ALL {
        assert_eq!(value.as_str().parse(), Ok(value));
    }
    for &value in OnIoError::ALL {
        assert_eq!(value.as_str().parse(), Ok(value));
    }
    assert_eq!(Protocol::C.as_str(), "C");
    assert_eq!(Fencing::DontCare.as_str(), "dont-care");
    assert_eq!(Fencing::ResourceOnly.as_str(), "resource-only");
    assert_eq!(Fencing::ResourceAndStonith.as_str(), "resource-and-stonith");
    assert_eq!(VerifyAlg::Sha256.as_str(), "sha256");
    assert_eq!(OnIoError::PassOn.as_str(), "pass-on");
    assert_eq!(OnIoError::PassOn.to_string(), "pass-on");
}

#[test]
fn keyword_values_in_the_file() {
    let config = parse(&format!(
        "{MINIMAL}\n[sync]\nverify-alg = \"SHA256\"\n[disk]\non-io-error = \"pass-on\"\n"
    ));
    assert_eq!(config.sync.verify_alg, VerifyAlg::Sha256);
    assert_eq!(config.disk.on_io_error, OnIoError::PassOn);
    let config = parse(&with(
        MINIMAL,
        "name = \"r0\"",
        "name = \"r0\"\nprotocol = \"c\"\nfencing = \"resource-only\"",
    ));
    assert_eq!(config.resource.fencing, Fencing::ResourceOnly);
}

#[test]
fn unknown_keyword_values_list_the_choices() {
    let text = with(FULL, "\"resource-and-stonith\"", "\"maybe\"");
    assert_eq!(
        error(&text),
        format!(
            "{PATH}:5: [resource] fencing: \"maybe\" is not a fencing policy \
             (expected one of: dont-care, resource-only, resource-and-stonith)"
        )
    );
    let text = with(FULL, "protocol = \"C\"", "protocol = \"A\"");
    assert_eq!(
        error(&text),
        format!(
            "{PATH}:3: [resource] protocol: \"A\" is not a replication protocol \
             (expected one of: C)"
        )
    );
    let text = with(FULL, "\"crc32\"", "\"md5\"");
    assert!(error(&text).ends_with(
        ":15: [sync] verify-alg: \"md5\" is not a verify algorithm (expected one of: crc32, sha256)"
    ));
    let text = with(FULL, "\"detach\"", "\"panic\"");
    assert!(error(&text).ends_with(
        ":18: [disk] on-io-error: \"panic\" is not an on-io-error policy \
         (expected one of: detach, pass-on)"
    ));
}

// ---- unknown, missing and misshapen keys --------------------------------

#[test]
fn unknown_key_in_a_section() {
    let text = insert_line(FULL, 12, "foo = 1");
    assert_eq!(
        error(&text),
        "/etc/tandem/r0.toml:12: unknown key `foo` in [net] (expected one of: \
         ping-interval, ping-timeout, connect-retry, max-buffers)"
    );
    let error = Config::parse(&text, PATH).unwrap_err();
    assert_eq!(error.line(), Some(12));
    assert_eq!(error.path(), Path::new(PATH));
}

#[test]
fn unknown_key_at_the_top_level() {
    let text = insert_line(FULL, 1, "foo = 1");
    assert_eq!(
        error(&text),
        format!(
            "{PATH}:1: unknown key `foo` at the top level (expected one of: \
             [resource], [net], [sync], [disk], [handlers], [[node]])"
        )
    );
    let text = format!("{MINIMAL}\n[nets]\nping-interval = 1\n");
    assert!(
        error(&text).starts_with(&format!("{PATH}:11: unknown section [nets] (expected")),
        "{}",
        error(&text)
    );
    let text = format!("{MINIMAL}\n[[nodes]]\nname = \"x\"\n");
    assert!(error(&text).starts_with(&format!("{PATH}:11: unknown section [[nodes]]")));
}

#[test]
fn unknown_key_in_a_node() {
    // Line 38 is in the second [[node]].
    let text = insert_line(FULL, 38, "weight = 3");
    assert_eq!(
        error(&text),
        format!(
            "{PATH}:38: unknown key `weight` in [[node]] (expected one of: \
             name, address, disk, meta-disk, nbd, control)"
        )
    );
}

#[test]
fn unknown_keys_in_other_spellings() {
    let text = insert_line(FULL, 8, "ping_interval = \"2s\"");
    assert_eq!(
        error(&text),
        format!(
            "{PATH}:8: unknown key `ping_interval` in [net] \
             (did you mean `ping-interval`? keys use dashes)"
        )
    );
    let text = insert_line(MINIMAL, 1, "net.pingtimeout = 3");
    assert!(error(&text).starts_with(&format!("{PATH}:1: unknown key `pingtimeout` in [net]")));
    let text = format!("{MINIMAL}\n[net.extra]\nx = 1\n");
    assert!(error(&text).starts_with(&format!("{PATH}:11: unknown key `extra` in [net]")));
    let text = insert_line(FULL, 8, "\"a\\nb\" = 1");
    assert!(error(&text).contains("unknown key `a\\nb` in [net]"));
}

#[test]
fn a_misspelt_required_key_is_reported_as_unknown() {
    let text = with(MINIMAL, "name = \"r0\"", "nmae = \"r0\"");
    assert_eq!(
        error(&text),
        format!(
            "{PATH}:2: unknown key `nmae` in [resource] (expected one of: \
             name, protocol, shared-secret, fencing)"
        )
    );
}

#[test]
fn the_first_problem_in_the_file_is_reported() {
    // [sync] comes after [net] in key order, but first in this file.
    let text = format!("{MINIMAL}\n[sync]\nbogus = 1\n[net]\nbogus = 1\n");
    assert!(error(&text).starts_with(&format!("{PATH}:12: unknown key `bogus` in [sync]")));
}

#[test]
fn missing_required_keys() {
    let text = with(FULL, "name = \"r0\"\n", "");
    assert_eq!(
        error(&text),
        format!("{PATH}:1: [resource] is missing the required key `name`")
    );
    // The second node's header is on line 32.
    let text = with(FULL, "disk = \"/var/lib/tandem/r0-beta.img\"\n", "");
    assert_eq!(
        error(&text),
        format!("{PATH}:32: [[node]] is missing the required key `disk`")
    );
    for key in ["name", "address", "nbd", "control"] {
        let node = MINIMAL.find("[[node]]").unwrap();
        let start = node + MINIMAL[node..].find(&format!("\n{key} = ")).unwrap() + 1;
        let end = start + MINIMAL[start..].find('\n').unwrap() + 1;
        let text = format!("{}{}", &MINIMAL[..start], &MINIMAL[end..]);
        assert_eq!(
            error(&text),
            format!("{PATH}:4: [[node]] is missing the required key `{key}`")
        );
    }
    let text = &MINIMAL[MINIMAL.find("[[node]]").unwrap()..];
    assert_eq!(
        error(text),
        format!("{PATH}: missing [resource] section (it must set at least `name`)")
    );
    let text = &MINIMAL[..MINIMAL.find("[[node]]").unwrap()];
    assert_eq!(
        error(text),
        format!("{PATH}: no [[node]] entries (a resource has one or two)")
    );
    assert_eq!(
        error("node = []\n[resource]\nname = \"r0\"\n"),
        format!("{PATH}: no [[node]] entries (a resource has one or two)")
    );
}

#[test]
fn misshapen_sections() {
    let text = with(MINIMAL, "[[node]]", "[node]");
    assert_eq!(
        error(&text),
        format!("{PATH}:4: `node` must be written as [[node]] entries, one per node")
    );
    let text = format!("{MINIMAL}\n[[net]]\nmax-buffers = 1\n");
    assert_eq!(
        error(&text),
        format!("{PATH}:11: [net] is a single table: write [net], not [[net]]")
    );
    let text = insert_line(MINIMAL, 1, "sync = 5");
    assert_eq!(
        error(&text),
        format!("{PATH}:1: `sync` must be the table [sync], not an integer")
    );
}

#[test]
fn toml_syntax_errors_give_the_line() {
    let text = insert_line(MINIMAL, 3, "[net");
    let message = error(&text);
    assert!(
        message.starts_with(&format!("{PATH}:3: not valid TOML: ")),
        "{message}"
    );
    let text = insert_line(MINIMAL, 3, "name = \"again\"");
    assert_eq!(
        error(&text),
        format!("{PATH}:3: not valid TOML: duplicate key (at `name`)")
    );
}

// ---- the rules ----------------------------------------------------------

#[test]
fn duplicate_node_names() {
    let text = with(TWO_NODES, "name = \"beta\"", "name = \"alpha\"");
    assert_eq!(
        error(&text),
        format!("{PATH}:12: [[node]] name: \"alpha\" names two nodes; node names must be unique")
    );
}

#[test]
fn three_nodes_are_refused() {
    let third = r#"
[[node]]
name = "gamma"
address = "127.0.0.3:7788"
disk = "/var/lib/tandem/r0.img"
nbd = "127.0.0.3:10809"
control = "/run/tandem/r0-gamma.ctl"
"#;
    let text = format!("{TWO_NODES}{third}");
    assert_eq!(
        error(&text),
        format!("{PATH}:18: [[node]]: 3 nodes given; a resource has one or two")
    );
}

#[test]
fn node_endpoints_must_differ() {
    for (key, alpha, beta, shown) in [
        (
            "address",
            "127.0.0.1:7788",
            "127.0.0.2:7788",
            "127.0.0.1:7788",
        ),
        (
            "nbd",
            "127.0.0.1:10809",
            "127.0.0.2:10809",
            "127.0.0.1:10809",
        ),
        (
            "control",
            "/run/tandem/r0-alpha.ctl",
            "/run/tandem/r0-beta.ctl",
            "/run/tandem/r0-alpha.ctl",
        ),
    ] {
        let text = with(
            TWO_NODES,
            &format!("{key} = \"{beta}\""),
            &format!("{key} = \"{alpha}\""),
        );
        let line = 1 + text[..text.rfind(&format!("{key} = ")).unwrap()]
            .matches('\n')
            .count();
        assert_eq!(
            error(&text),
            format!(
                "{PATH}:{line}: [[node]] {key}: {shown} is also node \"alpha\"'s {key}; each node needs its own"
            )
        );
    }
    // A relative path that resolves to the other node's path clashes too.
    let text = with(
        TWO_NODES,
        "control = \"/run/tandem/r0-beta.ctl\"",
        "control = \"../../run/tandem/r0-alpha.ctl\"",
    );
    let text = with(
        &text,
        "control = \"/run/tandem/r0-alpha.ctl\"",
        "control = \"/etc/tandem/../../run/tandem/r0-alpha.ctl\"",
    );
    assert!(error(&text).contains("[[node]] control:"));
}

#[test]
fn both_nodes_may_share_a_disk_path() {
    // On two machines, /dev/sdb1 on each is normal.
    let config = parse(TWO_NODES);
    assert_eq!(config.nodes[0].disk, config.nodes[1].disk);
}

#[test]
fn bad_link_addresses() {
    for (value, expected) in [
        (
            "alpha:7788",
            "is not a socket address (use IP:port, e.g. 192.0.2.1:7788 or [2001:db8::1]:7788; host names are not resolved)",
        ),
        ("localhost:7788", "host names are not resolved"),
        ("127.0.0.1", "is not a socket address"),
        ("127.0.0.1:99999", "is not a socket address"),
        ("::1:7788", "is not a socket address"),
        ("", "is not a socket address"),
        (
            "127.0.0.1:0",
            "has port 0; the peer dials this address, give a fixed port",
        ),
        (
            "0.0.0.0:7788",
            "is not an address the peer can dial; give this node's own IP",
        ),
        ("[::]:7788", "is not an address the peer can dial"),
    ] {
        let text = with(MINIMAL, "\"127.0.0.1:7788\"", &format!("{value:?}"));
        let message = error(&text);
        let prefix = format!("{PATH}:6: [[node]] address: {value:?} ");
        assert!(message.starts_with(&prefix), "{message}");
        assert!(message.contains(expected), "{message}");
    }
    let text = with(MINIMAL, "\"127.0.0.1:7788\"", "\"[2001:db8::1]:7788\"");
    assert_eq!(parse(&text).nodes[0].address, addr("[2001:db8::1]:7788"));
}

#[test]
fn nbd_endpoints() {
    for (value, expected) in [
        ("[::1]:10809", NbdListen::Tcp(addr("[::1]:10809"))),
        ("0.0.0.0:10809", NbdListen::Tcp(addr("0.0.0.0:10809"))),
        (
            "unix:/run/tandem/r0-alpha.nbd",
            NbdListen::Unix("/run/tandem/r0-alpha.nbd".into()),
        ),
    ] {
        let text = with(MINIMAL, "\"127.0.0.1:10809\"", &format!("{value:?}"));
        assert_eq!(parse(&text).nodes[0].nbd, expected);
        assert_eq!(expected.to_string(), value);
    }
    for (value, expected) in [
        (
            "localhost:10809",
            "is not an NBD endpoint (use IP:port, e.g. 127.0.0.1:10809 or [::1]:10809, or unix:/path/to/socket; host names are not resolved)",
        ),
        ("10809", "is not an NBD endpoint"),
        ("tcp://127.0.0.1:10809", "is not an NBD endpoint"),
        ("unix", "is not an NBD endpoint"),
        (
            "unix:",
            "names no socket path (use e.g. unix:/run/tandem/r0.nbd)",
        ),
        (
            "127.0.0.1:0",
            "has port 0; give the fixed port NBD clients connect to",
        ),
    ] {
        let text = with(MINIMAL, "\"127.0.0.1:10809\"", &format!("{value:?}"));
        let message = error(&text);
        let prefix = format!("{PATH}:8: [[node]] nbd: {value:?} ");
        assert!(message.starts_with(&prefix), "{message}");
        assert!(message.contains(expected), "{message}");
    }
}

#[test]
fn names_must_be_simple() {
    for good in ["r0", "R_0.a-b", "0"] {
        let text = with(MINIMAL, "name = \"r0\"", &format!("name = {good:?}"));
        assert_eq!(parse(&text).resource.name, good);
        let text = with(MINIMAL, "name = \"alpha\"", &format!("name = {good:?}"));
        assert_eq!(parse(&text).nodes[0].name, good);
    }
    for bad in ["", "r 0", "r0/x", "é", "a:b"] {
        let text = with(MINIMAL, "name = \"r0\"", &format!("name = {bad:?}"));
        assert_eq!(
            error(&text),
            format!(
                "{PATH}:2: [resource] name: {bad:?} is not a valid name \
                 (use one or more of A-Z a-z 0-9 _ . -)"
            )
        );
        let text = with(MINIMAL, "name = \"alpha\"", &format!("name = {bad:?}"));
        assert!(error(&text).starts_with(&format!("{PATH}:5: [[node]] name: {bad:?} is not")));
    }
}

#[test]
fn net_limits() {
    let net = |body: &str| format!("{MINIMAL}\n[net]\n{body}\n");
    assert_eq!(
        error(&net("max-buffers = 0")),
        format!("{PATH}:12: [net] max-buffers: must be at least 1")
    );
    assert_eq!(
        error(&net("max-buffers = -1")),
        format!("{PATH}:12: [net] max-buffers: -1 is out of range (0 to 4294967295)")
    );
    assert_eq!(
        error(&net("ping-interval = \"10s\"\nping-timeout = \"10s\"")),
        format!(
            "{PATH}:13: [net] ping-timeout: ping-timeout (10s) must be longer than \
             ping-interval (10s)"
        )
    );
    // With ping-timeout left at its default, the error points at [net].
    assert_eq!(
        error(&net("ping-interval = \"20s\"")),
        format!(
            "{PATH}:11: [net] ping-timeout: ping-timeout (10s) must be longer than \
             ping-interval (20s)"
        )
    );
    assert_eq!(
        error(&net("ping-interval = \"0s\"")),
        format!("{PATH}:12: [net] ping-interval: must be longer than 0")
    );
    assert_eq!(
        error(&net("connect-retry = 0")),
        format!("{PATH}:12: [net] connect-retry: must be longer than 0")
    );
    let config = parse(&net("ping-interval = \"500ms\"\nping-timeout = \"501ms\""));
    assert_eq!(config.net.ping_timeout, Duration::from_millis(501));
}

#[test]
fn empty_strings_are_refused() {
    let text = with(FULL, "\"change-me\"", "\"\"");
    assert_eq!(
        error(&text),
        format!(
            "{PATH}:4: [resource] shared-secret: is empty; remove the key to run the \
             link without authentication"
        )
    );
    let text = with(FULL, "\"/usr/lib/tandem/notify\"", "\"\"");
    assert!(error(&text).starts_with(&format!("{PATH}:22: [handlers] split-brain: is empty")));
    let text = with(MINIMAL, "\"/var/lib/tandem/r0.img\"", "\"\"");
    assert!(error(&text).starts_with(&format!("{PATH}:7: [[node]] disk: is empty")));
    let text = with(MINIMAL, "\"/run/tandem/r0-alpha.ctl\"", "\"\"");
    assert!(error(&text).starts_with(&format!("{PATH}:9: [[node]] control: is empty")));
    let text = insert_line(MINIMAL, 8, "meta-disk = \"\"");
    assert!(error(&text).starts_with(&format!(
        "{PATH}:8: [[node]] meta-disk: \"\" is not a metadata location"
    )));
}

#[test]
fn meta_disk_must_not_be_the_disk() {
    let text = insert_line(MINIMAL, 8, "meta-disk = \"/var/lib/tandem/r0.img\"");
    assert_eq!(
        error(&text),
        format!(
            "{PATH}:8: [[node]] meta-disk: is the same file as disk; use \"internal\" \
             or a separate file"
        )
    );
    let text = insert_line(MINIMAL, 8, "meta-disk = \"Internal\"");
    assert_eq!(parse(&text).nodes[0].meta_disk, MetaDisk::Internal);
}

#[test]
fn unix_socket_paths_must_fit_the_kernel_limit() {
    let fits = format!("/{}", "x".repeat(106));
    let text = with(MINIMAL, "/run/tandem/r0-alpha.ctl", &fits);
    assert_eq!(parse(&text).nodes[0].control, PathBuf::from(&fits));

    let long = format!("/{}", "x".repeat(107));
    let text = with(MINIMAL, "/run/tandem/r0-alpha.ctl", &long);
    assert_eq!(
        error(&text),
        format!(
            "{PATH}:9: [[node]] control: the socket path {long} is 108 bytes; unix sockets \
             allow at most 107 (after relative paths are resolved)"
        )
    );
    let text = with(MINIMAL, "127.0.0.1:10809", &format!("unix:{long}"));
    assert!(error(&text).starts_with(&format!("{PATH}:8: [[node]] nbd: the socket path")));
}

// ---- relative paths -----------------------------------------------------

#[test]
fn relative_paths_are_relative_to_the_config_directory() {
    let text = format!(
        "{}\n[handlers]\nfence-peer = \"bin/fence\"\nsplit-brain = \"/usr/bin/notify\"\n",
        with(
            &with(
                &with(MINIMAL, "\"/var/lib/tandem/r0.img\"", "\"r0.img\""),
                "\"127.0.0.1:10809\"",
                "\"unix:sock/r0.nbd\"",
            ),
            "\"/run/tandem/r0-alpha.ctl\"",
            "\"../run/r0.ctl\"\nmeta-disk = \"meta/r0.md\"",
        )
    );
    let config = Config::parse(&text, "/srv/tandem/r0.toml").unwrap();
    let node = &config.nodes[0];
    assert_eq!(node.disk, PathBuf::from("/srv/tandem/r0.img"));
    assert_eq!(node.nbd, NbdListen::Unix("/srv/tandem/sock/r0.nbd".into()));
    assert_eq!(node.control, PathBuf::from("/srv/tandem/../run/r0.ctl"));
    assert_eq!(
        node.meta_disk,
        MetaDisk::External("/srv/tandem/meta/r0.md".into())
    );
    assert_eq!(
        config.handlers.fence_peer,
        Some(PathBuf::from("/srv/tandem/bin/fence"))
    );
    assert_eq!(
        config.handlers.split_brain,
        Some(PathBuf::from("/usr/bin/notify"))
    );

    // A config named without a directory leaves them relative to the current
    // directory, which is where that config is.
    let config = Config::parse(&text, "r0.toml").unwrap();
    assert_eq!(config.nodes[0].disk, PathBuf::from("r0.img"));
    let config = Config::parse(&text, "conf/r0.toml").unwrap();
    assert_eq!(config.nodes[0].disk, PathBuf::from("conf/r0.img"));

    // Absolute paths stay as they are.
    assert_eq!(
        parse(MINIMAL).nodes[0].disk,
        PathBuf::from("/var/lib/tandem/r0.img")
    );
}

// ---- loading ------------------------------------------------------------

#[test]
fn load_reads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r0.toml");
    std::fs::write(&path, with(MINIMAL, "/var/lib/tandem/r0.img", "r0.img")).unwrap();
    let config = Config::load(&path).unwrap();
    assert_eq!(config.path, path);
    assert_eq!(config.nodes[0].disk, dir.path().join("r0.img"));
}

#[test]
fn load_reports_a_missing_file() {
    let error = Config::load("/nonexistent/dir/r0.toml").unwrap_err();
    assert_eq!(
        error.to_string(),
        "cannot read config /nonexistent/dir/r0.toml: No such file or directory"
    );
    assert!(matches!(error, ConfigError::Read { .. }));
}

#[test]
fn load_reports_a_file_that_is_not_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r0.toml");
    std::fs::write(&path, b"[resource]\nname = \"\xff\"\n").unwrap();
    assert_eq!(
        Config::load(&path).unwrap_err().to_string(),
        format!(
            "cannot read config {}: the file is not UTF-8 text",
            path.display()
        )
    );
}

#[test]
fn load_reports_errors_with_the_path_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r0.toml");
    std::fs::write(&path, insert_line(MINIMAL, 3, "foo = 1")).unwrap();
    let message = Config::load(&path).unwrap_err().to_string();
    assert!(
        message.starts_with(&format!(
            "{}:3: unknown key `foo` in [resource]",
            path.display()
        )),
        "{message}"
    );
}

// ---- node selection -----------------------------------------------------

#[test]
fn explicit_node_selection() {
    let config = parse(TWO_NODES);
    assert_eq!(config.node(Some("beta")).unwrap().name, "beta");
    assert_eq!(config.node(Some("alpha")).unwrap().name, "alpha");
    let error = config.node(Some("gamma")).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("{PATH}: no node named \"gamma\" (nodes: alpha, beta)")
    );
    // An explicit name never falls back to the only node.
    assert!(parse(MINIMAL).node(Some("beta")).is_err());
}

#[test]
fn node_selection_by_host_name() {
    let config = parse(TWO_NODES);
    assert_eq!(config.node_for_host(Some("beta")).unwrap().name, "beta");
    assert_eq!(
        config
            .node_for_host(Some("alpha.example.com"))
            .unwrap()
            .name,
        "alpha"
    );
    // A node name with dots matches the full host name first.
    let dotted = with(TWO_NODES, "name = \"beta\"", "name = \"alpha.b\"");
    let config = parse(&dotted);
    assert_eq!(
        config.node_for_host(Some("alpha.b")).unwrap().name,
        "alpha.b"
    );
    assert_eq!(config.node_for_host(Some("alpha.c")).unwrap().name, "alpha");
}

#[test]
fn single_node_is_the_default() {
    let config = parse(MINIMAL);
    assert_eq!(
        config.node_for_host(Some("elsewhere")).unwrap().name,
        "alpha"
    );
    assert_eq!(config.node_for_host(None).unwrap().name, "alpha");
    // Whatever this machine is called.
    assert_eq!(config.node(None).unwrap().name, "alpha");
}

#[test]
fn ambiguous_node_selection_asks_for_node() {
    let config = parse(TWO_NODES);
    assert_eq!(
        config.node_for_host(Some("gamma")).unwrap_err().to_string(),
        format!(
            "{PATH}: no node is named after this host (\"gamma\"); pass --node NAME \
             (nodes: alpha, beta)"
        )
    );
    assert_eq!(
        config.node_for_host(None).unwrap_err().to_string(),
        format!(
            "{PATH}: cannot tell which node this is (the host name is unreadable); \
             pass --node NAME (nodes: alpha, beta)"
        )
    );
}

#[test]
fn peer_of() {
    let config = parse(TWO_NODES);
    assert_eq!(config.peer_of("alpha").unwrap().name, "beta");
    assert_eq!(config.peer_of("beta").unwrap().name, "alpha");
    assert!(config.peer_of("gamma").is_none());
    assert!(parse(MINIMAL).peer_of("alpha").is_none());
}

// ---- odds and ends ------------------------------------------------------

#[test]
fn debug_output_hides_the_shared_secret() {
    let config = parse(FULL);
    let debug = format!("{config:?}");
    assert!(!debug.contains("change-me"), "{debug}");
    assert!(debug.contains("<redacted>"), "{debug}");
}

#[test]
fn meta_disk_and_nbd_display_their_config_spelling() {
    assert_eq!(MetaDisk::Internal.to_string(), "internal");
    assert_eq!(
        MetaDisk::External("/dev/sdb2".into()).to_string(),
        "/dev/sdb2"
    );
    assert_eq!(
        NbdListen::Tcp(addr("127.0.0.1:10809")).to_string(),
        "127.0.0.1:10809"
    );
    assert_eq!(
        NbdListen::Unix("/run/x.nbd".into()).to_string(),
        "unix:/run/x.nbd"
    );
}

#[test]
fn no_text_makes_parse_panic() {
    // Truncations of a valid file hit the parser, the key checks and serde at
    // every possible point.
    for end in (0..=FULL.len()).filter(|&end| FULL.is_char_boundary(end)) {
        let _ = Config::parse(&FULL[..end], PATH);
    }
}
