//! A bounds-checked big-endian reader over a byte slice.
//!
//! Every multi-byte read checks the remaining length first and returns
//! [`Short`] instead of panicking. `sub` carves out a length-prefixed
//! sub-reader so a nested structure cannot read past its own end, and
//! [`Reader::finish`] rejects trailing bytes. All decoders in this crate are
//! built on it.

use thiserror::Error;

/// The input ended before the structure did, or had bytes left over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Short {
    #[error("message truncated: needed {needed} more bytes")]
    Truncated { needed: usize },
    #[error("message has {0} unexpected trailing bytes")]
    Trailing(usize),
}

#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Short> {
        if self.buf.len() < n {
            return Err(Short::Truncated {
                needed: n - self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Short> {
        let b = self.bytes(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, Short> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, Short> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, Short> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, Short> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A sub-reader over the next `n` bytes; this reader moves past them.
    pub fn sub(&mut self, n: usize) -> Result<Reader<'a>, Short> {
        Ok(Reader::new(self.bytes(n)?))
    }

    /// Everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Succeeds only if every byte was consumed.
    pub fn finish(self) -> Result<(), Short> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Short::Trailing(self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_rejects_short_and_trailing() {
        let data = [0u8, 1, 0, 0, 0, 2, 9];
        let mut r = Reader::new(&data);
        assert_eq!(r.u16().unwrap(), 1);
        assert_eq!(r.u32().unwrap(), 2);
        assert_eq!(r.clone().u16(), Err(Short::Truncated { needed: 1 }));
        assert_eq!(r.clone().finish(), Err(Short::Trailing(1)));
        let mut sub = r.sub(1).unwrap();
        assert_eq!(sub.u8().unwrap(), 9);
        sub.finish().unwrap();
        r.finish().unwrap();
    }
}
