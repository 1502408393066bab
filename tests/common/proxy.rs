//! An in-process TCP proxy for injecting peer-link faults in system tests.
//!
//! The kernel here has no netem, so link faults come from this proxy: the
//! dialing node is configured to reach its peer through it. The test can
//! switch it, at any moment, between passing bytes, stalling them (held,
//! connections stay open), dropping them (read and discarded: a black
//! hole), resetting every connection, and corrupting one byte of the next
//! data it forwards in a chosen direction.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// Hold every byte until the mode changes.
    Stall,
    /// Read and discard every byte.
    Drop,
}

/// Which way data flows through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// From the dialing node to the accepting node.
    Forward,
    Backward,
}

struct State {
    mode: Mutex<Mode>,
    changed: Condvar,
    /// Corrupt one byte of the next chunk in this direction.
    corrupt: Mutex<Option<Dir>>,
    conns: Mutex<Vec<TcpStream>>,
    forwarded: [AtomicU64; 2],
    stop: AtomicBool,
}

pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl Proxy {
    /// Listen on a free loopback port and forward to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            mode: Mutex::new(Mode::Pass),
            changed: Condvar::new(),
            corrupt: Mutex::new(None),
            conns: Mutex::new(Vec::new()),
            forwarded: [AtomicU64::new(0), AtomicU64::new(0)],
            stop: AtomicBool::new(false),
        });
        let s = state.clone();
        listener.set_nonblocking(true).unwrap();
        thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(target) else {
                            continue; // the accepting node is down
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        {
                            let mut conns = s.conns.lock().unwrap();
                            conns.push(client.try_clone().unwrap());
                            conns.push(server.try_clone().unwrap());
                        }
                        pump(
                            s.clone(),
                            client.try_clone().unwrap(),
                            server.try_clone().unwrap(),
                            Dir::Forward,
                        );
                        pump(s.clone(), server, client, Dir::Backward);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy { addr, state }
    }

    pub fn set(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
        self.state.changed.notify_all();
    }

    /// Close every proxied connection abruptly (both sides see a reset or
    /// an end of stream).
    pub fn reset(&self) {
        for c in self.state.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Flip one byte in the middle of the next chunk of at least 4 KiB
    /// forwarded in `dir` (block data, not a frame header).
    pub fn corrupt_next(&self, dir: Dir) {
        *self.state.corrupt.lock().unwrap() = Some(dir);
    }

    /// Bytes forwarded so far in `dir`.
    pub fn forwarded(&self, dir: Dir) -> u64 {
        self.state.forwarded[dir as usize].load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        self.set(Mode::Pass);
        self.reset();
    }
}

fn pump(state: Arc<State>, mut from: TcpStream, mut to: TcpStream, dir: Dir) {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Wait out a stall; drop in drop mode.
            let mode = {
                let mut m = state.mode.lock().unwrap();
                while *m == Mode::Stall && !state.stop.load(Ordering::Relaxed) {
                    m = state
                        .changed
                        .wait_timeout(m, Duration::from_millis(50))
                        .unwrap()
                        .0;
                }
                *m
            };
            if mode == Mode::Drop {
                continue;
            }
            {
                let mut c = state.corrupt.lock().unwrap();
                if *c == Some(dir) && n >= 4096 {
                    buf[n / 2] ^= 0x40;
                    *c = None;
                }
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            state.forwarded[dir as usize].fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
