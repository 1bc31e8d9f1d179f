//! How a shard reader paces itself: how many records it asks for ([`next_limit`]), when a
//! flowing shard may call GetRecords again ([`CallAllowance`]) and how long an idle one
//! waits ([`IdlePolling`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::Rng as _;

use super::GET_RECORDS_LIMIT;

/// Memory reserved before a shard's first page: about one full page (GetRecords returns up
/// to 1 MB); later pages reserve what the previous one took.
pub(super) const FIRST_PAGE_ESTIMATE_BYTES: usize = 1 << 20;

/// GetRecords' `Limit` on a shard's first call, before the size of its records is known.
pub(super) const FIRST_PAGE_LIMIT: i32 = 250;

/// Pages are kept near this much converted data by lowering GetRecords' `Limit` when records
/// are large. DynamoDB ends a page at 1 MB of stream data anyway (about this much once
/// converted), but emulators do not: 1000 records of 4 KB items (both images) would make a
/// 9 MB page, and a few of those per shard would blow the memory budget.
pub(super) const PAGE_TARGET_BYTES: usize = 2 << 20;

/// The `Limit` for the next call, from the last page's converted size and record count.
pub(super) fn next_limit(page_bytes: usize, stream_records: usize) -> i32 {
    if stream_records == 0 {
        return GET_RECORDS_LIMIT;
    }
    let per_record = (page_bytes / stream_records).max(1);
    (PAGE_TARGET_BYTES / per_record).clamp(1, GET_RECORDS_LIMIT as usize) as i32
}

/// A shard's GetRecords allowance (`reader.max_calls_per_second_per_shard`, DynamoDB's limit
/// of 5 a second per shard by default): when the next call may start.
///
/// - After a page with records that was not full (the shard is flowing, caught up), the
///   next call starts one call period (1/rate: 200 ms) after the previous one *started*, so
///   the time GetRecords itself took is not added to every change's latency: a change
///   waits half a period on average, plus one call and one produce.
/// - After a full page (a backlog) the next call starts at once,
/// - but never more than `burst` calls start within `burst` periods (`burst` = the rate,
///   whole, 1 to 5): at most 5 calls in any second at the default, as DynamoDB allows;
///   throttling (LimitExceededException) would back off for seconds.
#[derive(Debug, Clone)]
pub(super) struct CallAllowance {
    period: Duration,
    /// How many calls may start within `burst` periods.
    burst: usize,
    /// When the last `burst` calls started, oldest first.
    starts: VecDeque<Instant>,
}

/// Most calls a shard starts back to back (a backlog) before the allowance spaces them.
const MAX_BURST: usize = 5;

impl CallAllowance {
    pub(super) fn new(calls_per_second: f64) -> Self {
        let rate = if calls_per_second.is_finite() && calls_per_second > 0.0 {
            calls_per_second
        } else {
            crate::config::defaults::MAX_CALLS_PER_SECOND_PER_SHARD
        };
        let burst = (rate.floor() as usize).clamp(1, MAX_BURST);
        Self {
            period: Duration::from_secs_f64(1.0 / rate),
            burst,
            starts: VecDeque::with_capacity(burst),
        }
    }

    /// The earliest time the next call may start: `flowing` after a page with records that
    /// was not full, otherwise (a full page, the first call, after a pause) as soon as the
    /// window allows.
    pub(super) fn next_start(&self, flowing: bool) -> Option<Instant> {
        let window = (self.starts.len() == self.burst)
            .then(|| {
                self.starts
                    .front()
                    .map(|&s| s + self.period * self.burst as u32)
            })
            .flatten();
        let spaced = flowing
            .then(|| self.starts.back().map(|&s| s + self.period))
            .flatten();
        window.max(spaced)
    }

    /// A call starts now.
    pub(super) fn started(&mut self, at: Instant) {
        if self.starts.len() == self.burst {
            self.starts.pop_front();
        }
        self.starts.push_back(at);
    }
}

/// How long an idle shard waits before its next GetRecords.
///
/// A page with records resets it (the shard is flowing: [`CallAllowance`] spaces its calls).
/// After an empty page the pause is `reader.idle_poll_interval_ms` (250 ms by default), and
/// doubles with each further empty page, up to a cap that grows with
/// the shard's silence: the idle interval while the shard had records within the last
/// [`SILENCE_PER_PAUSE`] × that interval (7.5 s), then 1/30 of the silence, up to
/// [`DORMANT_FACTOR`] × the idle interval (8 s, after 4 minutes of silence), never more.
/// Pauses over the idle interval get ±10% jitter so that many quiet shards do not poll in
/// step, and pauses of [`GRID_FROM`] or more end on a process-wide grid of [`GRID`] (the
/// nearest grid point, never past the longest pause): quiet shards then wake together, a
/// dozen calls per wake-up instead of one, which is what most of an idle call cost (see
/// [`IdlePolling::wake_at`]).
///
/// Why: each GetRecords costs the daemon 0.2 to 0.6 ms of CPU (signing, HTTP, the SDK) and
/// the user one billed streams read request. 100 idle shards polled 4 times a second take 7%
/// of a core and 35 million requests a day; at 8 s they take under 1% and 1 million. A shard
/// with records in the last seconds is still polled every 250 ms; the first change after a
/// silence waits at most 1/30 of that silence (2 s after a quiet minute, 8 s after four).
/// KCL polls every shard once a second, Lambda 4 times.
#[derive(Debug, Clone)]
pub(super) struct IdlePolling {
    busy_interval: Duration,
    next: Duration,
    last_records: Instant,
}

/// The cap on a pause is the shard's silence divided by this.
const SILENCE_PER_PAUSE: u32 = 30;

/// The longest pause, in multiples of `reader.idle_poll_interval_ms`.
const DORMANT_FACTOR: u32 = crate::config::defaults::IDLE_PAUSE_CAP_FACTOR as u32;

impl IdlePolling {
    pub(super) fn new(idle_poll_interval: Duration) -> Self {
        let busy_interval = idle_poll_interval.max(Duration::from_millis(1));
        Self {
            busy_interval,
            next: busy_interval,
            // A shard that just started counts as busy.
            last_records: Instant::now(),
        }
    }

    /// A page with records: the shard is busy again.
    pub(super) fn records(&mut self) {
        self.next = self.busy_interval;
        self.last_records = Instant::now();
    }

    /// An empty page: how long to wait before the next call.
    pub(super) fn empty_page(&mut self) -> Duration {
        let longest = self.busy_interval * DORMANT_FACTOR;
        let cap =
            (self.last_records.elapsed() / SILENCE_PER_PAUSE).clamp(self.busy_interval, longest);
        let pause = self.next.min(cap);
        self.next = (pause * 2).min(cap);
        if pause > self.busy_interval {
            pause
                .mul_f64(rand::rng().random_range(0.9..1.1))
                .min(longest)
        } else {
            pause
        }
    }

    /// When the call after an empty page starts: [`Self::empty_page`]'s pause from `now`,
    /// moved to the nearest point of the shared grid when it is [`GRID_FROM`] or longer
    /// (never later than the longest pause, never sooner than half the pause).
    ///
    /// Why: a profile of 100 idle shards (each woken on its own, ~12 a second) put most of
    /// a call's CPU in waking the runtime for it (epoll, a worker thread unparked, another
    /// notified, cold caches), not in the request: the same lean call costs a tenth of it
    /// in a tight loop. Waking quiet shards together shares that cost.
    pub(super) fn wake_at(&mut self, now: Instant) -> Instant {
        let pause = self.empty_page();
        on_grid(now, pause, self.busy_interval * DORMANT_FACTOR)
    }
}

/// Pauses at least this long end on the grid.
pub(super) const GRID_FROM: Duration = Duration::from_secs(2);

/// The grid's step: quiet shards wake at whole seconds of the process's grid.
pub(super) const GRID: Duration = Duration::from_secs(1);

/// The nearest grid point to `now + pause` (pauses of [`GRID_FROM`] or more), within
/// `[now + pause / 2, now + longest]`.
fn on_grid(now: Instant, pause: Duration, longest: Duration) -> Instant {
    let target = now + pause;
    if pause < GRID_FROM {
        return target;
    }
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    let since = target.saturating_duration_since(origin).as_nanos();
    let step = GRID.as_nanos();
    let below = since - since % step;
    let nearest = if since - below >= step / 2 {
        below + step
    } else {
        below
    };
    let mut at = origin + Duration::from_nanos(nearest as u64);
    if at > now + longest {
        at -= GRID;
    }
    if at < now + pause / 2 {
        at += GRID;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_records_make_smaller_pages() {
        assert_eq!(next_limit(0, 0), 1000);
        // 200-byte items, both images: about 1.5 KB a change once converted.
        assert_eq!(next_limit(1_500_000, 1000), 1000);
        // 4 KB items, both images: about 9 KB a change: pages of ~2 MB.
        assert_eq!(next_limit(9_000_000, 1000), 233);
        // A single huge record still gets read.
        assert_eq!(next_limit(5_000_000, 1), 1);
    }

    #[test]
    fn the_allowance_spaces_flowing_calls_and_caps_bursts() {
        let mut a = CallAllowance::new(5.0);
        let t0 = Instant::now();
        let ms = |t: Option<Instant>| t.map(|t| t.duration_since(t0).as_millis() as u64);
        assert_eq!(ms(a.next_start(true)), None, "the first call at once");
        // Flowing: 200 ms after the previous call started, however long it took.
        a.started(t0);
        assert_eq!(ms(a.next_start(true)), Some(200));
        assert_eq!(ms(a.next_start(false)), None, "a full page: at once");
        // A backlog: 5 calls back to back, then the 6th waits until a second after the 1st.
        for i in 1..5 {
            a.started(t0 + Duration::from_millis(10 * i));
        }
        assert_eq!(ms(a.next_start(false)), Some(1000));
        assert_eq!(ms(a.next_start(true)), Some(1000));
        a.started(t0 + Duration::from_millis(1000));
        assert_eq!(ms(a.next_start(false)), Some(1010));
        assert_eq!(ms(a.next_start(true)), Some(1200));
        // Any 1 s window holds at most 5 starts, whatever the pattern.
        let mut a = CallAllowance::new(5.0);
        let mut now = t0;
        let mut starts = Vec::new();
        for i in 0..40u64 {
            let at = a.next_start(i % 3 == 0).unwrap_or(now).max(now);
            a.started(at);
            starts.push(at);
            now = at + Duration::from_millis(i % 7 * 13);
        }
        for (i, s) in starts.iter().enumerate() {
            let within = starts[i..]
                .iter()
                .take_while(|&&t| t < *s + Duration::from_secs(1))
                .count();
            assert!(within <= 5, "{within} calls within a second from call {i}");
        }
        // Halved (a second reader on the stream): 2.5 a second, bursts of 2 within 800 ms.
        let mut a = CallAllowance::new(2.5);
        a.started(t0);
        assert_eq!(ms(a.next_start(true)), Some(400));
        a.started(t0 + Duration::from_millis(1));
        assert_eq!(ms(a.next_start(false)), Some(800));
        // A high allowance (an emulator, a benchmark): 1 ms apart, bursts of 5.
        let mut a = CallAllowance::new(1000.0);
        a.started(t0);
        assert_eq!(ms(a.next_start(true)), Some(1));
    }

    #[test]
    fn idle_polling_backs_off_more_the_longer_a_shard_is_silent() {
        let mut p = IdlePolling::new(Duration::from_millis(250));
        let ms = |d: Duration| d.as_millis() as u64;
        let pauses: Vec<u64> = (0..4).map(|_| ms(p.empty_page())).collect();
        assert_eq!(pauses, [250, 250, 250, 250], "recently busy: every 250 ms");
        p.records();
        // Silent for a minute: pauses double up to 2 s, with jitter.
        p.last_records = Instant::now() - Duration::from_secs(60);
        let pauses: Vec<u64> = (0..6).map(|_| ms(p.empty_page())).collect();
        assert_eq!(pauses[0], 250);
        assert!((450..=550).contains(&pauses[1]), "{pauses:?}");
        assert!((900..=1100).contains(&pauses[2]), "{pauses:?}");
        for p in &pauses[3..] {
            assert!((1800..=2200).contains(p), "{pauses:?}");
        }
        // Silent for ten minutes: at most 32 x the interval.
        p.last_records = Instant::now() - Duration::from_secs(600);
        let pauses: Vec<u64> = (0..5).map(|_| ms(p.empty_page())).collect();
        assert!((1800..=2200).contains(&pauses[0]), "{pauses:?}");
        assert!((3600..=4400).contains(&pauses[1]), "{pauses:?}");
        for p in &pauses[2..] {
            assert!((7200..=8000).contains(p), "{pauses:?}");
        }
        p.records();
        assert_eq!(ms(p.empty_page()), 250, "records make the shard busy again");
        assert_eq!(ms(IdlePolling::new(Duration::ZERO).empty_page()), 1);
    }

    #[test]
    fn quiet_shards_wake_together_on_the_grid_within_the_longest_pause() {
        let longest = Duration::from_secs(8);
        let t0 = Instant::now();
        // Short pauses are not moved.
        let short = Duration::from_millis(1999);
        assert_eq!(on_grid(t0, short, longest), t0 + short);
        // Long pauses from many start times land on few grid points, each within bounds.
        let mut points = std::collections::BTreeSet::new();
        for i in 0..1000u64 {
            let now = t0 + Duration::from_micros(i * 7919);
            for pause_ms in [2000u64, 3100, 4000, 7200, 7999, 8000] {
                let pause = Duration::from_millis(pause_ms);
                let at = on_grid(now, pause, longest);
                assert!(
                    at <= now + longest,
                    "{pause_ms} ms from {i}: past the longest pause"
                );
                assert!(at >= now + pause / 2, "{pause_ms} ms from {i}: too soon");
                let off = at.duration_since(now).as_millis() as i64 - pause_ms as i64;
                assert!(off.abs() <= 1000, "{pause_ms} ms from {i}: moved {off} ms");
                points.insert(at);
            }
        }
        // 8 s of start times and pauses spread over 6 s: whole seconds of one grid.
        assert!(points.len() <= 16, "{} wake-up times", points.len());
        let first = *points.iter().next().unwrap();
        for p in &points {
            assert_eq!(p.duration_since(first).as_nanos() % GRID.as_nanos(), 0);
        }
        // The jittered longest pause never exceeds the cap.
        let mut p = IdlePolling::new(Duration::from_millis(250));
        p.last_records = Instant::now() - Duration::from_secs(3600);
        for _ in 0..200 {
            let now = Instant::now();
            assert!(p.wake_at(now) <= now + longest);
        }
    }
}
