//! Tandem's node: everything `repd` and `repctl` run.
//!
//! - [`core`]: the pure state machine (roles, disk states, generations,
//!   client request life cycle); no I/O, no clock.
//! - [`metadata`]: the on-disk superblock, activity log and bitmap format.
//! - [`storage`]: the backing store and its I/O engines.
//! - [`config`]: the TOML configuration.
//! - [`status`]: the status object of the user contract.
//! - [`control`]: the control-socket protocol between `repctl` and `repd`.
//! - [`daemon`], [`ctl`]: the `repd` and `repctl` programs.
//! - [`sim`]: deterministic simulation of two nodes, for tests.

pub mod config;
pub mod control;
pub mod core;
pub mod ctl;
pub mod daemon;
pub mod metadata;
pub mod sim;
pub mod status;
pub mod storage;
