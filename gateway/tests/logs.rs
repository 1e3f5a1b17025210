//! Invariant 4 (docs/ARCHITECTURE.md): no key bytes in any log line at any level. Captures
//! every log event (TRACE and up, every crate) of a full cross-domain run, including a revocation,
//! and searches them for the AEFPSK in the forms it could take.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capif_testkit::federation::*;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_bytes_in_any_log_line() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let t = Testbed::start(Options::default()).await;
    let (a, b) = (t.d("operator-a.test"), t.d("operator-b.test"));
    let mut inv = onboard(b, "c0").await;
    let (psk, key_id) = inv.obtain_psk("aef-a1").await;
    let mut aef_a = aef(a, "aef-a1").await;
    let got = ask(
        &mut aef_a,
        "aef-a1",
        &inv.id,
        "operator-b.test",
        "",
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    assert_eq!(got.aef_psk, psk);
    // Re-key on a new TLS session: a KEY_REPLACED notice travels B -> A with key ids.
    let (psk2, key_id2) = inv.new_session(b).await.obtain_psk("aef-a1").await;
    assert_ne!(psk2, psk);
    ask(
        &mut aef_a,
        "aef-a1",
        &inv.id,
        "operator-b.test",
        &key_id2,
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let logs = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    assert!(
        logs.lines().count() > 50,
        "the capture saw too little to mean anything"
    );
    assert!(
        logs.contains(&key_id),
        "key ids are meant to be logged; the capture missed them"
    );
    let hex = ccf_core_hex(&psk);
    let forms = [
        hex.clone(),
        hex.to_uppercase(),
        format!("{:?}", &psk[..8]).trim_end_matches(']').to_string(),
        format!("{:02x?}", &psk[..8])
            .trim_end_matches(']')
            .to_string(),
    ];
    for f in forms {
        assert!(!logs.contains(&f), "key bytes found in the logs as {f:?}");
    }
}

fn ccf_core_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
