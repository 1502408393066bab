//! Tandem's node: the replication core, storage engines, metadata and the
//! daemon drivers.

pub mod config;
pub mod storage;
