//! The dirty bitmap in memory: one bit per 4 KiB data block, and which of
//! its 4 KiB pages are durable.
//!
//! A set bit means "this block may differ from the peer". The on-disk form
//! is the same bits, little-endian words, so page `p` of the bitmap is
//! bytes `[p * 4096, (p + 1) * 4096)` of the bitmap area.
//!
//! Durability bookkeeping: every change to a page bumps its version;
//! `durable[p]` is the version known to be on stable storage. The core
//! writes a page when a data write needs one of its bits set durably, and
//! lazily for cleared bits (a cleared bit that is lost only causes an extra
//! resync; a set bit that is lost could hide a difference).

use tandem_proto::peer::Extent;

use crate::metadata::BLOCK_SIZE;

/// Bits per 4 KiB bitmap page.
pub const BITS_PER_PAGE: u64 = BLOCK_SIZE * 8;
const WORDS_PER_PAGE: usize = (BLOCK_SIZE / 8) as usize;

#[derive(Debug, Clone)]
pub struct Bitmap {
    words: Vec<u64>,
    blocks: u64,
    count: u64,
    version: Vec<u64>,
    durable: Vec<u64>,
}

impl Bitmap {
    /// An empty bitmap for `blocks` data blocks.
    pub fn new(blocks: u64) -> Self {
        let pages = blocks.div_ceil(BITS_PER_PAGE).max(1) as usize;
        Bitmap {
            words: vec![0; pages * WORDS_PER_PAGE],
            blocks,
            count: 0,
            version: vec![0; pages],
            durable: vec![0; pages],
        }
    }

    /// Load from the on-disk bytes (all pages durable).
    pub fn from_bytes(blocks: u64, bytes: &[u8]) -> Self {
        let mut b = Bitmap::new(blocks);
        for (w, chunk) in b.words.iter_mut().zip(bytes.chunks_exact(8)) {
            *w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
        // Bits past the last block are never set.
        for i in blocks..(b.words.len() as u64 * 64) {
            b.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
        b.count = b.words.iter().map(|w| u64::from(w.count_ones())).sum();
        b
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn pages(&self) -> usize {
        self.version.len()
    }

    /// Blocks marked out of sync.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn get(&self, block: u64) -> bool {
        self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Blocks covering the byte range `[offset, offset + len)`.
    pub fn blocks_of(offset: u64, len: u64) -> (u64, u64) {
        (offset / BLOCK_SIZE, (offset + len).div_ceil(BLOCK_SIZE))
    }

    fn change(&mut self, start: u64, end: u64, set: bool) -> u64 {
        let end = end.min(self.blocks);
        let mut changed = 0;
        let mut b = start;
        while b < end {
            let w = (b / 64) as usize;
            let lo = b % 64;
            let hi = (end - (b - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let before = self.words[w];
            self.words[w] = if set { before | mask } else { before & !mask };
            let diff = u64::from((before ^ self.words[w]).count_ones());
            if diff > 0 {
                changed += diff;
                self.version[w / WORDS_PER_PAGE] += 1;
            }
            b += hi - lo;
        }
        if set {
            self.count += changed;
        } else {
            self.count -= changed;
        }
        changed
    }

    /// Mark blocks `[start, end)` out of sync; returns how many were newly set.
    pub fn set(&mut self, start: u64, end: u64) -> u64 {
        self.change(start, end, true)
    }

    /// Mark blocks `[start, end)` in sync; returns how many were cleared.
    pub fn clear(&mut self, start: u64, end: u64) -> u64 {
        self.change(start, end, false)
    }

    pub fn set_all(&mut self) -> u64 {
        self.set(0, self.blocks)
    }

    pub fn clear_all(&mut self) -> u64 {
        self.clear(0, self.blocks)
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        self.scan(from, true, self.blocks)
    }

    /// The first clear bit at or after `from`, or `blocks` if none.
    pub fn next_clear(&self, from: u64) -> u64 {
        self.scan(from, false, self.blocks).unwrap_or(self.blocks)
    }

    /// The first clear block in `[from, limit)`, or `limit` (capped at the
    /// bitmap's size). Costs O(limit - from), not O(run length): the resync
    /// source cuts each chunk at a bounded size, and an unbounded scan made
    /// a full sync quadratic in the device size.
    pub fn next_clear_before(&self, from: u64, limit: u64) -> u64 {
        let limit = limit.min(self.blocks);
        self.scan(from, false, limit).unwrap_or(limit).min(limit)
    }

    /// The first block at or after `from` with the wanted value, looking
    /// no further than the word holding block `limit - 1`.
    fn scan(&self, from: u64, want_set: bool, limit: u64) -> Option<u64> {
        if from >= self.blocks || from >= limit {
            return None;
        }
        let last_word = (limit.min(self.blocks) - 1) / 64;
        let mut w = (from / 64) as usize;
        let flip = |x: u64| if want_set { x } else { !x };
        let mut word = flip(self.words[w]) & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let b = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (b < self.blocks).then_some(b);
            }
            w += 1;
            if w >= self.words.len() || w as u64 > last_word {
                return None;
            }
            word = flip(self.words[w]);
        }
    }

    /// Pages covering blocks `[start, end)`.
    pub fn pages_of(start: u64, end: u64) -> std::ops::Range<usize> {
        (start / BITS_PER_PAGE) as usize..(end.max(start + 1).div_ceil(BITS_PER_PAGE)) as usize
    }

    /// Whether every page covering `[start, end)` is durable in its
    /// current version.
    pub fn durable(&self, start: u64, end: u64) -> bool {
        Self::pages_of(start, end).all(|p| self.durable[p] == self.version[p])
    }

    pub fn page_version(&self, page: usize) -> u64 {
        self.version[page]
    }

    /// The newest version of `page` known to be on stable storage.
    pub fn durable_version(&self, page: usize) -> u64 {
        self.durable[page]
    }

    pub fn is_page_durable(&self, page: usize) -> bool {
        self.durable[page] == self.version[page]
    }

    /// Pages whose current version is not durable.
    pub fn dirty_pages(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.pages()).filter(|&p| self.durable[p] != self.version[p])
    }

    /// Record that `version` of `page` reached stable storage.
    pub fn mark_durable(&mut self, page: usize, version: u64) {
        if version > self.durable[page] {
            self.durable[page] = version;
        }
    }

    /// The bytes of `page` as stored on disk.
    pub fn page_bytes(&self, page: usize) -> Vec<u8> {
        self.words[page * WORDS_PER_PAGE..(page + 1) * WORDS_PER_PAGE]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    /// Set runs as extents, at most `max` per batch, starting at block `from`;
    /// returns the extents and where to continue (None when done).
    pub fn extents(&self, from: u64, max: usize) -> (Vec<Extent>, Option<u64>) {
        let mut out = Vec::new();
        let mut b = from;
        while let Some(start) = self.next_set(b) {
            if out.len() == max {
                return (out, Some(start));
            }
            let end = self.next_clear(start);
            let mut s = start;
            while s < end {
                let count = (end - s).min(u64::from(u32::MAX));
                out.push(Extent {
                    start: s,
                    count: count as u32,
                });
                s += count;
            }
            b = end;
        }
        (out, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_clear_count_and_scan() {
        let mut b = Bitmap::new(200_000);
        assert_eq!(b.set(10, 100), 90);
        assert_eq!(b.set(50, 130), 30);
        assert_eq!(b.count(), 120);
        assert_eq!(b.next_set(0), Some(10));
        assert_eq!(b.next_clear(10), 130);
        assert_eq!(b.clear(60, 70), 10);
        assert_eq!(b.next_clear(10), 60);
        assert_eq!(b.next_set(60), Some(70));
        assert_eq!(b.set_all(), 200_000 - 110);
        assert_eq!(b.next_clear(0), 200_000);
        assert_eq!(b.clear_all(), 200_000);
        assert_eq!(b.next_set(0), None);
    }

    proptest! {
        /// The bounded scan agrees with the unbounded one cut at the limit.
        #[test]
        fn next_clear_before_is_next_clear_cut_at_the_limit(
            blocks in 1u64..3000,
            runs in proptest::collection::vec((0u64..3000, 0u64..700), 0..8),
            from in 0u64..3100,
            len in 0u64..800,
        ) {
            let mut b = Bitmap::new(blocks);
            for (s, l) in runs {
                let s = s.min(blocks);
                b.set(s, (s + l).min(blocks));
            }
            let limit = from.saturating_add(len);
                        let got = b.next_clear_before(from, limit);
            if from < blocks && from < limit {
                prop_assert_eq!(got, b.next_clear(from).min(limit));
            } else {
                                prop_assert_eq!(got, limit.min(blocks));
            }
        }
    }

    #[test]
    fn page_versions_track_durability() {
        let mut b = Bitmap::new(3 * BITS_PER_PAGE);
        assert!(b.durable(0, 3 * BITS_PER_PAGE));
        b.set(BITS_PER_PAGE - 1, BITS_PER_PAGE + 1);
        assert_eq!(b.dirty_pages().collect::<Vec<_>>(), vec![0, 1]);
        assert!(!b.durable(BITS_PER_PAGE, BITS_PER_PAGE + 1));
        let v = b.page_version(1);
        b.mark_durable(1, v);
        assert!(b.durable(BITS_PER_PAGE, BITS_PER_PAGE + 1));
        assert!(!b.durable(0, 1));
        // Setting an already set bit changes nothing.
        b.set(BITS_PER_PAGE, BITS_PER_PAGE + 1);
        assert!(b.is_page_durable(1));
    }

    #[test]
    fn bytes_round_trip_and_stray_bits_are_dropped() {
        let mut b = Bitmap::new(1000);
        b.set(3, 17);
        b.set(999, 1000);
        let bytes: Vec<u8> = (0..b.pages()).flat_map(|p| b.page_bytes(p)).collect();
        let c = Bitmap::from_bytes(1000, &bytes);
        assert_eq!(c.count(), 15);
        let junk = vec![0xffu8; 4096];
        assert_eq!(Bitmap::from_bytes(1000, &junk).count(), 1000);
    }

    proptest! {
        #[test]
        fn matches_a_model(ops in proptest::collection::vec((any::<bool>(), 0u64..5000, 0u64..300), 1..50)) {
            let n = 5000;
            let mut b = Bitmap::new(n);
            let mut model = vec![false; n as usize];
            for (set, start, len) in ops {
                let end = (start + len).min(n);
                if set { b.set(start, end); } else { b.clear(start, end); }
                for m in &mut model[start as usize..end as usize] { *m = set; }
            }
            prop_assert_eq!(b.count(), model.iter().filter(|&&x| x).count() as u64);
            for i in 0..n { prop_assert_eq!(b.get(i), model[i as usize]); }
            let (ext, rest) = b.extents(0, usize::MAX);
            prop_assert!(rest.is_none());
            let mut rebuilt = Bitmap::new(n);
            for e in ext { rebuilt.set(e.start, e.start + u64::from(e.count)); }
            prop_assert_eq!(rebuilt.words, b.words);
        }
    }
}
