//! Guards for external tools a test starts: background processes, loop
//! devices, mounts, nbdfuse and strace. Each undoes what it did when
//! dropped, also when the test is failing, and only ever signals the
//! process it started (by PID).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Out, run, wait_for};

/// A process running in the background. Dropping it sends SIGTERM, then
/// SIGKILL if it has not exited after a few seconds.
pub struct Bg {
    pub child: Child,
    pub what: String,
}

impl Bg {
    pub fn spawn(cmd: &mut Command) -> Bg {
        let what = format!("{cmd:?}");
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Bg { child, what }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill with the PID of a child we started and have not reaped.
        unsafe { libc::kill(self.pid(), sig) };
    }

    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Wait up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for the process to exit, or panic after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let what = self.what.clone();
        self.wait_timeout(timeout)
            .unwrap_or_else(|| panic!("{what} still runs after {timeout:?}"))
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.try_exit().is_some() {
            return;
        }
        self.signal(libc::SIGTERM);
        if self.wait_timeout(Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A loop device over a file (`losetup -f --show`), detached when dropped.
pub struct LoopDev {
    pub path: PathBuf,
}

impl LoopDev {
    pub fn attach(file: &Path) -> LoopDev {
        LoopDev::attach_with(file, &[])
    }

    /// `losetup -f --show ARGS FILE`, retried while another test races us
    /// for the same free device.
    pub fn attach_with(file: &Path, args: &[&str]) -> LoopDev {
        let mut last = None;
        for _ in 0..10 {
            let out = run(Command::new("losetup")
                .arg("-f")
                .arg("--show")
                .args(args)
                .arg(file));
            if out.code == 0 {
                return LoopDev {
                    path: PathBuf::from(out.stdout.trim()),
                };
            }
            last = Some(out);
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("losetup failed: {last:?}");
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        // The kernel may hold the device briefly after its last user closed it.
        for _ in 0..50 {
            if run(Command::new("losetup").arg("-d").arg(&self.path)).code == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("warning: could not detach {}", self.path.display());
    }
}

/// A mounted filesystem, unmounted when dropped.
pub struct Mount {
    pub dir: PathBuf,
    mounted: bool,
}

impl Mount {
    pub fn new(dev: &Path, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("mount").arg(dev).arg(dir)).ok();
        Mount {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    /// A tmpfs of `size` (e.g. "8m") at `dir`: a filesystem that fills up.
    pub fn tmpfs(dir: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size}"))
            .arg("tmpfs")
            .arg(dir))
        .ok();
        Mount {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    /// Unmount now; panics if it fails.
    pub fn unmount(mut self) {
        run(Command::new("umount").arg(&self.dir)).ok();
        self.mounted = false;
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted && run(Command::new("umount").arg(&self.dir)).code != 0 {
            // Busy: detach it lazily rather than leave it behind.
            let _ = run(Command::new("umount").arg("-l").arg(&self.dir));
        }
    }
}

/// `nbdfuse DIR URI`: the export as the file `DIR/nbd`. Dropping it
/// unmounts the FUSE filesystem and ends the nbdfuse process.
pub struct Nbdfuse {
    pub dir: PathBuf,
    proc: Option<Bg>,
}

impl Nbdfuse {
    pub fn start(dir: &Path, uri: &str) -> Nbdfuse {
        std::fs::create_dir_all(dir).unwrap();
        let mut proc = Bg::spawn(Command::new("nbdfuse").arg(dir).arg(uri));
        let file = dir.join("nbd");
        wait_for(
            "nbdfuse to expose its file",
            Duration::from_secs(20),
            || {
                if let Some(s) = proc.try_exit() {
                    panic!("nbdfuse exited with {s} before exposing {}", file.display());
                }
                file.exists().then_some(())
            },
        );
        Nbdfuse {
            dir: dir.to_path_buf(),
            proc: Some(proc),
        }
    }

    /// The export as a file.
    pub fn file(&self) -> PathBuf {
        self.dir.join("nbd")
    }

    /// Unmount and wait for nbdfuse to exit (so its NBD client is gone).
    pub fn stop(mut self) {
        self.unmount_and_wait();
    }

    fn unmount_and_wait(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = run(Command::new("fusermount3").arg("-u").arg(&self.dir));
            if p.wait_timeout(Duration::from_secs(20)).is_none() {
                let _ = run(Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(&self.dir));
            }
            drop(p); // SIGTERM, then SIGKILL, if still running
        }
    }
}

impl Drop for Nbdfuse {
    fn drop(&mut self) {
        self.unmount_and_wait();
    }
}

/// strace attached to a running process (every thread, `-f`), writing the
/// trace of `syscalls` to a file. `finish` detaches and returns the trace.
pub struct Strace {
    proc: Bg,
    out: PathBuf,
}

impl Strace {
    pub fn attach(pid: u32, syscalls: &str, out: &Path) -> Strace {
        let err = out.with_extension("stderr");
        let errf = std::fs::File::create(&err).unwrap();
        let proc = Bg::spawn(
            Command::new("strace")
                .args(["-f", "-s", "0", "-e"])
                .arg(format!("trace={syscalls}"))
                .arg("-o")
                .arg(out)
                .arg("-p")
                .arg(pid.to_string())
                .stderr(errf),
        );
        let mut s = Strace {
            proc,
            out: out.to_path_buf(),
        };
        wait_for("strace to attach", Duration::from_secs(20), || {
            if let Some(st) = s.proc.try_exit() {
                panic!(
                    "strace exited with {st}: {}",
                    std::fs::read_to_string(&err).unwrap_or_default()
                );
            }
            std::fs::read_to_string(&err)
                .unwrap_or_default()
                .contains("attached")
                .then_some(())
        });
        s
    }

    /// Detach (SIGINT) and return the trace.
    pub fn finish(mut self) -> String {
        self.proc.signal(libc::SIGINT);
        self.proc.wait(Duration::from_secs(20));
        std::fs::read_to_string(&self.out).unwrap()
    }
}

/// One syscall of an strace log: its name and its arguments as printed.
/// For a call split by another thread's (`<unfinished ...>` / `resumed>`),
/// the entry half carries the arguments strace prints on entry (those of
/// writes, syncs), the exit half those printed on exit (a read's offset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Syscall {
    pub name: String,
    pub args: Vec<String>,
    /// False for the entry half of an unfinished call.
    pub finished: bool,
}

/// Parse an `strace -f -s 0` log into its calls, in the order printed.
pub fn parse_strace(log: &str) -> Vec<Syscall> {
    let mut calls = Vec::new();
    for line in log.lines() {
        // Drop the PID column.
        let line = line.trim_start();
        let line = line
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start();
        if line.starts_with("+++") || line.starts_with("---") {
            continue;
        }
        let (name, rest, finished) = if let Some(r) = line.strip_prefix("<... ") {
            let Some((name, rest)) = r.split_once(" resumed>") else {
                continue;
            };
            (name, rest, true)
        } else {
            let Some((name, rest)) = line.split_once('(') else {
                continue;
            };
            (name, rest, !line.contains("<unfinished ...>"))
        };
        let args = match rest.find(" <unfinished ...>") {
            Some(i) => &rest[..i],
            None => rest.rfind(") ").map_or(rest, |i| &rest[..i]),
        };
        let args = args
            .split(", ")
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        calls.push(Syscall {
            name: name.trim().to_string(),
            args,
            finished,
        });
    }
    calls
}

/// Run `cmd`, panicking with its output if it fails.
pub fn must(cmd: &mut Command) -> Out {
    run(cmd).ok()
}
