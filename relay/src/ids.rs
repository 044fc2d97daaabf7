//! The relay's vocabulary: devices, time, and the sequence numbers that order every inbox.
//!
//! Everything above uses these; this module uses nothing of the crate.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A device of a user. Device ids are unique within a user.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceRef {
    /// User id.
    pub user: Arc<str>,
    /// Device id.
    pub device: Arc<str>,
}

impl DeviceRef {
    /// Builds a reference from ids already validated by the caller.
    pub fn new(user: &str, device: &str) -> Self {
        DeviceRef {
            user: user.into(),
            device: device.into(),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Sequence numbers: `ms since 2025-01-01 (41 bits) | node id (5 bits) | counter (7 bits)`.
///
/// They increase per node, read as a time (so expiry is a key-range scan and partitions can be
/// bucketed by time), are unique across up to 32 nodes writing the same inbox, and stay below
/// 2^53, the largest integer a JavaScript client parses exactly from JSON (until the year 2094).
/// Bursts above 128 messages per millisecond on one node borrow from the next millisecond.
const SEQ_EPOCH_MS: u64 = 1_735_689_600_000;
const NODE_BITS: u32 = 5;
const COUNTER_BITS: u32 = 7;
const TIME_SHIFT: u32 = NODE_BITS + COUNTER_BITS;

/// Most relay nodes that can write to one store.
pub const MAX_NODES: u8 = 1 << NODE_BITS;

/// Largest integer JSON clients in JavaScript read exactly.
pub const MAX_SAFE_SEQ: u64 = (1 << 53) - 1;

/// First sequence number at or after `ms`, for any node.
pub fn seq_floor(ms: u64) -> u64 {
    ms.saturating_sub(SEQ_EPOCH_MS) << TIME_SHIFT
}

/// How far sequence numbers advance in `ms` milliseconds.
pub fn seq_span(ms: u64) -> u64 {
    ms << TIME_SHIFT
}

/// Accept time encoded in a sequence number.
pub fn seq_time_ms(seq: u64) -> u64 {
    (seq >> TIME_SHIFT) + SEQ_EPOCH_MS
}

/// Issues increasing sequence numbers for one node.
#[derive(Debug)]
pub struct SeqClock {
    node: u64,
    last: u64,
}

impl SeqClock {
    /// A clock for node `node` (below [`MAX_NODES`]) that continues after `last`.
    pub fn new(node: u8, last: u64) -> Self {
        SeqClock {
            node: u64::from(node % MAX_NODES),
            last,
        }
    }

    /// The next sequence number at wall-clock time `now_ms`.
    pub fn next(&mut self, now_ms: u64) -> u64 {
        let mask = (1u64 << COUNTER_BITS) - 1;
        let now = now_ms.saturating_sub(SEQ_EPOCH_MS);
        let (last_ms, last_ctr) = (self.last >> TIME_SHIFT, self.last & mask);
        let (ms, ctr) = if now > last_ms {
            (now, 0)
        } else if last_ctr < mask {
            (last_ms, last_ctr + 1)
        } else {
            (last_ms + 1, 0)
        };
        self.last = ms << TIME_SHIFT | self.node << COUNTER_BITS | ctr;
        self.last
    }

    /// A bound above every sequence number `n` more calls of [`next`](Self::next) at `now_ms`
    /// (or earlier) can return: what a store must have reserved before issuing them.
    pub fn bound_after(&self, now_ms: u64, n: usize) -> u64 {
        let now = now_ms.saturating_sub(SEQ_EPOCH_MS);
        let ms = now.max(self.last >> TIME_SHIFT) + (n as u64 >> COUNTER_BITS) + 1;
        (ms + 1) << TIME_SHIFT
    }
}

/// A year in durations (`6y`): 365.25 days, so six of them cover the leap days.
pub const YEAR_S: u64 = 31_557_600;

/// A duration written as `250ms`, `25s`, `5m`, `2h`, `30d` or `6y` (365 days), or as seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    /// Whole seconds.
    pub const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }
}

/// Parses a duration string such as `25s` or `6y`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let secs = |k: u64| n.checked_mul(k).map(Duration::from_secs);
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        "y" => secs(YEAR_S),
        _ => None,
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Dur::secs(s)),
            Raw::Text(t) => parse_duration(&t).map(Dur).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "`{t}` is not a duration (use e.g. 500ms, 25s, 2h, 30d, 6y)"
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_stay_exact_in_javascript_until_2094() {
        let year_2094_ms = 3_928_000_000_000u64;
        assert!(seq_floor(year_2094_ms) | ((1 << TIME_SHIFT) - 1) < MAX_SAFE_SEQ);
        let t = 1_767_225_600_123;
        assert_eq!(seq_time_ms(seq_floor(t) + 100), t);
    }

    #[test]
    fn clock_increases_and_nodes_never_collide() {
        let now = 1_767_225_600_000;
        let mut a = SeqClock::new(1, 0);
        let mut b = SeqClock::new(2, 0);
        let mut seen = std::collections::HashSet::new();
        let mut last = 0;
        for i in 0..1000 {
            let s = a.next(now + i / 500); // bursts well above 128 per ms
            assert!(s > last);
            last = s;
            assert!(seen.insert(s));
            assert!(seen.insert(b.next(now + i / 500)));
        }
        // Time never runs backwards even if the wall clock does.
        assert!(a.next(now - 10_000) > last);
    }

    #[test]
    fn a_bound_covers_every_sequence_a_burst_can_issue() {
        let now = 1_767_225_600_000;
        for (start, n) in [(0, 1), (0, 1000), (seq_floor(now + 5_000), 300), (0, 128)] {
            let mut c = SeqClock::new(3, start);
            let bound = c.bound_after(now, n);
            let last = (0..n).map(|_| c.next(now)).max().expect("n > 0");
            assert!(last < bound, "{n} from {start}: {last} >= {bound}");
        }
        // A clock restarted at a reservation issues only above it.
        let reserved = seq_floor(now + 10_000);
        assert!(SeqClock::new(3, reserved).next(now) > reserved);
    }
}
