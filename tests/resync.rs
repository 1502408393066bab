//! The resync engine between two real `repd` processes on loopback: the
//! `[sync] rate` cap measured over ten seconds, progress in `status` and
//! `events`, `repctl wait-sync` output, and zero ranges for regions that
//! read as zeros on the source.

mod common;

use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::tools::Bg;
use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(120);

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Fill `[0, len)` of a disk file with non-zero pseudo-random data.
fn fill(path: &std::path::Path, len: u64, seed: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let block = pattern(seed, MIB as usize);
    let mut off = 0;
    while off < len {
        let n = (len - off).min(MIB) as usize;
        f.write_all_at(&block[..n], off).unwrap();
        off += n as u64;
    }
}

/// `create-md` and start both nodes, with the link up.
fn start_pair(c: &mut Cluster) {
    for n in ["alpha", "beta"] {
        c.repctl(n, &["create-md"]).ok();
        c.start(n);
    }
    c.repctl("alpha", &["wait-connect", "--timeout", "20s"])
        .ok();
}

/// `repctl … ARGS` in the background, its stdout to `name` in the
/// cluster's directory.
fn repctl_bg(c: &Cluster, node: &str, args: &[&str], name: &str) -> (Bg, std::path::PathBuf) {
    let path = c.path(name);
    let out = std::fs::File::create(&path).unwrap();
    let bg = Bg::spawn(
        Command::new(REPCTL)
            .arg("--config")
            .arg(c.config_of(node))
            .args(["--node", node])
            .args(args)
            .stdout(out)
            .stderr(Stdio::null()),
    );
    (bg, path)
}

fn json_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `(time, done_bytes, status)` of alpha's running resync, the time taken
/// halfway through the status call.
fn sample(c: &Cluster) -> (Instant, u64, Value) {
    let t0 = Instant::now();
    let s = c.status("alpha");
    let t = t0 + (Instant::now() - t0) / 2;
    let done = u(&s["sync"]["done_bytes"]);
    (t, done, s)
}

#[test]
fn a_rate_cap_holds_within_ten_percent_over_ten_seconds() {
    // 8 MiB/s: well below what a debug build syncs on a loaded 2-core
    // machine (about 36 MiB/s), so the cap, not the machine, sets the pace.
    const RATE: f64 = 8.0 * MIB as f64;
    let size = 112 * MIB;
    let mut c = Spec::pair(size)
        .resource("fencing = \"dont-care\"")
        .sections("[sync]\nrate = \"8M\"\n")
        .build();
    // Real data everywhere: nothing travels as a zero range.
    fill(&c.node("alpha").disk.clone(), size, 1);
    start_pair(&mut c);
    let (_events, events_path) = repctl_bg(&c, "alpha", &["events"], "events.jsonl");
    c.repctl("alpha", &["primary", "--force"]).ok();
    c.wait_status("alpha", "the resync to start", LONG, |s| {
        s["replication"] == "SyncSource" && s["sync"]["done_bytes"].as_u64().unwrap_or(0) > 0
    });
    std::thread::sleep(Duration::from_secs(1));
    let (t0, d0, _) = sample(&c);
    let r0 = u(&c.field("beta", &["counters", "resync_received_bytes"]));
    std::thread::sleep(Duration::from_secs(10));
    let (t1, d1, s1) = sample(&c);
    let r1 = u(&c.field("beta", &["counters", "resync_received_bytes"]));
    assert_eq!(s1["replication"], "SyncSource", "the resync ended early");
    let secs = (t1 - t0).as_secs_f64();
    let rate = (d1 - d0) as f64 / secs;
    let received = (r1 - r0) as f64 / secs;
    eprintln!(
        "rate cap 8 MiB/s: {:.2} MiB/s done, {:.2} MiB/s received by the target over {secs:.2} s; status says {}",
        rate / MIB as f64,
        received / MIB as f64,
        s1["sync"]
    );
    assert!(
        (rate - RATE).abs() <= RATE * 0.10,
        "{:.2} MiB/s over {secs:.2} s with rate = 8M",
        rate / MIB as f64
    );
    assert!(
        (received - RATE).abs() <= RATE * 0.10,
        "the target received {:.2} MiB/s over {secs:.2} s with rate = 8M",
        received / MIB as f64
    );
    // The status shows the rate and an ETA that fits it.
    let shown = u(&s1["sync"]["bytes_per_sec"]) as f64;
    assert!(
        (shown - RATE).abs() <= RATE * 0.10,
        "status shows {shown} bytes/s"
    );
    let left = u(&s1["sync"]["total_bytes"]) - u(&s1["sync"]["done_bytes"]);
    let eta = u(&s1["sync"]["eta_sec"]) as f64;
    let want = left as f64 / RATE;
    assert!(
        (eta - want).abs() <= want * 0.15 + 1.0,
        "ETA {eta} s for {left} bytes left"
    );
    // `events` carried a progress update about every second meanwhile.
    let lines = json_lines(&events_path);
    let progress: Vec<&Value> = lines
        .iter()
        .filter(|e| e["event"] == "sync-progress")
        .collect();
    assert!(
        progress.len() >= 9,
        "{} sync-progress events in more than 11 s of resync",
        progress.len()
    );
    for e in &progress {
        let s = &e["sync"];
        for f in ["done_bytes", "total_bytes", "bytes_per_sec"] {
            assert!(s[f].is_u64(), "{f} missing in {e}");
        }
        assert!(s.get("eta_sec").is_some(), "eta_sec missing in {e}");
        assert!(e["timestamp"].is_string());
    }
    // The done count only grows while the resync runs.
    let dones: Vec<u64> = progress
        .iter()
        .map(|e| u(&e["sync"]["done_bytes"]))
        .collect();
    assert!(dones.windows(2).all(|w| w[0] <= w[1]), "{dones:?}");
    let out = c.repctl("beta", &["wait-sync", "--timeout", "60s"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(c.data_identical(), "the data areas differ after the sync");
}

#[test]
fn wait_sync_prints_progress_lines_when_not_on_a_terminal() {
    let size = 96 * MIB;
    let mut c = Spec::pair(size)
        .resource("fencing = \"dont-care\"")
        .sections("[sync]\nrate = \"12M\"\n")
        .build();
    fill(&c.node("alpha").disk.clone(), size, 2);
    start_pair(&mut c);
    // stdout is a file here: plain lines.
    let (mut plain, plain_out) = repctl_bg(
        &c,
        "beta",
        &["wait-sync", "--timeout", "60s"],
        "wait-sync.out",
    );
    // Under `script`, stderr is a terminal: the progress bar.
    let tty_out = c.path("wait-sync.tty");
    let script = which("script").then(|| {
        let cmd = format!(
            "{REPCTL} --config {} --node alpha wait-sync --timeout 60s",
            c.config_of("alpha").display()
        );
        Bg::spawn(
            Command::new("script")
                .args(["-qefc", &cmd])
                .arg(&tty_out)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
    });
    c.repctl("alpha", &["primary", "--force"]).ok();
    let status = plain.wait(LONG);
    assert!(status.success(), "wait-sync: {status:?}");
    let text = std::fs::read_to_string(&plain_out).unwrap();
    eprintln!("wait-sync printed:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    let progress: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("SyncTarget "))
        .collect();
    // About 8 s of resync at one line every 5 s: at least two lines.
    assert!(progress.len() >= 2, "{text}");
    for l in &progress {
        assert!(l.contains("% ("), "{l}");
        // The total is known from the first line on.
        assert!(!l.contains(" of 0 B)"), "{l}");
        assert!(l.contains(" of "), "{l}");
        assert!(l.contains("/s, ETA "), "{l}");
    }
    // A later line has a known rate and ETA.
    assert!(
        progress.iter().skip(1).any(|l| !l.contains("ETA unknown")),
        "{text}"
    );
    assert_eq!(
        lines.last(),
        Some(&"in sync: both disks UpToDate"),
        "{text}"
    );
    // Not a progress bar: no carriage returns or escape sequences.
    assert!(!text.contains('\r') && !text.contains('\x1b'), "{text:?}");
    if let Some(mut script) = script {
        let status = script.wait(LONG);
        assert!(status.success(), "wait-sync under script: {status:?}");
        let tty = std::fs::read_to_string(&tty_out).unwrap();
        // The bar redraws in place: its prefix, the bar and the figures.
        assert!(tty.contains("SyncSource ["), "{tty:?}");
        assert!(tty.contains("/s, ETA "), "{tty:?}");
        assert!(tty.contains('\r') || tty.contains("\x1b["), "{tty:?}");
        assert!(!tty.contains("in sync: both"), "{tty:?}");
    } else {
        eprintln!("`script` is not installed: the terminal bar is not checked");
    }
    assert!(c.data_identical());
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

#[test]
fn a_sparse_device_syncs_as_zero_ranges_and_zeroes_the_targets_garbage() {
    let size = 256 * MIB;
    let mut c = Spec::pair(size).resource("fencing = \"dont-care\"").build();
    // Alpha: 3 MiB of data at 5 MiB and 1 MiB at 100 MiB, zeros (holes)
    // elsewhere. Beta: garbage over the first 200 MiB (where alpha has
    // zeros, the sync must write zeros).
    let (a, b) = (c.node("alpha").disk.clone(), c.node("beta").disk.clone());
    let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
    f.write_all_at(&pattern(3, 3 * MIB as usize), 5 * MIB)
        .unwrap();
    f.write_all_at(&pattern(4, MIB as usize), 100 * MIB)
        .unwrap();
    drop(f);
    fill(&b, 200 * MIB, 5);
    start_pair(&mut c);
    c.repctl("alpha", &["primary", "--force"]).ok();
    let out = c.repctl("beta", &["wait-sync", "--timeout", "120s"]);
    assert_eq!(out.code, 0, "{out:?}");
    let data = u(&c.field("alpha", &["size_bytes"]));
    assert!(c.data_identical(), "the data areas differ after the sync");
    let zero = vec![0u8; MIB as usize];
    for off in [0, 20 * MIB, 150 * MIB, 199 * MIB] {
        assert!(
            c.read_disk("beta", off, MIB as usize) == zero,
            "beta's garbage at {off} survived"
        );
    }
    let a = c.status("alpha")["counters"].clone();
    let b = c.status("beta")["counters"].clone();
    eprintln!("alpha {a}\nbeta {b}");
    // Only the chunks holding data travel as data (4 MiB; full-sync
    // chunks are 1 MiB aligned), everything else as zero ranges.
    let sent = u(&a["resync_sent_bytes"]);
    assert_eq!(sent, 4 * MIB, "resync data sent");
    assert_eq!(u(&a["resync_zero_sent_bytes"]), data - sent);
    assert_eq!(u(&b["resync_received_bytes"]), sent);
    assert_eq!(u(&b["resync_zero_received_bytes"]), data - sent);
    // On the wire: the data plus small messages, far below the size.
    let wire = u(&a["net_sent_bytes"]);
    assert!(wire < sent + 4 * MIB, "{wire} bytes on the wire for {data}");
}

/// `repctl adjust` applies a new `[sync] rate` to a resync in progress: a
/// sync capped at 1 MiB/s (96 s for this device) finishes within seconds
/// once the config says "0" and `adjust` ran on the source. A config
/// that did not change is reported as such; a broken one is refused
/// before anything reaches repd.
#[test]
fn adjust_changes_the_rate_of_a_running_resync() {
    let size = 96 * MIB;
    let mut c = Spec::pair(size)
        .resource("fencing = \"dont-care\"")
        .sections("[sync]\nrate = \"1M\"\n")
        .build();
    fill(&c.node("alpha").disk.clone(), size, 3);
    start_pair(&mut c);
    let same = c.repctl("alpha", &["adjust"]).ok();
    assert!(same.stdout.contains("nothing to change"), "{same:?}");
    c.repctl("alpha", &["primary", "--force"]).ok();
    c.wait_status("alpha", "the resync to start", LONG, |s| {
        s["replication"] == "SyncSource" && s["sync"]["done_bytes"].as_u64().unwrap_or(0) > 0
    });
    std::thread::sleep(Duration::from_secs(2));
    let (_, d0, _) = sample(&c);
    assert!(d0 < 8 * MIB, "{d0} bytes after about 2 s at 1 MiB/s");

    let config = c.config_of("alpha").to_path_buf();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("rate = \"1M\"", "rate = \"bogus\"")).unwrap();
    let bad = c.repctl("alpha", &["adjust"]);
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(bad.stderr.contains("rate"), "names the key: {bad:?}");

    // (repctl reads the config for every command: status too.)
    std::fs::write(&config, text.replace("rate = \"1M\"", "rate = \"0\"")).unwrap();
    assert_eq!(
        c.field("alpha", &["replication"]),
        "SyncSource",
        "a refused adjust leaves the resync running"
    );
    let out = c.repctl("alpha", &["adjust"]).ok();
    assert!(
        out.stdout
            .contains("sync rate unlimited (was 1048576 bytes/s)"),
        "{out:?}"
    );
    let t = Instant::now();
    c.repctl("alpha", &["wait-sync", "--timeout", "60s"]).ok();
    let left = size - d0;
    let secs = t.elapsed().as_secs_f64();
    assert!(
        secs < left as f64 / MIB as f64 / 2.0,
        "{secs:.1} s for the last {left} bytes after lifting the 1 MiB/s cap"
    );
    assert_eq!(c.field("beta", &["disk"]), "UpToDate");
}
