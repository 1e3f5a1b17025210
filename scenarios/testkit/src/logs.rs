//! Capturing the components' log lines in in-process tests, one test at a time: [`capture`]
//! installs one process-wide subscriber (the first time), waits until no other test of the
//! binary is capturing, and returns a [`Logs`] that sees only the lines written after it was
//! made, so a `wait_for` can never match a line another test left.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Buffer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.lock().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn buffer() -> &'static Buffer {
    static BUFFER: OnceLock<Buffer> = OnceLock::new();
    BUFFER.get_or_init(|| {
        let b = Buffer::default();
        let w = b.clone();
        // Another subscriber may already be installed by the test binary; then nothing is
        // captured and `wait_for` says so.
        let _ = tracing_subscriber::fmt()
            .with_env_filter("aef_stub=info,capif_gateway=info,capif_ccf=info")
            .with_writer(move || w.clone())
            .with_ansi(false)
            .try_init();
        b
    })
}

/// The log lines of one test: those written after [`capture`] returned it.
pub struct Logs {
    start: usize,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

/// Starts capturing for the calling test (one capturing test at a time per binary).
pub async fn capture() -> Logs {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let turn = TURN.lock().await;
    let start = buffer().lock().len();
    Logs { start, _turn: turn }
}

impl Logs {
    /// The lines written since this capture began.
    pub fn text(&self) -> String {
        let all = buffer().lock();
        String::from_utf8_lossy(&all[self.start.min(all.len())..]).into_owned()
    }

    /// The first line since this capture began that contains every needle, waiting up to 2 s.
    pub async fn wait_for(&self, needle: &[&str]) -> String {
        for _ in 0..100 {
            if let Some(line) = self
                .text()
                .lines()
                .find(|l| needle.iter().all(|n| l.contains(n)))
            {
                return line.to_string();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no log line with {needle:?} since this test began capturing");
    }
}
