//! Progress bars on a terminal: one per table while it is loaded (snapshot), drawn on stderr
//! with indicatif, the log lines printed above them. Off unless `main` enables them (text
//! logs on a terminal); under systemd and with JSON logs the progress lines say it all.

use std::io::Write;
use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

static BARS: OnceLock<MultiProgress> = OnceLock::new();

/// Draws progress bars on stderr from now on; the returned writer prints log lines above
/// them (give it to the log subscriber).
pub fn enable() -> LogWriter {
    let bars = BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
    LogWriter(bars.clone())
}

/// A bar for `table`'s snapshot of about `total` items (a counter when unknown); `None`
/// when bars are off.
pub fn snapshot_bar(table: &str, total: Option<u64>, done: u64) -> Option<ProgressBar> {
    let bars = BARS.get()?;
    let (bar, template) = match total {
        Some(total) => (
            ProgressBar::new(total),
            "{prefix} [{bar:30}] {human_pos}/~{human_len} items, {per_sec}, ETA ~{eta}",
        ),
        None => (
            ProgressBar::new_spinner(),
            "{prefix} {spinner} {human_pos} items, {per_sec}",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(format!("snapshot {table}"));
    bar.set_position(done);
    Some(bars.add(bar))
}

/// The log subscriber's writer while bars are drawn.
#[derive(Debug, Clone)]
pub struct LogWriter(MultiProgress);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            bars: self.0.clone(),
            buf: Vec::new(),
        }
    }
}

/// One log line, printed when dropped with the bars out of the way.
#[derive(Debug)]
pub struct Line {
    bars: MultiProgress,
    buf: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.bars.suspend(|| {
            let _ = std::io::stderr().write_all(&buf);
        });
    }
}
