//! What to do about a failure, and the one way walsync waits before trying again.
//!
//! Every error that crosses a side's boundary has one [`Disposition`], decided in exactly one
//! function per side:
//!
//! - PostgreSQL: [`crate::postgres::sqlstate_disposition`] (by SQLSTATE), used for the
//!   replication protocol's `ErrorResponse`, for every `tokio_postgres` error
//!   ([`crate::postgres::disposition`]) and for the sink's TOAST re-reads.
//! - The search server: [`crate::sink::index::answer_disposition`] (by HTTP status and error
//!   type), used for every REST call the sink makes and for each bulk request as a whole; the
//!   per-item rule of a bulk answer builds on it (`sink::bulk`).
//! - Kafka: librdkafka retries by itself; what reaches walsync is a stop (the gap rule, a
//!   fatal producer error), decided where it is met (`sink::apply`, `kafka::producer`).
//!
//! Retrying is always safe on the data path: events carry their version, so an action applied
//! twice is stale the second time, and the source resumes from the LSN it confirmed.
//!
//! [`Backoff`] is the only retry delay: exponential from a start (100 ms unless told), doubled
//! up to 30 s, each wait jittered to between half and all of its nominal length so that many
//! partitions or processes retrying the same outage do not knock in step.

use std::time::Duration;

/// What the caller does about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// It may pass by itself (a server unreachable, restarting, overloaded, a lock held): wait
    /// with [`Backoff`] and try the same thing again.
    Retry,
    /// An operator must change something (credentials, privileges, configuration, a missing
    /// object): stop, and say what to fix.
    Stop,
    /// This one record can never be applied (a document the mapping refuses): send it to the
    /// dead-letter topic with the reason and go on. Only the sink's per-record decisions
    /// return it.
    DeadLetter,
}

/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The first wait, unless a caller chooses another start.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Exponential backoff with jitter; see the module doc.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// Starts at [`FIRST_BACKOFF`].
    pub fn new() -> Self {
        Self::starting_at(FIRST_BACKOFF)
    }

    /// Starts at `first` (at most [`MAX_BACKOFF`]).
    pub fn starting_at(first: Duration) -> Self {
        let first = first.min(MAX_BACKOFF);
        Self { first, next: first }
    }

    /// The nominal length of the next wait.
    pub fn next_delay(&self) -> Duration {
        self.next
    }

    /// Waits for the next delay (jittered), then doubles it up to [`MAX_BACKOFF`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.advance()).await;
    }

    /// After a success: the next failure starts from the first delay again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// The jittered delay to wait now; moves on to the next one.
    fn advance(&mut self) -> Duration {
        let delay = self.next.mul_f64(0.5 + jitter() / 2.0);
        self.next = (self.next * 2).min(MAX_BACKOFF);
        delay
    }
}

/// A number in [0, 1) that differs between calls and processes: no shared generator needed.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_limit_and_stay_jittered_within_half() {
        let mut backoff = Backoff::new();
        let mut nominal = FIRST_BACKOFF;
        for _ in 0..12 {
            assert_eq!(backoff.next_delay(), nominal);
            let delay = backoff.advance();
            assert!(
                delay >= nominal / 2 && delay <= nominal,
                "{delay:?} for {nominal:?}"
            );
            nominal = (nominal * 2).min(MAX_BACKOFF);
        }
        assert_eq!(backoff.next_delay(), MAX_BACKOFF);
        backoff.reset();
        assert_eq!(backoff.next_delay(), FIRST_BACKOFF);
    }

    #[test]
    fn a_chosen_start_is_kept_and_capped() {
        let backoff = Backoff::starting_at(Duration::from_millis(500));
        assert_eq!(backoff.next_delay(), Duration::from_millis(500));
        let capped = Backoff::starting_at(Duration::from_secs(600));
        assert_eq!(capped.next_delay(), MAX_BACKOFF);
    }
}
