//! The one retry policy: exponential backoff with full jitter and an optional deadline.
//!
//! Every retry loop in the daemon (AWS calls, produce requests, credential refresh) takes
//! its delays from a [`Backoff`], so one place decides how hard we push a struggling
//! dependency.

use std::future::Future;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio_util::sync::CancellationToken;

/// Exponential backoff with full jitter: the n-th delay is uniform in
/// `[base/2, base]` where `base = min(max, initial * 2^n)`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    deadline: Option<Instant>,
}

impl Backoff {
    /// Backoff for ordinary failures: 100 ms doubling up to 10 s.
    pub fn transient() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }

    /// Backoff for throttling: 500 ms doubling up to 30 s.
    pub fn throttled() -> Self {
        Self::new(Duration::from_millis(500), Duration::from_secs(30))
    }

    /// A backoff from `initial` doubling up to `max`, without a deadline.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
            deadline: None,
        }
    }

    /// Gives up once `within` has passed from now.
    pub fn with_deadline(mut self, within: Duration) -> Self {
        self.deadline = Some(Instant::now() + within);
        self
    }

    /// Number of delays handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay, or `None` when the deadline would be passed.
    pub fn next_delay(&mut self) -> Option<Duration> {
        let exp = self.attempt.min(30);
        self.attempt = self.attempt.saturating_add(1);
        let base = self
            .initial
            .saturating_mul(1u32 << exp.min(20))
            .min(self.max);
        let half = base / 2;
        let jitter = rand::rng().random_range(0..=half.as_millis() as u64);
        let delay = half + Duration::from_millis(jitter);
        match self.deadline {
            Some(deadline) if Instant::now() + delay > deadline => None,
            _ => Some(delay),
        }
    }
}

/// How one attempt of a retried operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure<E> {
    /// The dependency asked us to slow down: retry after a longer pause.
    Throttled(E),
    /// May pass by itself: retry.
    Transient(E),
    /// Retrying cannot fix it.
    Fatal(E),
}

/// Why [`retry`] gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GaveUp<E> {
    /// An attempt failed for good.
    Fatal(E),
    /// `cancel` fired; the last failure, if any.
    Cancelled(Option<E>),
}

/// A retry about to happen, for the caller's log line.
#[derive(Debug, Clone, Copy)]
pub struct Retrying {
    /// Attempts that failed so far with this kind of failure.
    pub attempt: u32,
    /// The pause before the next attempt.
    pub delay: Duration,
    /// The failure was throttling.
    pub throttled: bool,
}

/// The one retry loop: runs `attempt` until it succeeds, fails for good, or `cancel` fires.
/// Transient failures back off with [`Backoff::transient`], throttling with
/// [`Backoff::throttled`] (both jittered); `on_retry` is told of every retry (it logs).
pub async fn retry<T, E, F, Fut>(
    cancel: &CancellationToken,
    mut attempt: F,
    mut on_retry: impl FnMut(&E, Retrying),
) -> Result<T, GaveUp<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure<E>>>,
{
    let mut transient = Backoff::transient();
    let mut throttled = Backoff::throttled();
    loop {
        let result = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(GaveUp::Cancelled(None)),
            r = attempt() => r,
        };
        let (error, backoff, is_throttled) = match result {
            Ok(v) => return Ok(v),
            Err(Failure::Fatal(e)) => return Err(GaveUp::Fatal(e)),
            Err(Failure::Throttled(e)) => (e, &mut throttled, true),
            Err(Failure::Transient(e)) => (e, &mut transient, false),
        };
        let delay = backoff.next_delay().unwrap_or(backoff.max);
        on_retry(
            &error,
            Retrying {
                attempt: backoff.attempts(),
                delay,
                throttled: is_throttled,
            },
        );
        tokio::select! {
            _ = cancel.cancelled() => return Err(GaveUp::Cancelled(Some(error))),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<_> = (0..8).map(|_| b.next_delay().unwrap()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[1] >= Duration::from_millis(100) && d[1] <= Duration::from_millis(200));
        for x in &d[4..] {
            assert!(*x >= Duration::from_millis(500) && *x <= Duration::from_secs(1));
        }
        b.reset();
        assert!(b.next_delay().unwrap() <= Duration::from_millis(100));
    }

    #[test]
    fn deadline_stops_the_retries() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1))
            .with_deadline(Duration::from_millis(10));
        assert_eq!(b.next_delay(), None);
    }

    #[tokio::test]
    async fn retry_backs_off_until_success_fatal_or_cancel() {
        let cancel = CancellationToken::new();
        let mut n = 0;
        let mut retries = Vec::new();
        let got = retry(
            &cancel,
            || {
                n += 1;
                let r = match n {
                    1 => Err(Failure::Transient("down")),
                    2 => Err(Failure::Throttled("slow down")),
                    _ => Ok(n),
                };
                async move { r }
            },
            |e, r| retries.push((*e, r.throttled)),
        )
        .await;
        assert_eq!(got, Ok(3));
        assert_eq!(retries, [("down", false), ("slow down", true)]);

        let fatal: Result<(), _> = retry(
            &cancel,
            || async { Err(Failure::Fatal("denied")) },
            |_: &&str, _| {},
        )
        .await;
        assert_eq!(fatal, Err(GaveUp::Fatal("denied")));

        let stopper = cancel.clone();
        let cancelled: Result<(), _> = retry(
            &cancel,
            || async { Err(Failure::Transient("down")) },
            |_: &&str, _| stopper.cancel(),
        )
        .await;
        assert_eq!(cancelled, Err(GaveUp::Cancelled(Some("down"))));
    }
}
