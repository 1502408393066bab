//! A small deterministic generator (SplitMix64) for generation identifiers.
//!
//! The core must not read ambient randomness (the simulation replays from a
//! seed), so the driver seeds it once from the OS and the core draws from it.

#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A fresh generation identifier: never 0, never `UUID_JUST_CREATED`,
    /// bit 0 clear (DRBD reserves it for the Primary indicator).
    pub fn generation(&mut self) -> u64 {
        loop {
            let v = self.next_u64() & !1;
            if v > crate::metadata::UUID_JUST_CREATED {
                return v;
            }
        }
    }
}
