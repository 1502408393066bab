//! Zero detection for the resync: a chunk that reads as all zeros on the
//! source travels as a zero range (`ResyncZero`), not as data.

/// Whether every byte of `data` is zero. Word-wise: 64-byte blocks are
/// OR-folded as eight `u64`s (the compiler vectorises it), stopping at the
/// first block with a set bit, so data (the usual case) is rejected after
/// its first non-zero block.
pub fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    for b in &mut blocks {
        let mut acc = 0u64;
        for w in b.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8 bytes"));
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zeros_and_every_single_set_byte() {
        assert!(is_zero(&[]));
        for len in [1, 7, 63, 64, 65, 4096, 4096 + 13, 1 << 20] {
            let mut v = vec![0u8; len];
            assert!(is_zero(&v), "len {len}");
            // A single set bit anywhere is seen: first, last, in the
            // remainder, and at a stride through the middle.
            let mut at: Vec<usize> = vec![0, len - 1, len / 2, len - len % 64];
            if len <= 8192 {
                at.extend((0..len).step_by(61));
            }
            for &i in at.iter().filter(|&&i| i < len) {
                for bit in [0x01, 0x80] {
                    v[i] = bit;
                    assert!(!is_zero(&v), "len {len}: byte {i} = {bit:#x} missed");
                    v[i] = 0;
                }
            }
        }
    }

    #[test]
    fn unaligned_slices() {
        let mut v = vec![0u8; 4096 + 64];
        for off in 0..16 {
            assert!(is_zero(&v[off..off + 4096]));
            v[off + 4095] = 1;
            assert!(!is_zero(&v[off..off + 4096]));
            v[off + 4095] = 0;
        }
    }
}
