//! Unit tests of the core's single-node rules (promotion, demotion,
//! metadata durability, client I/O), driven by hand.

use super::node::*;
use super::states::{DiskState, Role};
use crate::config::{Fencing, OnIoError};
use crate::core::bitmap::Bitmap;
use crate::metadata::{Generations, Layout};
use crate::metadata::{MdFlags, Superblock, UUID_JUST_CREATED};
use crate::status::EngineStatus;
use crate::storage::{Done, Op, StorageError};
use bytes::Bytes;
use tandem_proto::nbd::ErrorCode;

fn params(peer: Option<&str>, fencing: Fencing) -> NodeParams {
    NodeParams {
        resource: "r0".into(),
        node: "alpha".into(),
        peer: peer.map(str::to_string),
        fencing,
        on_io_error: OnIoError::Detach,
        max_buffers: 64,
        al_extents: 8,
        seed: 1,
        resync_rate: 0,
        verify_alg: crate::config::VerifyAlg::Crc32,
    }
}

fn fresh_sb() -> Superblock {
    Superblock {
        sequence: 1,
        layout: Layout::internal(64 << 20).unwrap(),
        generations: Generations::just_created(),
        flags: MdFlags(MdFlags::AL_CLEAN),
        device_id: 1,
        resource: "r0".into(),
        node: "alpha".into(),
    }
}

fn drain(node: &mut Node<u32>) -> Vec<Output<u32>> {
    std::iter::from_fn(|| node.poll_output()).collect()
}

/// Complete every metadata write the node asks for, until none is left.
fn settle_meta(node: &mut Node<u32>) -> Vec<Output<u32>> {
    let mut seen = Vec::new();
    loop {
        let outs = drain(node);
        if outs.is_empty() {
            return seen;
        }
        for o in outs {
            if let Output::Submit {
                id,
                device: Device::Meta,
                ..
            }
            | Output::Submit {
                id, op: Op::Flush, ..
            } = o
            {
                node.handle_io_done(id, Ok(Done::Ok));
            } else {
                seen.push(o);
            }
        }
    }
}

fn command_result(outs: &[Output<u32>], id: u64) -> Option<Result<String, CommandError>> {
    outs.iter().find_map(|o| match o {
        Output::CommandDone { id: i, result } if *i == id => Some(result.clone()),
        _ => None,
    })
}

fn primary_node() -> Node<u32> {
    let mut n = new_node(params(None, Fencing::DontCare), fresh_sb());
    n.handle_command(1, Command::Primary { force: true });
    settle_meta(&mut n);
    assert_eq!(n.role(), Role::Primary);
    n
}

#[test]
fn fresh_disk_is_inconsistent_and_promotion_needs_force() {
    let mut n: Node<u32> = new_node(params(None, Fencing::DontCare), fresh_sb());
    assert_eq!(n.disk(), DiskState::Inconsistent);
    n.handle_command(1, Command::Primary { force: false });
    let r = command_result(&drain(&mut n), 1).unwrap().unwrap_err();
    assert!(r.refused && r.message.starts_with("refused:"), "{r:?}");
    assert_eq!(n.role(), Role::Secondary);
}

/// The superblock writes among `outs`: (op id, offset, bytes).
fn sb_writes(outs: &[Output<u32>]) -> Vec<(u64, u64, Bytes)> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Submit {
                id,
                device: Device::Meta,
                op:
                    Op::Write {
                        offset,
                        data,
                        fua: true,
                    },
            } if data.len() == 4096 && data[..8] == *b"TANDEMMD" => {
                Some((*id, *offset, data.clone()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn promotion_takes_effect_only_after_the_superblock_is_durable() {
    let mut n: Node<u32> = new_node(params(None, Fencing::DontCare), fresh_sb());
    n.handle_command(7, Command::Primary { force: true });
    let outs = drain(&mut n);
    let [(id, _, data)] = &sb_writes(&outs)[..] else {
        panic!("no metadata write: {outs:?}")
    };
    assert!(
        command_result(&outs, 7).is_none(),
        "answered before durable"
    );
    assert_eq!(
        n.role(),
        Role::Secondary,
        "Primary before the superblock is durable"
    );
    assert!(matches!(n.nbd_check(), Err(NbdRefusal::NotServing(_))));
    let written = Superblock::decode(data).unwrap();
    assert!(
        written
            .flags
            .has(MdFlags::PRIMARY_IND | MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE)
    );
    assert_eq!(written.generations.bitmap, UUID_JUST_CREATED);
    assert_ne!(written.generations.current, UUID_JUST_CREATED);
    assert_eq!(written.generations.current & 1, 0);
    n.handle_io_done(*id, Ok(Done::Ok));
    let outs = drain(&mut n);
    assert_eq!(command_result(&outs, 7), Some(Ok("now Primary".into())));
    assert_eq!(n.role(), Role::Primary);
    assert!(n.nbd_check().is_ok());
}

#[test]
fn failed_metadata_write_fails_the_disk_and_the_command() {
    let mut n: Node<u32> = new_node(params(None, Fencing::DontCare), fresh_sb());
    n.handle_command(1, Command::Primary { force: true });
    let (id, _, _) = sb_writes(&drain(&mut n))[0].clone();
    n.handle_io_done(
        id,
        Err(StorageError::Os {
            op: "write",
            offset: 0,
            errno: libc::EIO,
        }),
    );
    let outs = drain(&mut n);
    assert!(command_result(&outs, 1).unwrap().is_err());
    assert_eq!(n.role(), Role::Secondary);
    assert_eq!(n.disk(), DiskState::Failed);
}

#[test]
fn only_one_superblock_write_is_in_flight_and_slots_alternate() {
    let mut n = primary_node();
    let before = n.superblock().sequence;
    // Two changes in a row, each persisted at once: two new generations.
    n.handle_command(
        2,
        Command::NewCurrentUuid {
            clear_bitmap: false,
        },
    );
    n.handle_command(
        3,
        Command::NewCurrentUuid {
            clear_bitmap: false,
        },
    );
    let outs = drain(&mut n);
    let writes = sb_writes(&outs);
    assert_eq!(writes.len(), 1, "two superblock writes in flight: {outs:?}");
    let (id, first_offset, data) = writes[0].clone();
    let first = Superblock::decode(&data).unwrap();
    assert_eq!(first.sequence, before + 1);
    n.handle_io_done(id, Ok(Done::Ok));
    let outs = drain(&mut n);
    let [(id2, offset2, data2)] = &sb_writes(&outs)[..] else {
        panic!("second write not issued: {outs:?}")
    };
    let second = Superblock::decode(data2).unwrap();
    assert_eq!(second.sequence, before + 2);
    assert_ne!(
        *offset2, first_offset,
        "consecutive writes must use the other slot"
    );
    // The second write carries the newest state, not the one queued with it.
    assert_ne!(second.generations.current, first.generations.current);
    assert_eq!(second.generations, n.superblock().generations);
    assert!(command_result(&outs, 2).is_some());
    n.handle_io_done(*id2, Ok(Done::Ok));
    assert!(command_result(&drain(&mut n), 3).unwrap().is_ok());
}

#[test]
fn demotion_is_refused_while_a_client_is_attached() {
    let mut n = primary_node();
    n.nbd_attach().unwrap();
    n.handle_command(2, Command::Secondary);
    let r = command_result(&drain(&mut n), 2).unwrap().unwrap_err();
    assert!(r.refused && r.message.contains("NBD client"), "{r:?}");
    assert_eq!(n.role(), Role::Primary);
    n.nbd_detach();
    n.handle_command(3, Command::Secondary);
    // Clients are refused as soon as the demotion is decided.
    assert!(n.nbd_attach().is_err());
    assert!(command_result(&settle_meta(&mut n), 3).unwrap().is_ok());
    assert!(!n.superblock().flags.has(MdFlags::PRIMARY_IND));
}

#[test]
fn a_node_that_stopped_as_primary_is_a_crashed_primary() {
    let mut sb = fresh_sb();
    sb.flags = MdFlags(MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE | MdFlags::PRIMARY_IND);
    let mut n: Node<u32> = new_node(params(None, Fencing::DontCare), sb);
    settle_meta(&mut n);
    let f = n.superblock().flags;
    assert!(f.has(MdFlags::CRASHED_PRIMARY) && !f.has(MdFlags::PRIMARY_IND));
    assert_eq!(n.role(), Role::Secondary);
    assert_eq!(n.disk(), DiskState::UpToDate);
}

#[test]
fn attach_disk_state_follows_drbd() {
    let case = |flags: u32, peer: Option<&str>, fencing| {
        let mut sb = fresh_sb();
        sb.flags = MdFlags(flags);
        new_node(params(peer, fencing), sb).disk()
    };
    use MdFlags as F;
    let both = F::CONSISTENT | F::WAS_UP_TO_DATE;
    assert_eq!(
        case(0, Some("beta"), Fencing::ResourceOnly),
        DiskState::Inconsistent
    );
    assert_eq!(
        case(F::CONSISTENT, Some("beta"), Fencing::ResourceOnly),
        DiskState::Outdated
    );
    assert_eq!(
        case(both, Some("beta"), Fencing::ResourceOnly),
        DiskState::Consistent
    );
    assert_eq!(
        case(both, Some("beta"), Fencing::ResourceAndStonith),
        DiskState::Consistent
    );
    assert_eq!(
        case(
            both | F::PEER_OUT_DATED,
            Some("beta"),
            Fencing::ResourceOnly
        ),
        DiskState::UpToDate
    );
    assert_eq!(
        case(both, Some("beta"), Fencing::DontCare),
        DiskState::UpToDate
    );
    assert_eq!(
        case(both, None, Fencing::ResourceAndStonith),
        DiskState::UpToDate
    );
}

#[test]
fn client_io_is_bounds_checked_and_answered_once() {
    let mut n = primary_node();
    let size = n.size();
    n.handle_client(
        1,
        ClientOp::Read {
            offset: size - 512,
            len: 1024,
        },
    );
    n.handle_client(
        2,
        ClientOp::Write {
            offset: size,
            data: Bytes::from_static(b"x"),
            fua: false,
        },
    );
    n.handle_client(
        3,
        ClientOp::Trim {
            offset: u64::MAX,
            len: 2,
            fua: false,
        },
    );
    let outs = drain(&mut n);
    let replies: Vec<_> = outs
        .iter()
        .filter_map(|o| {
            if let Output::Reply { token, result } = o {
                Some((*token, result.clone()))
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        replies,
        vec![
            (1, Err(ErrorCode::Invalid)),
            (2, Err(ErrorCode::NoSpace)),
            (3, Err(ErrorCode::Invalid))
        ]
    );
    n.handle_client(
        4,
        ClientOp::Write {
            offset: 0,
            data: Bytes::from_static(b"abc"),
            fua: true,
        },
    );
    let outs = drain(&mut n);
    let [
        Output::Submit {
            id,
            device: Device::Data,
            op: Op::Write { fua: true, .. },
        },
    ] = &outs[..]
    else {
        panic!("{outs:?}")
    };
    assert!(
        !outs.iter().any(|o| matches!(o, Output::Reply { .. })),
        "answered before the disk"
    );
    n.handle_io_done(*id, Ok(Done::Ok));
    let outs = drain(&mut n);
    assert!(matches!(
        &outs[..],
        [Output::Reply {
            token: 4,
            result: Ok(None)
        }]
    ));
    assert_eq!(
        n.status(EngineStatus::idle("test"))
            .counters
            .disk_written_bytes,
        3
    );
}

#[test]
fn io_error_with_detach_fails_the_disk() {
    let mut n = primary_node();
    n.handle_client(
        1,
        ClientOp::Read {
            offset: 0,
            len: 4096,
        },
    );
    let Some(Output::Submit { id, .. }) = drain(&mut n).into_iter().next() else {
        panic!()
    };
    n.handle_io_done(
        id,
        Err(StorageError::Os {
            op: "read",
            offset: 0,
            errno: libc::EIO,
        }),
    );
    assert!(matches!(
        &drain(&mut n)[..],
        [
            Output::StateChanged { .. },
            Output::Reply {
                token: 1,
                result: Err(ErrorCode::Io)
            }
        ]
    ));
    assert_eq!(n.disk(), DiskState::Failed);
    n.handle_client(2, ClientOp::Flush);
    assert!(matches!(
        &drain(&mut n)[..],
        [Output::Reply {
            token: 2,
            result: Err(ErrorCode::Io)
        }]
    ));
}

#[test]
fn clean_stop_demotes_and_records_it() {
    let mut n = primary_node();
    n.handle_command(9, Command::Down);
    assert_eq!(n.role(), Role::Secondary);
    let outs = settle_meta(&mut n);
    assert_eq!(command_result(&outs, 9), Some(Ok("stopped".into())));
    let f = n.superblock().flags;
    assert!(!f.has(MdFlags::PRIMARY_IND) && f.has(MdFlags::AL_CLEAN));
    n.handle_client(1, ClientOp::Flush);
    assert!(matches!(
        &drain(&mut n)[..],
        [Output::Reply {
            token: 1,
            result: Err(ErrorCode::Shutdown)
        }]
    ));
}

fn new_node(params: NodeParams, sb: Superblock) -> Node<u32> {
    let blocks = sb.layout.data_blocks();
    Node::new(params, sb, Bitmap::new(blocks), None)
}
