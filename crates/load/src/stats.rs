//! The load generator's accounting, with no I/O: a latency histogram and the per-connection
//! sequence tracker that counts lost, reordered and duplicated messages.
//!
//! Both sit on the per-delivery path of the generator (millions of records a second), so a
//! record is a few integer operations and no allocation: the histogram is a fixed array of
//! log-linear buckets, the tracker is four counters. Neither keeps per-message state, which is
//! what lets one process watch 20,000 connections.

use serde::Serialize;

/// Sub-buckets per power of two: 64 gives a relative error under 1/64 (1.6 %), ample for
/// p99/p999 comparisons, in 3,776 buckets (30 KiB) for the whole u64 range.
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = (SUB as usize) * (64 - SUB_BITS as usize + 1);

/// A log-linear histogram of nanosecond values (HdrHistogram's idea, without its dependency).
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("min", &self.min)
            .field("max", &self.max)
            .finish()
    }
}

/// Bucket of `v`: exact below 2·SUB, then SUB buckets per power of two.
fn bucket(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros();
    if bits <= SUB_BITS + 1 {
        return v as usize;
    }
    let shift = bits - SUB_BITS - 1;
    let top = v >> shift; // in [SUB, 2·SUB)
    (SUB as usize) * (shift as usize + 1) + (top - SUB) as usize
}

/// Highest value that falls in bucket `i` (so percentiles never under-report).
fn bucket_high(i: usize) -> u64 {
    let sub = SUB as usize;
    if i < 2 * sub {
        return i as u64;
    }
    let shift = (i / sub - 1) as u32;
    let top = (sub + i % sub) as u64;
    // (top + 1) << shift, minus one, without overflowing at the top bucket.
    (top << shift) | ((1u64 << shift) - 1)
}

impl Histogram {
    /// Records one value.
    #[inline]
    pub fn record(&mut self, v: u64) {
        self.counts[bucket(v)] += 1;
        self.total += 1;
        self.sum += u128::from(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Adds another histogram's records to this one.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Largest value recorded, exact (0 when empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value below which `q` (0..=1) of the records fall, rounded up to its bucket's top
    /// (and never above the exact maximum). 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_high(i).min(self.max);
            }
        }
        self.max
    }

    /// Mean of the recorded values (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The usual summary, in microseconds.
    pub fn summary(&self) -> LatencySummary {
        let us = |ns: u64| ns as f64 / 1e3;
        LatencySummary {
            samples: self.total,
            mean_us: self.mean() / 1e3,
            p50_us: us(self.quantile(0.50)),
            p90_us: us(self.quantile(0.90)),
            p99_us: us(self.quantile(0.99)),
            p999_us: us(self.quantile(0.999)),
            max_us: us(self.max),
        }
    }
}

/// Latency percentiles, in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LatencySummary {
    /// Deliveries measured.
    pub samples: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
}

/// What one arriving sequence number was, relative to what the connection saw before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// The next one expected.
    InOrder,
    /// Later than expected: the ones skipped are missing (for now).
    Gap(u64),
    /// Earlier than the highest seen, filling a gap: it came out of order.
    Late,
    /// Earlier than the highest seen with no gap left to fill: seen before.
    Duplicate,
}

/// Sequence accounting for one connection on one channel, whose publisher numbers messages
/// 0, 1, 2, … Every subscriber must see every number, in order.
///
/// Only counters, no bitmap: a late message is assumed to fill one of the open gaps (it is
/// counted as reordered and the gap shrinks); an old number while no gap is open is a
/// duplicate. A duplicate of a number that arrives while an unrelated gap is open is therefore
/// miscounted as a late arrival. Servers that duplicate and lose at once are rare enough that
/// this trade for 32 bytes per connection is right here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqTracker {
    next: u64,
    missing: u64,
    reordered: u64,
    duplicates: u64,
    received: u64,
}

impl SeqTracker {
    /// Accounts for `seq`.
    #[inline]
    pub fn on(&mut self, seq: u64) -> Arrival {
        self.received += 1;
        if seq == self.next {
            self.next += 1;
            Arrival::InOrder
        } else if seq > self.next {
            let gap = seq - self.next;
            self.missing += gap;
            self.next = seq + 1;
            Arrival::Gap(gap)
        } else if self.missing > 0 {
            self.missing -= 1;
            self.reordered += 1;
            Arrival::Late
        } else {
            self.duplicates += 1;
            Arrival::Duplicate
        }
    }

    /// Messages received, duplicates included.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Distinct messages received (each sequence number once).
    pub fn distinct(&self) -> u64 {
        self.received - self.duplicates
    }

    /// One past the highest sequence number seen (0 when nothing arrived).
    pub fn high(&self) -> u64 {
        self.next
    }

    /// Final accounting, given that the publisher sent `sent` messages (numbers 0..sent).
    pub fn finish(&self, sent: u64) -> SeqCounts {
        SeqCounts {
            received: self.received,
            // Gaps still open, plus the tail that never arrived.
            lost: self.missing + sent.saturating_sub(self.next),
            reordered: self.reordered,
            duplicates: self.duplicates,
            // Numbers above what the publisher says it sent: the wrong publisher, or a bug.
            unexpected: self.next.saturating_sub(sent),
        }
    }
}

/// Totals of sequence accounting, for one connection or summed over many.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SeqCounts {
    /// Messages received (duplicates included).
    pub received: u64,
    /// Messages sent on the channel that never arrived.
    pub lost: u64,
    /// Messages that arrived after a later one.
    pub reordered: u64,
    /// Messages that arrived twice.
    pub duplicates: u64,
    /// Sequence numbers beyond the last one sent.
    pub unexpected: u64,
}

impl std::ops::AddAssign for SeqCounts {
    fn add_assign(&mut self, o: SeqCounts) {
        self.received += o.received;
        self.lost += o.lost;
        self.reordered += o.reordered;
        self.duplicates += o.duplicates;
        self.unexpected += o.unexpected;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in 0..5_000u64 {
            assert!(bucket(v) >= last, "{v}: buckets go backwards");
            last = bucket(v);
        }
        for v in (0..5_000u64).chain((0..62).map(|s| (1u64 << s) * 3 + 7)) {
            let b = bucket(v);
            assert!(v <= bucket_high(b), "{v} above its bucket's top");
            if b > 0 {
                assert!(v > bucket_high(b - 1), "{v} fits the bucket below");
            }
            // Relative error bound.
            assert!((bucket_high(b) - v) as f64 <= v as f64 / SUB as f64 + 1.0);
        }
        assert!(bucket(u64::MAX) < BUCKETS);
        assert_eq!(bucket_high(bucket(u64::MAX)), u64::MAX);
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = Histogram::default();
        // 1..=1000 µs, in ns.
        for i in 1..=1000u64 {
            h.record(i * 1000);
        }
        let within = |got: u64, want: u64| {
            let err = (got as f64 - want as f64).abs() / want as f64;
            assert!(err < 0.02, "got {got}, want about {want}");
        };
        within(h.quantile(0.5), 500_000);
        within(h.quantile(0.99), 990_000);
        within(h.quantile(0.999), 999_000);
        assert_eq!(h.quantile(1.0), 1_000_000);
        assert_eq!(h.max(), 1_000_000);
        assert_eq!(h.count(), 1000);
        let mut other = Histogram::default();
        other.record(5_000_000);
        h.merge(&other);
        assert_eq!(h.max(), 5_000_000);
        assert_eq!(h.count(), 1001);
        assert_eq!(Histogram::default().quantile(0.99), 0);
    }

    #[test]
    fn gap_then_late_arrival_is_one_reorder_and_no_loss() {
        let mut t = SeqTracker::default();
        assert_eq!(t.on(0), Arrival::InOrder);
        assert_eq!(t.on(1), Arrival::InOrder);
        assert_eq!(t.on(3), Arrival::Gap(1)); // 2 is missing for now
        assert_eq!(t.on(2), Arrival::Late); // … and here it is
        assert_eq!(t.on(4), Arrival::InOrder);
        let c = t.finish(5);
        assert_eq!(
            c,
            SeqCounts {
                received: 5,
                lost: 0,
                reordered: 1,
                duplicates: 0,
                unexpected: 0
            }
        );
    }

    #[test]
    fn gaps_and_a_missing_tail_are_lost() {
        let mut t = SeqTracker::default();
        for s in [0, 1, 4, 5, 7] {
            t.on(s);
        }
        // 2, 3 and 6 never came; the publisher sent 0..10, so 8 and 9 are lost too.
        let c = t.finish(10);
        assert_eq!(c.lost, 5);
        assert_eq!(c.received, 5);
        assert_eq!(c.reordered, 0);
        assert_eq!(t.distinct(), 5);
        assert_eq!(t.high(), 8);
    }

    #[test]
    fn duplicates_are_not_reorders() {
        let mut t = SeqTracker::default();
        t.on(0);
        t.on(1);
        assert_eq!(t.on(1), Arrival::Duplicate);
        assert_eq!(t.on(0), Arrival::Duplicate);
        t.on(2);
        let c = t.finish(3);
        assert_eq!(c.duplicates, 2);
        assert_eq!(c.reordered, 0);
        assert_eq!(c.lost, 0);
        assert_eq!(t.distinct(), 3);
    }

    #[test]
    fn numbers_beyond_what_was_sent_are_flagged() {
        let mut t = SeqTracker::default();
        t.on(0);
        t.on(1);
        t.on(2);
        assert_eq!(t.finish(2).unexpected, 1);
    }
}
