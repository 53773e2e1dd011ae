//! TCP stream reassembly for inspection, one direction at a time.
//!
//! netd sees every segment before the peer does, so it can hold the line: bytes reach the
//! detectors in stream order exactly once, whatever order the segments come in, and no
//! segment passes whose bytes the detectors will not see.
//!
//! - In order: the bytes go to the detectors and into the *history*: the bytes sent but not
//!   yet acknowledged by the peer (trimmed as the peer's ACKs arrive).
//! - Out of order, within the window: a copy is held (the segment passes; the receiver
//!   cannot hand its bytes to the application before the gap is filled, and the gap's
//!   segment is decided after the held bytes have been inspected).
//! - A retransmission (bytes before the next expected one) must equal the history where it
//!   overlaps it; bytes the peer has acknowledged are ignored (the peer drops them too).
//!   Different bytes for the same sequence numbers are the classic way to show a monitor
//!   one stream and the receiver another: reported as inconsistent, and dropped.
//! - What cannot be checked is dropped, never passed: a segment beyond the window, bytes
//!   that would push the unacknowledged data past the window (netd limits an inspected
//!   flow's bytes in flight to [`WINDOW`] per direction), a retransmission of unacknowledged
//!   bytes the history does not hold, and out-of-order copies over the pod's budget. The
//!   sender retransmits; a flow under inspection slows down rather than slipping through.
//!
//! Memory: the history and the held copies, per direction, at most [`WINDOW`] each; all
//! flows of a pod together at most their [`Budget`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Bytes in flight (sent, not acknowledged) per direction of an inspected flow, and the
/// furthest ahead of the next expected byte an out-of-order segment may start.
pub const WINDOW: u32 = 256 * 1024;

/// Bytes of held stream data all inspected flows of one pod may keep together.
#[derive(Debug, Clone)]
pub struct Budget {
    used: Arc<AtomicUsize>,
    limit: usize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Budget {
            used: Arc::new(AtomicUsize::new(0)),
            limit,
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn take(&self, n: usize) -> bool {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if cur + n > self.limit {
                return false;
            }
            match self.used.compare_exchange_weak(
                cur,
                cur + n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Why a segment is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Beyond the window, or more bytes in flight than the window.
    Window,
    /// The pod's inspection budget is spent.
    Budget,
    /// A retransmission of unacknowledged bytes the history no longer holds.
    Unverifiable,
}

impl Refusal {
    /// Stable name (metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Window => "window",
            Refusal::Budget => "budget",
            Refusal::Unverifiable => "unverifiable",
        }
    }
}

/// What became of a segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It passes; `fresh` are the bytes that became contiguous (to inspect), maybe none.
    Pass {
        /// New in-order bytes.
        fresh: Vec<u8>,
    },
    /// It overlaps bytes already seen with different bytes.
    Inconsistent,
    /// It cannot be checked: drop it (the sender retransmits).
    Refused(Refusal),
}

/// One direction of a TCP stream.
#[derive(Debug)]
pub struct HalfStream {
    /// Sequence number of the next in-order byte, once known.
    next: Option<u32>,
    /// Highest sequence number the peer acknowledged.
    acked: u32,
    /// Bytes `[next - history.len(), next)`: sent and not yet acknowledged.
    history: VecDeque<u8>,
    /// Out-of-order copies, by sequence number.
    held: Vec<(u32, Vec<u8>)>,
    held_bytes: usize,
    budget: Budget,
}

impl Drop for HalfStream {
    fn drop(&mut self) {
        self.budget.give(self.history.len() + self.held_bytes);
    }
}

fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

impl HalfStream {
    /// A direction whose first byte is not known yet.
    pub fn new(budget: Budget) -> Self {
        HalfStream {
            next: None,
            acked: 0,
            history: VecDeque::new(),
            held: Vec::new(),
            held_bytes: 0,
            budget,
        }
    }

    /// The SYN (or SYN-ACK) of this direction: the stream starts at `isn + 1`.
    pub fn syn(&mut self, isn: u32) {
        if self.next.is_none() {
            self.next = Some(isn.wrapping_add(1));
            self.acked = isn.wrapping_add(1);
        }
    }

    /// Bytes this direction holds (history and out-of-order copies).
    pub fn held(&self) -> usize {
        self.history.len() + self.held_bytes
    }

    /// The peer acknowledged everything before `ack`.
    pub fn ack(&mut self, ack: u32) {
        let Some(next) = self.next else {
            return;
        };
        // Only forward, and never past what was sent.
        if !before(self.acked, ack) || before(next, ack) {
            return;
        }
        let start = next.wrapping_sub(self.history.len() as u32);
        if before(start, ack) {
            let n = (ack.wrapping_sub(start) as usize).min(self.history.len());
            self.history.drain(..n);
            self.budget.give(n);
        }
        self.acked = ack;
    }

    /// A segment of this direction: `seq` and its payload.
    pub fn segment(&mut self, seq: u32, data: &[u8]) -> Outcome {
        if data.is_empty() {
            return Outcome::Pass { fresh: Vec::new() };
        }
        let next = *self.next.get_or_insert_with(|| {
            // Picked up mid-stream (no SYN seen): start here.
            self.acked = seq;
            seq
        });
        let mut seq = seq;
        let mut data = data;
        if before(seq, next) {
            // The part before `next` is a retransmission: what the peer has not
            // acknowledged must match the history.
            let back = next.wrapping_sub(seq) as usize;
            let old = back.min(data.len());
            let skip_acked = if before(seq, self.acked) {
                (self.acked.wrapping_sub(seq) as usize).min(old)
            } else {
                0
            };
            let check = &data[skip_acked..old];
            if !check.is_empty() {
                let hist_start = next.wrapping_sub(self.history.len() as u32);
                let from = seq.wrapping_add(skip_acked as u32);
                if before(from, hist_start) {
                    return Outcome::Refused(Refusal::Unverifiable);
                }
                let off = from.wrapping_sub(hist_start) as usize;
                if !self.history.range(off..off + check.len()).eq(check.iter()) {
                    return Outcome::Inconsistent;
                }
            }
            if old == data.len() {
                return Outcome::Pass { fresh: Vec::new() };
            }
            data = &data[old..];
            seq = next;
        }
        if seq != next {
            return self.hold(next, seq, data);
        }
        // In order.
        let in_flight = next.wrapping_sub(self.acked) as usize + data.len();
        if in_flight > WINDOW as usize {
            return Outcome::Refused(Refusal::Window);
        }
        // Held copies this segment overlaps must agree with it.
        let end = next.wrapping_add(data.len() as u32);
        for (s, d) in &self.held {
            if before(*s, end) {
                let off = s.wrapping_sub(next) as usize;
                let n = d.len().min(data.len() - off);
                if data[off..off + n] != d[..n] {
                    return Outcome::Inconsistent;
                }
            }
        }
        if !self.budget.take(data.len()) {
            return Outcome::Refused(Refusal::Budget);
        }
        let mut fresh = data.to_vec();
        self.history.extend(data);
        let mut next = end;
        // Held copies that now join the stream.
        self.held.sort_by_key(|(s, _)| s.wrapping_sub(next));
        while let Some(i) = self.held.iter().position(|(s, _)| !before(next, *s)) {
            let (s, d) = self.held.swap_remove(i);
            self.held_bytes -= d.len();
            let skip = next.wrapping_sub(s) as usize;
            if skip < d.len() {
                let tail = &d[skip..];
                fresh.extend_from_slice(tail);
                self.history.extend(tail);
                next = next.wrapping_add(tail.len() as u32);
                // The copy's bytes move from `held` to `history`: the budget already
                // counts them, less the part the stream already had.
                self.budget.give(skip);
            } else {
                self.budget.give(d.len());
            }
        }
        self.next = Some(next);
        Outcome::Pass { fresh }
    }

    fn hold(&mut self, next: u32, seq: u32, data: &[u8]) -> Outcome {
        let ahead = seq.wrapping_sub(next);
        if ahead.saturating_add(data.len() as u32) > WINDOW {
            return Outcome::Refused(Refusal::Window);
        }
        let end = seq.wrapping_add(data.len() as u32);
        for (s, d) in &self.held {
            let d_end = s.wrapping_add(d.len() as u32);
            // Overlap of [seq, end) and [s, d_end).
            let lo = if before(seq, *s) { *s } else { seq };
            let hi = if before(end, d_end) { end } else { d_end };
            if before(lo, hi) {
                let n = hi.wrapping_sub(lo) as usize;
                let a = lo.wrapping_sub(seq) as usize;
                let b = lo.wrapping_sub(*s) as usize;
                if data[a..a + n] != d[b..b + n] {
                    return Outcome::Inconsistent;
                }
            }
        }
        if self
            .held
            .iter()
            .any(|(s, d)| *s == seq && d.len() >= data.len())
        {
            return Outcome::Pass { fresh: Vec::new() };
        }
        if !self.budget.take(data.len()) {
            return Outcome::Refused(Refusal::Budget);
        }
        self.held_bytes += data.len();
        self.held.push((seq, data.to_vec()));
        Outcome::Pass { fresh: Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(o: Outcome) -> Vec<u8> {
        match o {
            Outcome::Pass { fresh } => fresh,
            other => panic!("expected a pass, got {other:?}"),
        }
    }

    #[test]
    fn in_order_bytes_come_out_once() {
        let b = Budget::new(1 << 20);
        let mut h = HalfStream::new(b.clone());
        h.syn(999);
        assert_eq!(fresh(h.segment(1000, b"hello ")), b"hello ");
        assert_eq!(fresh(h.segment(1006, b"world")), b"world");
        // An identical retransmission passes with nothing new.
        assert!(fresh(h.segment(1000, b"hello ")).is_empty());
        // A retransmission that also carries new bytes gives only those.
        assert_eq!(fresh(h.segment(1006, b"world!")), b"!");
        assert_eq!(b.used(), 12);
        h.ack(1012);
        assert_eq!(b.used(), 0);
        drop(h);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn out_of_order_segments_are_delivered_in_order() {
        let b = Budget::new(1 << 20);
        let mut h = HalfStream::new(b.clone());
        h.syn(0);
        assert!(fresh(h.segment(7, b"DROP")).is_empty());
        assert!(fresh(h.segment(4, b"1; ")).is_empty());
        assert_eq!(fresh(h.segment(1, b"id=")), b"id=1; DROP");
        assert_eq!(b.used(), 10);
        drop(h);
        assert_eq!(b.used(), 0, "every held byte is given back");
    }

    #[test]
    fn different_bytes_for_the_same_sequence_numbers_are_inconsistent() {
        let b = Budget::new(1 << 20);
        let mut h = HalfStream::new(b.clone());
        h.syn(0);
        fresh(h.segment(1, b"SELECT 1"));
        assert_eq!(h.segment(1, b"DROP   1"), Outcome::Inconsistent);
        // Overlapping out-of-order copies that disagree.
        assert!(fresh(h.segment(20, b"abcd")).is_empty());
        assert_eq!(h.segment(22, b"XY"), Outcome::Inconsistent);
        // A gap filler that disagrees with a held copy.
        assert_eq!(h.segment(9, &[b'z'; 13]), Outcome::Inconsistent);
        // Acknowledged bytes are not compared (the peer ignores them).
        h.ack(9);
        assert!(fresh(h.segment(1, b"whatever")).is_empty());
    }

    #[test]
    fn what_cannot_be_checked_is_refused() {
        let b = Budget::new(64);
        let mut h = HalfStream::new(b.clone());
        h.syn(0);
        assert_eq!(
            h.segment(1 + WINDOW, b"far"),
            Outcome::Refused(Refusal::Window)
        );
        assert_eq!(h.segment(1, &[0u8; 65]), Outcome::Refused(Refusal::Budget));
        fresh(h.segment(1, &[1u8; 60]));
        assert_eq!(
            h.segment(100, &[2u8; 10]),
            Outcome::Refused(Refusal::Budget)
        );
        // Bytes in flight are capped by the window even with budget to spare.
        let b2 = Budget::new(usize::MAX / 2);
        let mut h2 = HalfStream::new(b2);
        h2.syn(0);
        let big = vec![0u8; WINDOW as usize];
        fresh(h2.segment(1, &big));
        assert_eq!(
            h2.segment(1 + WINDOW, b"x"),
            Outcome::Refused(Refusal::Window)
        );
        h2.ack(1 + WINDOW);
        assert_eq!(fresh(h2.segment(1 + WINDOW, b"x")), b"x");
    }

    #[test]
    fn sequence_numbers_wrap() {
        let b = Budget::new(1 << 20);
        let mut h = HalfStream::new(b);
        h.syn(u32::MAX - 2);
        assert_eq!(fresh(h.segment(u32::MAX - 1, b"abcd")), b"abcd");
        assert_eq!(fresh(h.segment(2, b"ef")), b"ef");
        h.ack(4);
        assert_eq!(h.held(), 0);
    }
}
