//! systemd's notify protocol (`Type=notify`, `WatchdogSec=`), through the `sd-notify`
//! crate: `READY=1` once every table started, `STATUS=` with a one-line summary every few
//! seconds, and `WATCHDOG=1` at half of `WATCHDOG_USEC` only while [`super::health`] says
//! data moves, so that systemd restarts a wedged daemon. Without `NOTIFY_SOCKET` (not
//! under systemd) nothing is sent.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often STATUS is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// True when a service manager listens (`NOTIFY_SOCKET` is set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "cannot notify systemd");
    }
}

/// Tells systemd the daemon is stopping.
pub fn stopping() {
    if enabled() {
        send(&[NotifyState::Stopping]);
    }
}

/// Tells systemd a reload started (`RELOADING=1` with the monotonic time, as
/// `Type=notify-reload` wants).
pub fn reloading() {
    if enabled() {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now]),
            Err(_) => send(&[NotifyState::Reloading]),
        }
    }
}

/// Tells systemd a reload finished.
pub fn reloaded() {
    if enabled() {
        send(&[NotifyState::Ready]);
    }
}

/// The one-line STATUS: tables started, shards read, changes a second, the largest lag.
pub fn status_line(changes_per_second: f64) -> String {
    let t = super::get();
    let (started, tables) = t.tables_started();
    let health = t.health();
    format!(
        "{}tables {started}/{tables} started, {} shard(s) reading, {changes_per_second:.1} changes/s, lag {:.1} s",
        if health.healthy { "" } else { "STALLED: " },
        t.shards_reading(),
        t.max_lag_seconds()
    )
}

/// Runs until `cancel`: READY once every table started, STATUS every few seconds,
/// WATCHDOG while healthy.
pub async fn run(cancel: CancellationToken) {
    if !enabled() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled().map(|usec| usec / 2);
    if let Some(every) = watchdog {
        info!(
            ping_every_ms = every.as_millis() as u64,
            "systemd watchdog enabled: pinging while healthy"
        );
    }
    let tick = watchdog
        .map_or(STATUS_EVERY, |w| w.min(STATUS_EVERY))
        .max(Duration::from_millis(50));
    let mut ready = false;
    let mut last_status: Option<(Instant, u64)> = None;
    let mut unhealthy_logged = false;
    let mut was_healthy = true;
    loop {
        let t = super::get();
        // A change of health is told at once, not at the next STATUS tick.
        let healthy = t.health().healthy;
        let health_changed = healthy != was_healthy;
        was_healthy = healthy;
        let became_ready = !ready && t.ready();
        if became_ready {
            ready = true;
            send(&[NotifyState::Ready]);
            info!("every table started; told systemd READY=1");
        }
        let now = Instant::now();
        let due = became_ready
            || health_changed
            || last_status.is_none_or(|(at, _)| now.duration_since(at) >= STATUS_EVERY);
        if due {
            let total = t.total_changes();
            let rate = last_status.map_or(0.0, |(at, before)| {
                total.saturating_sub(before) as f64
                    / now.duration_since(at).as_secs_f64().max(0.001)
            });
            send(&[NotifyState::Status(&status_line(rate))]);
            last_status = Some((now, total));
        }
        if watchdog.is_some() {
            let health = t.health();
            if health.healthy {
                send(&[NotifyState::Watchdog]);
                unhealthy_logged = false;
            } else if !unhealthy_logged {
                unhealthy_logged = true;
                warn!(stalled = %health.body(), "not healthy: watchdog pings withheld, systemd restarts the daemon if this lasts WatchdogSec");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
    }
}
