//! The CCF store's operations, run against BOTH backends (a test matrix, not a copy): each test
//! body is an `async fn(&Backing)` that [`on_both_backends!`] runs once on a redb file in a
//! temporary directory and once on a fresh database of this binary's PostgreSQL server
//! (`capif_testkit::postgres`; missing PostgreSQL fails the run, naming
//! `scripts/install-postgres.sh`). Then what only a shared database can show: two replicas.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use capif_ccf::store::{ContextLookup, InvokerRecord, SecurityContext, Store, StoreError};
use capif_proto::v1::RevocationNotice;
use ccf_core::ids::{AefId, ApiInvokerId, CcfId};
use ccf_core::kdf::AefPsk;
use ccf_core::pg::DatabaseUrl;
use ccf_core::registry::SecurityMethod;

/// Where a test's state lives; [`Backing::open`] may be called again to "restart".
enum Backing {
    Redb(tempfile::TempDir),
    Postgres(DatabaseUrl),
}

impl Backing {
    fn redb() -> Self {
        Backing::Redb(tempfile::tempdir().unwrap())
    }

    fn postgres() -> Self {
        Backing::Postgres(DatabaseUrl::new(capif_testkit::postgres::fresh_database()))
    }

    async fn open(&self) -> Store {
        match self {
            Backing::Redb(dir) => Store::open(&dir.path().join("db")).unwrap(),
            Backing::Postgres(url) => Store::connect(url, 4).await.unwrap(),
        }
    }
}

/// For each named `async fn(&Backing)`: a module of that name with a `redb` and a `postgres`
/// test.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn redb() {
                super::$name(&super::Backing::redb()).await
            }
            #[tokio::test]
            async fn postgres() {
                super::$name(&super::Backing::postgres()).await
            }
        }
    )*};
}

on_both_backends!(
    reused_credential_changes_nothing,
    contexts_round_trip_and_go_with_the_invoker,
    purge_deletes_only_contexts_expired_by_the_cutoff,
    notices_are_queued_with_the_removal_and_survive_a_reopen,
    lookups_and_foreign_refusals,
    token_keys_rotate_and_survive_a_reopen,
);

fn inv(id: &str) -> ApiInvokerId {
    ApiInvokerId::new(id).unwrap()
}

fn aef(a: &str) -> AefId {
    AefId::new(a).unwrap()
}

fn rec(id: &str) -> InvokerRecord {
    InvokerRecord {
        api_invoker_id: inv(id),
        certificate_pem: "c".into(),
        public_key_pem: "k".into(),
        onboarded_at_ms: 1,
        information: "info".into(),
        notification_destination: "https://n.test/cb".into(),
    }
}

fn ctx(invoker: &str, aef_id: &str, psk: u8) -> SecurityContext {
    SecurityContext {
        api_invoker_id: inv(invoker),
        aef_id: aef(aef_id),
        aef_ccf_id: CcfId::new("a.test").unwrap(),
        method: SecurityMethod::Psk,
        aef_psk: AefPsk::from_slice(&[psk; 32]),
        key_id: "k".into(),
        interface_canonical: "h:1".into(),
        allowed_apis: vec![],
        created_at_ms: 0,
        expires_at_ms: 10,
    }
}

fn ctx_expiring(invoker: &str, aef_id: &str, psk: u8, expires_at_ms: u64) -> SecurityContext {
    SecurityContext {
        expires_at_ms,
        ..ctx(invoker, aef_id, psk)
    }
}

async fn reused_credential_changes_nothing(b: &Backing) {
    let s = b.open().await;
    s.onboard("d1", &rec("inv-1")).await.unwrap();
    assert!(matches!(
        s.onboard("d1", &rec("inv-2")).await,
        Err(StoreError::CredentialUsed)
    ));
    assert!(s.credential_used("d1").await.unwrap());
    assert!(!s.credential_used("d2").await.unwrap());
    assert_eq!(s.invoker_count().await.unwrap(), 1);
    assert!(s.invoker(&inv("inv-2")).await.unwrap().is_none());
    assert_eq!(s.invoker(&inv("inv-1")).await.unwrap(), Some(rec("inv-1")));
}

async fn contexts_round_trip_and_go_with_the_invoker(b: &Backing) {
    let s = b.open().await;
    s.onboard("d1", &rec("inv-1")).await.unwrap();
    s.onboard("d2", &rec("inv-10")).await.unwrap();
    let (id, id10) = (inv("inv-1"), inv("inv-10"));
    let mut oauth = ctx("inv-1", "aef-b", 2);
    oauth.method = SecurityMethod::Oauth;
    oauth.aef_psk = None;
    oauth.allowed_apis = vec![ccf_core::ids::ApiName::new("weather").unwrap()];
    s.put_contexts(&id, &[ctx("inv-1", "aef-a", 1), oauth.clone()])
        .await
        .unwrap();
    s.put_contexts(&id10, &[ctx("inv-10", "aef-a", 3)])
        .await
        .unwrap();
    let got = s.context(&id, &aef("aef-a")).await.unwrap().unwrap();
    assert_eq!(got.aef_psk.unwrap().expose(), &[1; 32]);
    let got = s.context(&id, &aef("aef-b")).await.unwrap().unwrap();
    assert_eq!(
        (got.method, got.aef_psk.is_none(), got.allowed_apis),
        (SecurityMethod::Oauth, true, oauth.allowed_apis.clone())
    );
    // A replacement returns what it replaced.
    let replaced = s
        .put_contexts(&id, &[ctx("inv-1", "aef-a", 9)])
        .await
        .unwrap();
    assert_eq!(replaced.len(), 1);
    assert_eq!(replaced[0].aef_psk.as_ref().unwrap().expose(), &[1; 32]);
    let all = s.contexts_of(&id).await.unwrap();
    let aefs: Vec<&str> = all.iter().map(|c| c.aef_id.as_str()).collect();
    assert_eq!(aefs, ["aef-a", "aef-b"]);
    assert_eq!(s.offboard(&id).await.unwrap().len(), 2);
    assert_eq!(
        s.contexts_of(&id10).await.unwrap().len(),
        1,
        "prefix scan must not touch inv-10"
    );
    assert!(matches!(
        s.put_contexts(&id, &[ctx("inv-1", "aef-a", 1)]).await,
        Err(StoreError::InvokerGone)
    ));
    assert!(matches!(
        s.offboard(&id).await,
        Err(StoreError::InvokerGone)
    ));
    assert_eq!(s.context_count().await.unwrap(), 1);
    assert_eq!(s.invoker_count().await.unwrap(), 1);
}

async fn purge_deletes_only_contexts_expired_by_the_cutoff(b: &Backing) {
    let s = b.open().await;
    s.onboard("d1", &rec("inv-1")).await.unwrap();
    s.onboard("d2", &rec("inv-2")).await.unwrap();
    let (id1, id2) = (inv("inv-1"), inv("inv-2"));
    s.put_contexts(
        &id1,
        &[
            ctx_expiring("inv-1", "aef-a", 1, 100),
            ctx_expiring("inv-1", "aef-b", 2, 1_000),
        ],
    )
    .await
    .unwrap();
    s.put_contexts(
        &id2,
        &[
            // Exactly at the cutoff: expired (the CCF refuses a key when expiry <= now).
            ctx_expiring("inv-2", "aef-a", 3, 500),
            ctx_expiring("inv-2", "aef-b", 4, 501),
        ],
    )
    .await
    .unwrap();

    assert_eq!(s.purge_expired(500).await.unwrap(), 2);
    assert!(s.context(&id1, &aef("aef-a")).await.unwrap().is_none());
    assert!(s.context(&id2, &aef("aef-a")).await.unwrap().is_none());
    let live = s.context(&id1, &aef("aef-b")).await.unwrap().unwrap();
    assert_eq!(live.aef_psk.unwrap().expose(), &[2; 32]);
    let live = s.context(&id2, &aef("aef-b")).await.unwrap().unwrap();
    assert_eq!(live.aef_psk.unwrap().expose(), &[4; 32]);
    assert_eq!(
        s.invoker_count().await.unwrap(),
        2,
        "invokers are not purged"
    );
    assert_eq!(
        s.purge_expired(500).await.unwrap(),
        0,
        "nothing left to purge"
    );
    assert_eq!(s.context_count().await.unwrap(), 2);
}

/// A revocation's notice is queued in the transaction that removes the contexts, survives
/// a reopen, and a refused removal queues nothing.
async fn notices_are_queued_with_the_removal_and_survive_a_reopen(b: &Backing) {
    let s = b.open().await;
    s.onboard("d1", &rec("inv-1")).await.unwrap();
    let id = inv("inv-1");
    s.put_contexts(&id, &[ctx_expiring("inv-1", "aef-a", 1, 777)])
        .await
        .unwrap();
    let notice = |removed: &[SecurityContext]| {
        vec![RevocationNotice {
            api_invoker_id: "inv-1".into(),
            notice_id: "0".repeat(32),
            not_after_unix_ms: removed.iter().map(|c| c.expires_at_ms).max().unwrap_or(0),
            ..Default::default()
        }]
    };
    assert_eq!(
        s.remove_contexts_queueing(&id, None, notice)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(matches!(
        s.offboard_queueing(&inv("inv-2"), notice).await,
        Err(StoreError::InvokerGone)
    ));
    drop(s);
    let s = b.open().await;
    let mut q = s.revocation_outbox().await.unwrap();
    assert_eq!(q.len(), 1, "the refused offboarding queued nothing");
    assert_eq!(q[0].notice.not_after_unix_ms, 777);
    q[0].attempts = 2;
    q[0].next_attempt_at_ms = 99;
    s.revocation_reschedule(&q[0]).await.unwrap();
    assert_eq!(s.revocation_outbox().await.unwrap(), q);
    s.revocation_done(&"0".repeat(32)).await.unwrap();
    assert!(s.revocation_outbox().await.unwrap().is_empty());
}

/// What the request paths ask: the four answers of `context_lookup`, and refusals of foreign
/// invokers (the longer one kept, ended ones purged).
async fn lookups_and_foreign_refusals(b: &Backing) {
    let s = b.open().await;
    let id = inv("inv-1");
    assert!(matches!(
        s.context_lookup(&id, &aef("aef-a")).await.unwrap(),
        ContextLookup::NoInvoker
    ));
    s.onboard("d1", &rec("inv-1")).await.unwrap();
    assert!(matches!(
        s.context_lookup(&id, &aef("aef-a")).await.unwrap(),
        ContextLookup::NoContext
    ));
    s.put_contexts(&id, &[ctx("inv-1", "aef-b", 5)])
        .await
        .unwrap();
    assert!(matches!(
        s.context_lookup(&id, &aef("aef-a")).await.unwrap(),
        ContextLookup::OtherAefsOnly
    ));
    match s.context_lookup(&id, &aef("aef-b")).await.unwrap() {
        ContextLookup::Found(c) => assert_eq!(c.aef_psk.unwrap().expose(), &[5; 32]),
        other => panic!("expected the context, got {other:?}"),
    }

    let home = CcfId::new("b.test").unwrap();
    let foreign = inv("inv-9");
    s.revoke_foreign(&home, &foreign, &[aef("aef-a"), aef("aef-b")], 1_000)
        .await
        .unwrap();
    // A shorter refusal does not shorten the one held.
    s.revoke_foreign(&home, &foreign, &[aef("aef-a")], 600)
        .await
        .unwrap();
    let until = |a: &'static str, now: u64| {
        let (s, home, foreign) = (&s, &home, &foreign);
        async move {
            s.foreign_revoked_until(home, foreign, &aef(a), now)
                .await
                .unwrap()
        }
    };
    assert_eq!(until("aef-a", 0).await, Some(1_000));
    assert_eq!(until("aef-b", 999).await, Some(1_000));
    assert_eq!(until("aef-b", 1_000).await, None, "ended at its time");
    assert_eq!(until("aef-c", 0).await, None);
    s.purge_expired(1_000).await.unwrap();
    assert_eq!(until("aef-a", 0).await, None, "ended refusals are purged");
}

/// Two CCF replicas on one database: what one acknowledged, the other sees; a credential used
/// at one is refused at the other, also when both race for it; starting together, they apply
/// the schema once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_database() {
    let url = DatabaseUrl::new(capif_testkit::postgres::fresh_database());
    let (a, b) = tokio::join!(Store::connect(&url, 4), Store::connect(&url, 4));
    let (a, b) = (Arc::new(a.unwrap()), Arc::new(b.unwrap()));
    let (client, conn) = tokio_postgres::connect(url.expose(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let applied: Vec<(i32,)> = client
        .query(
            "SELECT version FROM schema_migrations WHERE component = 'ccf' ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0),))
        .collect();
    assert_eq!(
        applied,
        [(1,), (2,)],
        "each migration recorded exactly once"
    );

    // Onboarded at A, negotiated at B, read back at A.
    a.onboard("d1", &rec("inv-1")).await.unwrap();
    assert_eq!(b.invoker(&inv("inv-1")).await.unwrap(), Some(rec("inv-1")));
    b.put_contexts(&inv("inv-1"), &[ctx("inv-1", "aef-a", 7)])
        .await
        .unwrap();
    let got = a.context(&inv("inv-1"), &aef("aef-a")).await.unwrap();
    assert_eq!(got.unwrap().aef_psk.unwrap().expose(), &[7; 32]);

    // Used at A, refused at B.
    assert!(matches!(
        b.onboard("d1", &rec("inv-2")).await,
        Err(StoreError::CredentialUsed)
    ));

    // Eight onboardings with one fresh credential, racing on both replicas: exactly one wins.
    let mut race = tokio::task::JoinSet::new();
    for i in 0..8 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        race.spawn(async move { s.onboard("d2", &rec(&format!("inv-r{i}"))).await });
    }
    let results = race.join_all().await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(StoreError::CredentialUsed)))
        .count();
    assert_eq!((won, refused), (1, 7), "{results:?}");
    assert_eq!(a.invoker_count().await.unwrap(), 2);

    // Offboarded at B: gone at A.
    assert_eq!(b.offboard(&inv("inv-1")).await.unwrap().len(), 1);
    assert!(matches!(
        a.context_lookup(&inv("inv-1"), &aef("aef-a"))
            .await
            .unwrap(),
        ContextLookup::NoInvoker
    ));
}

async fn token_keys_rotate_and_survive_a_reopen(b: &Backing) {
    // The redb store keeps its keys in the state directory; PostgreSQL ignores it.
    let dir = tempfile::tempdir().unwrap();
    let now = ccf_core::clock::now_ms();
    let store = b.open().await;
    let keys = store.token_keys(dir.path(), 600, now).await.unwrap();
    let first = keys.current_kid();
    let second = store.rotate_token_key(&keys, 600, now).await.unwrap();
    assert_ne!(first, second);
    assert_eq!(keys.current_kid(), second);
    drop(store);

    let store = b.open().await;
    let again = store.token_keys(dir.path(), 600, now).await.unwrap();
    assert_eq!(again.current_kid(), second, "the rotation was stored");
    let kids = |k: &ccf_core::token::TokenKeys, at| {
        k.key_set("b.test", 60, at)
            .keys
            .into_iter()
            .map(|j| j.kid)
            .collect::<Vec<_>>()
    };
    assert_eq!(kids(&again, now), [first.clone(), second.clone()]);
    // A second rotation past the retention drops the first key from the store.
    let later = now + ccf_core::token::TokenKeys::retention_ms(600) + 1;
    let third = store.rotate_token_key(&again, 600, later).await.unwrap();
    drop(store);
    let store = b.open().await;
    let last = store.token_keys(dir.path(), 600, later).await.unwrap();
    assert_eq!(kids(&last, later), [second, third]);
}

/// Replicas on one database sign with one key set: they agree on the first key even when they
/// start together, a rotation at one is what the other publishes after reading the set again,
/// and rotations at both at once both take effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_keys_are_shared_by_replicas() {
    let url = DatabaseUrl::new(capif_testkit::postgres::fresh_database());
    let dir = tempfile::tempdir().unwrap();
    let now = ccf_core::clock::now_ms();
    let (a, b) = tokio::join!(Store::connect(&url, 2), Store::connect(&url, 2));
    let (a, b) = (a.unwrap(), b.unwrap());
    let (ka, kb) = tokio::join!(
        a.token_keys(dir.path(), 600, now),
        b.token_keys(dir.path(), 600, now)
    );
    let (ka, kb) = (ka.unwrap(), kb.unwrap());
    assert_eq!(ka.current_kid(), kb.current_kid(), "one first key");

    let rotated = a.rotate_token_key(&ka, 600, now).await.unwrap();
    assert_ne!(kb.current_kid(), rotated, "B has not read the set yet");
    b.refresh_token_keys(&kb).await.unwrap();
    assert_eq!(kb.current_kid(), rotated);
    assert_eq!(
        kb.key_set("b.test", 60, now).keys,
        ka.key_set("b.test", 60, now).keys
    );

    let (ra, rb) = tokio::join!(
        a.rotate_token_key(&ka, 600, now),
        b.rotate_token_key(&kb, 600, now)
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    a.refresh_token_keys(&ka).await.unwrap();
    let published: Vec<String> = ka
        .key_set("b.test", 60, now)
        .keys
        .into_iter()
        .map(|k| k.kid)
        .collect();
    assert_eq!(published.len(), 4, "{published:?}");
    assert!(published.contains(&ra) && published.contains(&rb));
    assert!(published[3] == ra || published[3] == rb);
}

/// Migrations applied by replicas starting at once run exactly once in total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_each_once() {
    let url = DatabaseUrl::new(capif_testkit::postgres::fresh_database());
    let steps: &[&str] = &[
        "CREATE TABLE t1 (x int)",
        "ALTER TABLE t1 ADD COLUMN y int",
        "CREATE TABLE t2 (x int)",
    ];
    let mut all = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let pool = ccf_core::pg::pool(&url, 1).unwrap();
        all.spawn(async move { ccf_core::pg::migrate(&pool, "test", steps).await });
    }
    let applied: Vec<usize> = all
        .join_all()
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(applied.iter().sum::<usize>(), 3, "{applied:?}");
    // A later start with one more step applies only that one.
    let pool = ccf_core::pg::pool(&url, 1).unwrap();
    let more: Vec<&str> = steps.iter().copied().chain(["DROP TABLE t2"]).collect();
    assert_eq!(
        ccf_core::pg::migrate(&pool, "test", &more).await.unwrap(),
        1
    );
    assert_eq!(
        ccf_core::pg::migrate(&pool, "test", &more).await.unwrap(),
        0
    );
}

/// An unreachable database fails the store's start with a sentence that names the URL without
/// its password.
#[tokio::test]
async fn an_unreachable_database_is_named_without_its_password() {
    let url = DatabaseUrl::new("postgres://capif:pw-not-shown@127.0.0.1:1/ccf");
    let e = Store::connect(&url, 1).await.err().unwrap();
    let text = format!("{e} / {e:?}");
    assert!(!text.contains("pw-not-shown"), "{text}");
    assert!(text.contains("127.0.0.1:1"), "{text}");
}

/// A CCF configured with `[store] backend = "postgres"` keeps its state in the database, not in
/// a redb file: across a restart the invoker's key still answers at the AEF and its onboarding
/// credential stays used.
#[tokio::test]
async fn a_ccf_on_postgres_keeps_its_state_there_across_a_restart() {
    use capif_testkit::ccf::{
        CREDENTIALS, TestCcf, aef_client, capif1e, config, get_info, onboard, reason,
    };
    let dir = tempfile::tempdir().unwrap();
    let url = capif_testkit::postgres::fresh_database();
    let configured = |dir: &std::path::Path| {
        let mut c = config(dir, 3600);
        c.store = ccf_core::pg::StoreConfig {
            backend: ccf_core::pg::StoreBackend::Postgres,
            url: Some(DatabaseUrl::new(url.clone())),
            pool_size: 4,
        };
        c
    };
    let t = TestCcf {
        ccf: capif_ccf::server::start(configured(dir.path()))
            .await
            .expect("CCF starts on PostgreSQL"),
        dir,
    };
    assert_eq!(
        t.ccf.state.store.backend(),
        ccf_core::pg::StoreBackend::Postgres
    );
    let one = onboard(&t, CREDENTIALS[0]).await.unwrap();
    capif1e(&t, &one)
        .await
        .obtain(&one, &["aef-weather"])
        .await
        .unwrap();
    assert!(
        !t.dir.path().join(capif_ccf::server::STORE_FILE).exists(),
        "no redb file beside a PostgreSQL store"
    );

    let TestCcf { ccf, dir } = t;
    ccf.shutdown().await;
    let t = TestCcf {
        ccf: capif_ccf::server::start(configured(dir.path()))
            .await
            .expect("CCF restarts"),
        dir,
    };
    let mut weather = aef_client(&t, "aef-weather").await;
    let got = get_info(&mut weather, &one.id, "aef-weather")
        .await
        .expect("the key negotiated before the restart answers");
    assert_eq!(got.aef_psk.len(), 32);
    let reused = onboard(&t, CREDENTIALS[0]).await.err().expect("refused");
    assert_eq!(reason(&reused), "ONBOARDING_CREDENTIAL_INVALID");
    assert_eq!(t.ccf.state.store.invoker_count().await.unwrap(), 1);
    t.ccf.shutdown().await;
}
