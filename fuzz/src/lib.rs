//! Fuzz targets for the NBD decoders of `tandem-proto`, and their seed
//! corpora. The targets in `fuzz_targets/` only call [`handshake::check`] and
//! [`request::check`], so a crash input can be replayed with `cargo test` or
//! `cargo fuzz run TARGET FILE` alike. See `README.md`.

pub mod handshake;
pub mod request;
pub mod seeds;
