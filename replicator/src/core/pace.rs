//! Resync pacing (`[sync] rate`) and progress measurement, with time as an
//! input: the driver calls [`Node::handle_tick`](super::Node::handle_tick)
//! with a monotonic time in nanoseconds, and nothing here reads a clock.
//!
//! Pacing is a token bucket of bytes. Each tick adds `rate × elapsed`
//! credit, capped at [`BURST`] (half a second) worth: enough to catch up
//! after a short stall of a loaded machine, while an idle period never
//! turns into more than half a second's burst. The sync source starts a
//! chunk only while the credit is not negative, and takes the chunk's
//! whole length when it starts it (the credit may go below zero by up to
//! one chunk: that debt is repaid before the next chunk starts). So over
//! any window of `T` seconds the source starts at most
//! `rate × T + burst + one chunk` bytes. The charge is the chunk's length
//! whether it travels as data or as a zero range: the cap bounds the
//! resync's progress, hence the disk reads on the source, the writes on
//! the target and the wire.

use std::collections::VecDeque;

/// Nanoseconds on the driver's monotonic clock.
pub type Nanos = u64;

pub const SECOND: Nanos = 1_000_000_000;

/// The bucket holds at most this long of credit.
pub const BURST: Nanos = SECOND / 2;
/// Under a slow cap a chunk is at most 1/`CHUNK_SECS_DIV` of a second of
/// the rate.
pub const CHUNK_SECS_DIV: u64 = 10;

/// A token bucket of bytes; rate 0 is unlimited.
#[derive(Debug, Clone, Default)]
pub struct TokenBucket {
    rate: u64,
    credit: i64,
    last: Option<Nanos>,
}

impl TokenBucket {
    pub fn new(rate: u64) -> Self {
        TokenBucket {
            rate,
            credit: 0,
            last: None,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Change the rate (`repctl adjust`). Credit already earned is kept up
    /// to the new rate's burst, so a lower cap holds from now on; time
    /// keeps running from the last refill.
    pub fn set_rate(&mut self, rate: u64) {
        self.rate = rate;
        self.credit = if rate == 0 {
            0
        } else {
            self.credit.min(self.burst())
        };
    }

    pub fn unlimited(&self) -> bool {
        self.rate == 0
    }

    fn burst(&self) -> i64 {
        let b = u128::from(self.rate) * u128::from(BURST) / u128::from(SECOND);
        b.clamp(1, i64::MAX as u128) as i64
    }

    /// Add the credit earned since the previous call.
    pub fn refill(&mut self, now: Nanos) {
        if let Some(last) = self.last {
            let dt = now.saturating_sub(last);
            let earned = u128::from(self.rate) * u128::from(dt) / u128::from(SECOND);
            let earned = earned.min(i64::MAX as u128) as i64;
            self.credit = self.credit.saturating_add(earned).min(self.burst());
        }
        self.last = Some(self.last.map_or(now, |l| l.max(now)));
    }

    /// Whether a chunk may start now.
    pub fn may_start(&self) -> bool {
        self.unlimited() || self.credit >= 0
    }

    /// Charge `bytes` for a chunk that starts now.
    pub fn take(&mut self, bytes: u64) {
        if !self.unlimited() {
            let b = bytes.min(i64::MAX as u64) as i64;
            self.credit = self.credit.saturating_sub(b);
        }
    }

    /// The largest chunk worth starting, in bytes, for chunks of at most
    /// `max` bytes: a slow cap gets chunks of a burst's size (at least
    /// `min`), so it sends steadily instead of a big chunk now and then.
    pub fn chunk_limit(&self, min: u64, max: u64) -> u64 {
        if self.unlimited() {
            max
        } else {
            (self.rate / CHUNK_SECS_DIV).clamp(min, max)
        }
    }

    /// A new resync starts with an empty bucket (no debt, no saved burst).
    pub fn restart(&mut self) {
        self.credit = 0;
    }
}

/// Samples are kept at least this far apart.
pub const SAMPLE_EVERY: Nanos = SECOND / 2;
/// The rate is measured over about this window.
pub const WINDOW: Nanos = 10 * SECOND;

/// Measures how fast a byte count grows: samples of (time, done bytes)
/// over the last [`WINDOW`].
#[derive(Debug, Clone, Default)]
pub struct RateMeter {
    samples: VecDeque<(Nanos, u64)>,
}

impl RateMeter {
    pub fn clear(&mut self) {
        self.samples.clear();
    }

    /// Record that `done` bytes were done at `now`. A smaller count than
    /// the last one starts a new measurement (a new resync).
    pub fn record(&mut self, now: Nanos, done: u64) {
        if let Some(&(t, d)) = self.samples.back() {
            if done < d || now < t {
                self.samples.clear();
            } else if now - t < SAMPLE_EVERY {
                return;
            }
        }
        self.samples.push_back((now, done));
        // Keep one sample at least WINDOW old, so the window is full.
        while self.samples.len() > 2 && now - self.samples[1].0 >= WINDOW {
            self.samples.pop_front();
        }
    }

    /// Bytes per second over the window; 0 until two samples span at
    /// least [`SAMPLE_EVERY`].
    pub fn bytes_per_sec(&self) -> u64 {
        let (Some(&(t0, d0)), Some(&(t1, d1))) = (self.samples.front(), self.samples.back()) else {
            return 0;
        };
        let dt = t1 - t0;
        if dt < SAMPLE_EVERY {
            return 0;
        }
        (u128::from(d1 - d0) * u128::from(SECOND) / u128::from(dt)) as u64
    }

    /// Seconds until `remaining` bytes are done at the measured rate;
    /// `None` while no rate is known.
    pub fn eta_sec(&self, remaining: u64) -> Option<u64> {
        if remaining == 0 {
            return Some(0);
        }
        let rate = self.bytes_per_sec();
        (rate > 0).then(|| remaining.div_ceil(rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const MS: Nanos = 1_000_000;

    /// Drive a bucket like the resync does: tick every `tick`, start
    /// `chunk`-byte chunks while allowed; bytes started by each time.
    fn run(rate: u64, chunk: u64, tick: Nanos, until: Nanos) -> Vec<(Nanos, u64)> {
        let mut b = TokenBucket::new(rate);
        let mut started = 0;
        let mut out = Vec::new();
        let mut now = 0;
        while now <= until {
            b.refill(now);
            while b.may_start() {
                b.take(chunk);
                started += chunk;
            }
            out.push((now, started));
            now += tick;
        }
        out
    }

    #[test]
    fn the_bucket_holds_the_rate_over_any_ten_second_window() {
        for (rate, chunk, tick) in [
            (20 * MIB, MIB, 10 * MS),
            (20 * MIB, 64 * 1024, 10 * MS),
            (MIB, MIB, 10 * MS),
            (100 * MIB, MIB, 100 * MS),
            (3_000_000, 4096 * 3, 7 * MS),
        ] {
            let trace = run(rate, chunk, tick, 30 * SECOND);
            let at = |t: Nanos| trace.iter().rfind(|(n, _)| *n <= t).unwrap().1;
            for start in [0, SECOND, 5 * SECOND + 3 * MS, 17 * SECOND] {
                let got = at(start + 10 * SECOND) - at(start);
                let want = rate * 10;
                // At most one burst and one chunk of debt off.
                let slack = rate / (SECOND / BURST) + chunk;
                assert!(
                    got.abs_diff(want) <= slack,
                    "rate {rate} chunk {chunk}: {got} bytes in 10 s from {start}, want {want} ± {slack}"
                );
                if chunk * 50 <= want {
                    assert!(
                        got.abs_diff(want) * 100 <= want * 2,
                        "rate {rate} chunk {chunk}: {got} bytes in 10 s, more than 2% off {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn an_idle_bucket_saves_at_most_half_a_second() {
        let mut b = TokenBucket::new(10 * MIB);
        b.refill(0);
        b.refill(60 * SECOND);
        let mut n = 0;
        while b.may_start() {
            b.take(4096);
            n += 4096;
        }
        assert!(n <= 5 * MIB + 4096, "{n} bytes after a minute idle");
        assert!(n >= 5 * MIB, "{n} bytes: the burst was not saved");
    }

    #[test]
    fn a_chunk_larger_than_the_credit_starts_then_its_debt_is_repaid() {
        let mut b = TokenBucket::new(MIB); // 1 MiB/s, burst 512 KiB
        b.refill(0);
        assert!(b.may_start());
        b.take(4 * MIB);
        b.refill(SECOND);
        assert!(!b.may_start(), "3 MiB of debt left");
        b.refill(3 * SECOND);
        assert!(!b.may_start(), "1 MiB of debt left");
        b.refill(4 * SECOND);
        assert!(b.may_start());
    }

    #[test]
    fn slow_caps_get_small_chunks() {
        assert_eq!(TokenBucket::new(0).chunk_limit(4096, MIB), MIB);
        assert_eq!(TokenBucket::new(100 * MIB).chunk_limit(4096, MIB), MIB);
        assert_eq!(TokenBucket::new(MIB).chunk_limit(4096, MIB), MIB / 10);
        assert_eq!(TokenBucket::new(1000).chunk_limit(4096, MIB), 4096);
    }

    #[test]
    fn rate_zero_is_unlimited_without_ticks() {
        let mut b = TokenBucket::new(0);
        for _ in 0..1000 {
            assert!(b.may_start());
            b.take(1 << 30);
        }
    }

    #[test]
    fn the_meter_measures_over_the_window_and_restarts() {
        let mut m = RateMeter::default();
        assert_eq!(m.bytes_per_sec(), 0);
        assert_eq!(m.eta_sec(100), None);
        assert_eq!(m.eta_sec(0), Some(0));
        // 5 MiB/s for 20 s, sampled every 10 ms.
        for i in 0..=2000u64 {
            m.record(i * 10 * MS, i * 10 * 5 * MIB / 1000);
        }
        assert_eq!(m.bytes_per_sec(), 5 * MIB);
        assert_eq!(m.eta_sec(50 * MIB), Some(10));
        assert_eq!(m.eta_sec(50 * MIB + 1), Some(11));
        // Then 1 MiB/s: after a full window only the new rate shows.
        let base = 100 * MIB;
        for i in 1..=1200u64 {
            m.record(20 * SECOND + i * 10 * MS, base + i * 10 * MIB / 1000);
        }
        let r = m.bytes_per_sec();
        assert!(r.abs_diff(MIB) < MIB / 20, "{r}");
        // A smaller count is a new resync.
        m.record(40 * SECOND, 0);
        assert_eq!(m.bytes_per_sec(), 0);
        m.record(40 * SECOND + SECOND, 2 * MIB);
        assert_eq!(m.bytes_per_sec(), 2 * MIB);
    }
}
