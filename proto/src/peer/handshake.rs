//! The link handshake, run by both nodes on every new connection.
//!
//! Each side sends `Hello` (version range, resource, its name, the name it
//! expects, data size, protocol, whether it has a shared secret, a random
//! challenge). Each side checks the other's `Hello`; with a shared secret it
//! answers the peer's challenge with `AuthResponse` = HMAC-SHA256(secret,
//! label ‖ peer's challenge ‖ own name ‖ peer's name) and checks the peer's
//! answer to its own challenge in constant time. A side that is satisfied
//! sends `Ready`; the link is established when a side is satisfied *and*
//! has received the peer's `Ready`. Any failed check queues `Refuse` with
//! the reason (for the peer's log) and returns it (for ours).
//!
//! Reflection is impossible: the MAC binds the responder's and the
//! challenger's names in that order, so a response computed by us never
//! verifies as the peer's, and a peer echoing our own challenge is refused
//! outright.

use std::collections::VecDeque;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

use super::message::{Hello, Message};
use super::{PROTOCOL_MAX, PROTOCOL_MIN};

const AUTH_LABEL: &[u8] = b"tandem peer link v1 auth";

/// What this node knows that the peer must agree with.
#[derive(Clone)]
pub struct LinkConfig {
    pub resource: String,
    pub node: String,
    pub peer: String,
    pub size: u64,
    pub secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for LinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkConfig")
            .field("resource", &self.resource)
            .field("node", &self.node)
            .field("peer", &self.peer)
            .field("size", &self.size)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// The handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}: {reason}", if *.by_peer { "the peer refused the link" } else { "refused the peer" })]
pub struct LinkRefusal {
    pub reason: String,
    /// True when the peer refused us (it sent `Refuse`).
    pub by_peer: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Continue,
    /// The link is up, speaking this protocol version.
    Established {
        version: u16,
    },
}

pub struct LinkHandshake {
    cfg: LinkConfig,
    challenge: [u8; 32],
    out: VecDeque<Message>,
    version: Option<u16>,
    peer_hello: Option<Hello>,
    peer_verified: bool,
    peer_ready: bool,
    done: bool,
}

fn mac(secret: &[u8], challenge: &[u8; 32], responder: &str, challenger: &str) -> Hmac<Sha256> {
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(AUTH_LABEL);
    m.update(challenge);
    for name in [responder, challenger] {
        m.update(&(name.len() as u32).to_be_bytes());
        m.update(name.as_bytes());
    }
    m
}

impl LinkHandshake {
    /// Start a handshake; `challenge` must be fresh random bytes.
    pub fn new(cfg: LinkConfig, challenge: [u8; 32]) -> Self {
        let hello = Hello {
            version_min: PROTOCOL_MIN,
            version_max: PROTOCOL_MAX,
            resource: cfg.resource.clone(),
            node: cfg.node.clone(),
            peer: cfg.peer.clone(),
            size: cfg.size,
            protocol: b'C',
            auth: cfg.secret.is_some(),
            challenge,
        };
        LinkHandshake {
            cfg,
            challenge,
            out: VecDeque::from([Message::Hello(hello)]),
            version: None,
            peer_hello: None,
            peer_verified: false,
            peer_ready: false,
            done: false,
        }
    }

    /// The next message to send.
    pub fn poll_send(&mut self) -> Option<Message> {
        self.out.pop_front()
    }

    /// Handle one message from the peer.
    pub fn handle(&mut self, msg: Message) -> Result<Progress, LinkRefusal> {
        if self.done {
            return Err(self.refuse("handshake message after the link was established".into()));
        }
        match msg {
            Message::Hello(h) if self.peer_hello.is_none() => self.on_hello(h)?,
            Message::AuthResponse { mac: m }
                if self.peer_hello.is_some() && !self.peer_verified =>
            {
                let Some(secret) = self.cfg.secret.clone() else {
                    return Err(self
                        .refuse("unexpected AuthResponse: no shared-secret is configured".into()));
                };
                // Constant-time comparison (verify_slice).
                if mac(&secret, &self.challenge, &self.cfg.peer, &self.cfg.node)
                    .verify_slice(&m)
                    .is_err()
                {
                    return Err(self.refuse(
                        "authentication failed: the shared-secret differs between the nodes".into(),
                    ));
                }
                self.verified();
            }
            Message::Ready if self.peer_hello.is_some() => self.peer_ready = true,
            Message::Refuse { reason } => {
                return Err(LinkRefusal {
                    reason,
                    by_peer: true,
                });
            }
            other => {
                return Err(self.refuse(format!(
                    "unexpected message type {} during the handshake",
                    other.code()
                )));
            }
        }
        if self.peer_verified && self.peer_ready {
            self.done = true;
            return Ok(Progress::Established {
                version: self.version.expect("set with the hello"),
            });
        }
        Ok(Progress::Continue)
    }

    fn refuse(&mut self, reason: String) -> LinkRefusal {
        self.out.push_back(Message::Refuse {
            reason: reason.clone(),
        });
        LinkRefusal {
            reason,
            by_peer: false,
        }
    }

    fn verified(&mut self) {
        self.peer_verified = true;
        self.out.push_back(Message::Ready);
    }

    fn on_hello(&mut self, h: Hello) -> Result<(), LinkRefusal> {
        let c = &self.cfg;
        let lo = h.version_min.max(PROTOCOL_MIN);
        let hi = h.version_max.min(PROTOCOL_MAX);
        let problem = if lo > hi {
            Some(format!(
                "no common protocol version: this node speaks {PROTOCOL_MIN}..={PROTOCOL_MAX}, the peer {}..={}",
                h.version_min, h.version_max
            ))
        } else if h.resource != c.resource {
            Some(format!(
                "resource name mismatch: this node runs {:?}, the peer {:?}",
                c.resource, h.resource
            ))
        } else if h.node != c.peer {
            Some(format!(
                "the peer is node {:?}, but the configuration names the peer {:?}",
                h.node, c.peer
            ))
        } else if h.peer != c.node {
            Some(format!(
                "the peer expects node {:?}, but this is node {:?}",
                h.peer, c.node
            ))
        } else if h.protocol != b'C' {
            Some(format!(
                "replication protocol mismatch: the peer asks for {:?}, only C is supported",
                h.protocol as char
            ))
        } else if h.size != c.size {
            Some(format!(
                "size mismatch: this node has {} bytes of data, the peer {} bytes",
                c.size, h.size
            ))
        } else if h.auth != c.secret.is_some() {
            Some("shared-secret is configured on one node only".to_string())
        } else if h.auth && h.challenge == self.challenge {
            Some("the peer sent our own challenge back (reflection)".to_string())
        } else {
            None
        };
        if let Some(reason) = problem {
            return Err(self.refuse(reason));
        }
        self.version = Some(hi);
        match &self.cfg.secret {
            Some(secret) => {
                let response = mac(secret, &h.challenge, &self.cfg.node, &self.cfg.peer)
                    .finalize()
                    .into_bytes();
                self.out.push_back(Message::AuthResponse {
                    mac: response.into(),
                });
            }
            None => self.verified(),
        }
        self.peer_hello = Some(h);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(node: &str, peer: &str, secret: Option<&str>) -> LinkConfig {
        LinkConfig {
            resource: "r0".into(),
            node: node.into(),
            peer: peer.into(),
            size: 1 << 30,
            secret: secret.map(|s| s.as_bytes().to_vec()),
        }
    }

    /// Run two handshakes against each other; returns both outcomes.
    fn run(
        mut a: LinkHandshake,
        mut b: LinkHandshake,
    ) -> (Result<Progress, LinkRefusal>, Result<Progress, LinkRefusal>) {
        let mut ra = Ok(Progress::Continue);
        let mut rb = Ok(Progress::Continue);
        for _ in 0..10 {
            while let Some(m) = a.poll_send() {
                if rb == Ok(Progress::Continue) {
                    rb = b.handle(m);
                }
            }
            while let Some(m) = b.poll_send() {
                if ra == Ok(Progress::Continue) {
                    ra = a.handle(m);
                }
            }
        }
        (ra, rb)
    }

    #[test]
    fn matching_nodes_establish_with_and_without_a_secret() {
        for secret in [None, Some("s3cret")] {
            let a = LinkHandshake::new(cfg("alpha", "beta", secret), [1; 32]);
            let b = LinkHandshake::new(cfg("beta", "alpha", secret), [2; 32]);
            let est = Ok(Progress::Established {
                version: PROTOCOL_MAX,
            });
            assert_eq!(run(a, b), (est.clone(), est));
        }
    }

    #[test]
    fn mismatches_are_refused_with_a_reason() {
        let cases: Vec<(LinkConfig, &str)> = vec![
            (cfg("beta", "alpha", Some("other")), "shared-secret differs"),
            (cfg("beta", "alpha", None), "one node only"),
            (
                LinkConfig {
                    resource: "r1".into(),
                    ..cfg("beta", "alpha", Some("s"))
                },
                "resource name mismatch",
            ),
            (
                LinkConfig {
                    size: 1,
                    ..cfg("beta", "alpha", Some("s"))
                },
                "size mismatch",
            ),
            (
                cfg("gamma", "alpha", Some("s")),
                "the peer is node \"gamma\"",
            ),
            (
                cfg("beta", "delta", Some("s")),
                "the peer expects node \"delta\"",
            ),
        ];
        for (peer_cfg, why) in cases {
            let a = LinkHandshake::new(cfg("alpha", "beta", Some("s")), [1; 32]);
            let b = LinkHandshake::new(peer_cfg, [2; 32]);
            let (ra, rb) = run(a, b);
            let errs: Vec<_> = [ra, rb].into_iter().filter_map(Result::err).collect();
            assert!(
                !errs.is_empty() && errs.iter().any(|e| e.reason.contains(why)),
                "{why}: {errs:?}"
            );
            assert!(!errs.iter().any(|e| e.reason.is_empty()));
        }
    }

    #[test]
    fn a_reflected_challenge_or_response_is_refused() {
        // The attacker echoes our challenge in its Hello.
        let mut a = LinkHandshake::new(cfg("alpha", "beta", Some("s")), [1; 32]);
        let Some(Message::Hello(mut h)) = a.poll_send() else {
            panic!()
        };
        h.node = "beta".into();
        h.peer = "alpha".into();
        assert!(
            a.handle(Message::Hello(h.clone()))
                .unwrap_err()
                .reason
                .contains("reflection")
        );

        // The attacker gets our response to its challenge and replays it
        // as its own answer to ours.
        let mut a = LinkHandshake::new(cfg("alpha", "beta", Some("s")), [1; 32]);
        a.poll_send();
        h.challenge = [1; 32];
        h.challenge[0] = 9;
        a.handle(Message::Hello(h)).unwrap();
        let Some(Message::AuthResponse { mac }) = a.poll_send() else {
            panic!()
        };
        assert!(
            a.handle(Message::AuthResponse { mac })
                .unwrap_err()
                .reason
                .contains("authentication failed")
        );
    }

    /// An older peer (a rolling upgrade): the link speaks the older
    /// version, which the core then honours (no newer messages).
    #[test]
    fn an_older_peer_gets_its_own_version() {
        let mut a = LinkHandshake::new(cfg("alpha", "beta", None), [1; 32]);
        a.poll_send();
        let h = Hello {
            version_min: 1,
            version_max: 1,
            resource: "r0".into(),
            node: "beta".into(),
            peer: "alpha".into(),
            size: 1 << 30,
            protocol: b'C',
            auth: false,
            challenge: [2; 32],
        };
        const { assert!(PROTOCOL_MAX > 1) };
        assert_eq!(a.handle(Message::Hello(h)).unwrap(), Progress::Continue);
        assert_eq!(
            a.handle(Message::Ready).unwrap(),
            Progress::Established { version: 1 }
        );
    }

    #[test]
    fn no_common_version_is_refused() {
        let mut a = LinkHandshake::new(cfg("alpha", "beta", None), [1; 32]);
        a.poll_send();
        let h = Hello {
            version_min: PROTOCOL_MAX + 1,
            version_max: PROTOCOL_MAX + 5,
            resource: "r0".into(),
            node: "beta".into(),
            peer: "alpha".into(),
            size: 1 << 30,
            protocol: b'C',
            auth: false,
            challenge: [2; 32],
        };
        let e = a.handle(Message::Hello(h)).unwrap_err();
        assert!(e.reason.contains("no common protocol version") && !e.by_peer);
        assert!(matches!(a.poll_send(), Some(Message::Refuse { .. })));
    }
}
