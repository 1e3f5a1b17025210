//! At rest: the CCF's state directory is owner-only, the store and
//! every key file in it are 0600, a store that others can read stops the CCF from starting, and
//! expired security contexts (with their AEFPSKs) are purged while live ones keep answering.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use capif_ccf::server::{STORE_FILE, StartError, now_ms};
use capif_ccf::store::SecurityContext;
use capif_testkit::ccf::*;
use ccf_core::ids::{AefId, ApiInvokerId};
use tonic::Code;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777
}

fn chmod(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
}

async fn start_err(config: capif_ccf::config::CcfConfig) -> StartError {
    match capif_ccf::server::start(config).await {
        Ok(_) => panic!("the CCF started"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn state_dir_is_0700_and_the_store_and_key_files_are_0600() {
    let tmp = tempfile::tempdir().unwrap();
    // Without a umask that leaves group/other bits, default modes would pass this test too.
    let control = tmp.path().join("control");
    std::fs::create_dir(&control).unwrap();
    assert_ne!(
        mode(&control) & 0o077,
        0,
        "this test needs a umask such as 022 to tell owner-only modes from default ones"
    );

    let state = tmp.path().join("missing-parent").join("state");
    let ccf = capif_ccf::server::start(redb_config(&state, 3600))
        .await
        .expect("CCF starts");
    assert_eq!(mode(&state), 0o700, "state directory");
    for file in [STORE_FILE, "ca.key", "token-signing-keys.json"] {
        assert_eq!(mode(&state.join(file)), 0o600, "{file}");
    }
    // Whatever else the CCF writes there is owner-only too; only the CA certificate is public.
    for entry in std::fs::read_dir(&state).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n != "ca.pem") {
            assert_eq!(
                mode(&path) & 0o077,
                0,
                "{} is open to others",
                path.display()
            );
        }
    }
    ccf.shutdown().await;
}

#[tokio::test]
async fn world_readable_store_stops_the_start_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join(STORE_FILE);
    drop(capif_ccf::store::Store::open(&store).expect("store"));
    chmod(&store, 0o644);

    match start_err(redb_config(tmp.path(), 3600)).await {
        e @ StartError::StoreExposed { .. } => {
            let StartError::StoreExposed { path, mode } = &e else {
                unreachable!()
            };
            assert_eq!((path.as_path(), *mode), (store.as_path(), 0o644));
            let msg = e.to_string();
            let fix = format!("chmod 600 {}", store.display());
            assert!(msg.contains(&fix) && msg.contains("0644"), "{msg}");
        }
        e => panic!("expected StoreExposed, got {e}"),
    }
    assert_eq!(mode(&store), 0o644, "refused, not silently fixed");

    chmod(&store, 0o600);
    let ccf = capif_ccf::server::start(config(tmp.path(), 3600))
        .await
        .expect("starts once fixed");
    ccf.shutdown().await;
}

#[test]
fn ca_generation_creates_the_state_dir_owner_only() {
    // `ccf pki issue` generates the CA before the CCF ever starts: the directory it creates is
    // owner-only from the start, not only after the CCF's start-up check tightened it.
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    ccf_core::pki::DomainCa::load_or_generate(
        &ccf_core::ids::CcfId::new(CCF).unwrap(),
        &state,
        None,
        None,
    )
    .unwrap();
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("ca.key")), 0o600);
}

#[tokio::test]
async fn state_dir_readable_by_others_is_tightened_when_it_is_the_ccfs() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    // What `mkdir` and `ccf pki issue` leave before the first start.
    std::fs::create_dir(&state).unwrap();
    ccf_core::pki::DomainCa::load_or_generate(
        &ccf_core::ids::CcfId::new(CCF).unwrap(),
        &state,
        None,
        None,
    )
    .unwrap();
    chmod(&state, 0o755);
    let ccf = capif_ccf::server::start(config(&state, 3600))
        .await
        .expect("CCF starts");
    assert_eq!(mode(&state), 0o700);
    ccf.shutdown().await;
}

#[tokio::test]
async fn state_dir_writable_by_others_or_shared_is_refused() {
    let tmp = tempfile::tempdir().unwrap();

    let writable = tmp.path().join("writable");
    std::fs::create_dir(&writable).unwrap();
    chmod(&writable, 0o777);
    let e = start_err(config(&writable, 3600)).await;
    assert!(
        matches!(&e, StartError::StateDirExposed { mode: 0o777, .. }),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("chmod 700 {}", writable.display())),
        "{msg}"
    );
    assert_eq!(mode(&writable), 0o777, "refused, not changed");
    assert!(
        !writable.join(STORE_FILE).exists(),
        "nothing written into it"
    );

    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("notes.txt"), "not the CCF's").unwrap();
    chmod(&shared, 0o755);
    let e = start_err(config(&shared, 3600)).await;
    assert!(
        matches!(&e, StartError::StateDirExposed { mode: 0o755, .. }),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("notes.txt") && msg.contains("chmod 700"),
        "{msg}"
    );
    assert_eq!(mode(&shared), 0o755, "refused, not changed");
}

#[tokio::test]
async fn purge_interval_must_be_sane() {
    let tmp = tempfile::tempdir().unwrap();
    for secs in [0, 86_401] {
        let mut c = config(tmp.path(), 3600);
        c.security.context_purge_interval_secs = secs;
        let e = start_err(c).await;
        assert!(
            matches!(&e, StartError::Config(m) if m.contains("context_purge_interval_secs")),
            "{secs}: {e}"
        );
    }
}

#[test]
fn private_files_are_tightened_before_they_are_written() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ca.key");
    std::fs::write(&path, "old").unwrap();
    chmod(&path, 0o644);
    ccf_core::pki::write_private_file(&path, b"secret").unwrap();
    assert_eq!(mode(&path), 0o600);
    assert_eq!(std::fs::read(&path).unwrap(), b"secret");
}

fn inv(id: &str) -> ApiInvokerId {
    ApiInvokerId::new(id).unwrap()
}

fn aef(id: &str) -> AefId {
    AefId::new(id).unwrap()
}

/// A copy of `live` for another invoker and AEF, with another expiry.
fn crafted(
    live: &SecurityContext,
    invoker: &str,
    aef_id: &str,
    expires_at_ms: u64,
) -> SecurityContext {
    let mut c = live.clone();
    c.api_invoker_id = inv(invoker);
    c.aef_id = aef(aef_id);
    c.expires_at_ms = expires_at_ms;
    c.created_at_ms = expires_at_ms.saturating_sub(3_600_000);
    c
}

#[tokio::test]
async fn expired_contexts_are_purged_at_start_and_live_ones_still_answer() {
    let t = start(3600).await;
    let one = onboard(&t, CREDENTIALS[0]).await.unwrap();
    let two = onboard(&t, CREDENTIALS[1]).await.unwrap();
    capif1e(&t, &one)
        .await
        .obtain(&one, &["aef-weather"])
        .await
        .unwrap();
    let store = &t.ccf.state.store;
    let live = store
        .context(&inv(&one.id), &aef("aef-weather"))
        .await
        .unwrap()
        .unwrap();
    let now = now_ms();
    let long_ago = now - 2 * 3_600_000;
    store
        .put_contexts(
            &inv(&one.id),
            &[crafted(&live, &one.id, "aef-location", long_ago)],
        )
        .await
        .unwrap();
    store
        .put_contexts(
            &inv(&two.id),
            &[
                crafted(&live, &two.id, "aef-weather", long_ago),
                // Expired within the purge interval (default 60 s): kept, still KEY_EXPIRED.
                crafted(&live, &two.id, "aef-location", now - 1_000),
            ],
        )
        .await
        .unwrap();
    // Stored and expired: the CCF refuses it as expired.
    let mut location = aef_client(&t, "aef-location").await;
    let e = get_info(&mut location, &one.id, "aef-location")
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "KEY_EXPIRED");
    drop(location);
    assert_eq!(t.ccf.state.store.context_count().await.unwrap(), 4);

    let TestCcf { ccf, dir } = t;
    ccf.shutdown().await;
    let ccf = capif_ccf::server::start(config(dir.path(), 3600))
        .await
        .expect("CCF restarts");
    let t = TestCcf { ccf, dir };
    let store = &t.ccf.state.store;

    assert!(
        store
            .context(&inv(&one.id), &aef("aef-location"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .context(&inv(&two.id), &aef("aef-weather"))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.context_count().await.unwrap(), 2);
    assert_eq!(
        store.invoker_count().await.unwrap(),
        2,
        "invokers are not purged"
    );

    let mut weather = aef_client(&t, "aef-weather").await;
    let got = get_info(&mut weather, &one.id, "aef-weather")
        .await
        .expect("the live context still answers");
    assert_eq!(
        got.aef_psk,
        live.aef_psk.as_ref().unwrap().expose().to_vec()
    );
    assert!(got.remaining_validity_ms > 3_500_000);
    let e = get_info(&mut weather, &two.id, "aef-weather")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let mut location = aef_client(&t, "aef-location").await;
    let e = get_info(&mut location, &two.id, "aef-location")
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "KEY_EXPIRED", "within the grace, still there");
}

#[tokio::test]
async fn expired_contexts_are_purged_periodically_while_live_ones_answer() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), 3600);
    c.security.context_purge_interval_secs = 1;
    let t = TestCcf {
        ccf: capif_ccf::server::start(c).await.expect("CCF starts"),
        dir,
    };
    let one = onboard(&t, CREDENTIALS[0]).await.unwrap();
    capif1e(&t, &one)
        .await
        .obtain(&one, &["aef-weather"])
        .await
        .unwrap();
    let store = &t.ccf.state.store;
    let live = store
        .context(&inv(&one.id), &aef("aef-weather"))
        .await
        .unwrap()
        .unwrap();
    // Written after the purge at start, so only the periodic purge can remove it.
    store
        .put_contexts(
            &inv(&one.id),
            &[crafted(&live, &one.id, "aef-location", now_ms() - 10_000)],
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while store
        .context(&inv(&one.id), &aef("aef-location"))
        .await
        .unwrap()
        .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "the expired context was not purged within 5 s (interval 1 s)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(store.context_count().await.unwrap(), 1);
    let mut weather = aef_client(&t, "aef-weather").await;
    let got = get_info(&mut weather, &one.id, "aef-weather")
        .await
        .expect("the live context still answers");
    assert_eq!(
        got.aef_psk,
        live.aef_psk.as_ref().unwrap().expose().to_vec()
    );
}
