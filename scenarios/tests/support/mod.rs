//! What the scenarios crate's in-process tests share besides the federation harness
//! (`gateway/tests/common`): capturing the AEF's and gateway's log lines to check refusal
//! reasons, and onboarding an invoker profile at a domain of the harness.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use capif_scenarios::invoker::{self, Profile};

use super::common::Testbed;

#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The AEF's and the gateway's log lines, captured for the whole test binary.
pub fn logs() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let c = Capture::default();
        let w = c.clone();
        tracing_subscriber::fmt()
            .with_env_filter("aef_stub=info,capif_gateway=info")
            .with_writer(move || w.clone())
            .with_ansi(false)
            .init();
        c
    })
}

/// The first captured line that contains every needle, waiting up to 2 s for it.
pub async fn wait_for_log(needle: &[&str]) -> String {
    for _ in 0..100 {
        let text = String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned();
        if let Some(line) = text.lines().find(|l| needle.iter().all(|n| l.contains(n))) {
            return line.to_string();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no log line with {needle:?}");
}

/// Onboards an invoker at `home` with `credential`; its profile lives in the testbed's tmp dir.
pub async fn profile(t: &Testbed, home: &str, credential: &str) -> Profile {
    let d = t.d(home);
    invoker::onboard(
        &d.ccf().onboarding_addr.to_string(),
        &d.ccf().capif_addr.to_string(),
        &d.ca_pem(),
        "localhost",
        credential,
        &t.tmp.path().join(format!("{home}-{credential}")),
    )
    .await
    .expect("onboarding")
}
