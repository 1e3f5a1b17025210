//! The gateway store's operations, run against BOTH backends (a test matrix, not a copy): each
//! test body is an `async fn(&Backing)` that [`on_both_backends!`] runs once on a redb directory
//! and once on a fresh database of this binary's PostgreSQL server (`capif_testkit::postgres`;
//! missing PostgreSQL fails the run). Then what only a shared database can show: two replicas'
//! stores on one database, and a listener that lost its connection.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use capif_gateway::store::{Destination, Eviction, RevocationStore, StoreError};
use capif_proto::v1::{RevocationKind, RevocationNotice};
use ccf_core::delivery::NoticeId;
use ccf_core::ids::{AefId, ApiInvokerId, CcfId};
use ccf_core::pg::DatabaseUrl;

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

    async fn open(&self, seen_cap: u64) -> RevocationStore {
        match self {
            Backing::Redb(dir) => {
                RevocationStore::open(Some(&dir.path().join("state")), seen_cap).unwrap()
            }
            Backing::Postgres(url) => RevocationStore::connect(url, 4, seen_cap).await.unwrap(),
        }
    }
}

/// For each named `async fn(&Backing)`: a module of that name with a `redb` and a `postgres`
/// test.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redb() {
                super::$name(&super::Backing::redb()).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(&super::Backing::postgres()).await
            }
        }
    )*};
}

on_both_backends!(
    rows_records_and_marks_survive_a_reopen,
    purge_and_cap_remove_only_what_is_old,
    concurrent_fetch_records_see_each_other,
);

fn id(s: &str) -> ApiInvokerId {
    ApiInvokerId::new(s).unwrap()
}
fn ccf(s: &str) -> CcfId {
    CcfId::new(s).unwrap()
}
fn notice(home: &str, inv: &str, nid: &NoticeId) -> RevocationNotice {
    RevocationNotice {
        home_ccf_id: home.into(),
        api_invoker_id: inv.into(),
        kind: RevocationKind::Offboarded as i32,
        notice_id: nid.to_string(),
        ..Default::default()
    }
}

/// Fetch records, queued rows and seen marks survive closing and reopening; rows go only to
/// partners with unexpired records; a second publication changes nothing but still moves the
/// epoch; removing a row twice is no error.
async fn rows_records_and_marks_survive_a_reopen(b: &Backing) {
    let s = b.open(100).await;
    let (inv, a, c) = (id("inv-1"), ccf("operator-a.test"), ccf("operator-c.test"));
    assert_eq!(s.extend_fetch(&inv, &a, 5_000).await.unwrap(), None);
    s.settle_fetch(&inv, &a, 5_000, None, Some(2_000))
        .await
        .unwrap();
    s.extend_fetch(&inv, &c, 500).await.unwrap();
    s.extend_fetch(&id("inv-10"), &c, 9_000).await.unwrap();
    assert_eq!(
        s.fetchers_of(&inv, 1_000).await.unwrap(),
        vec![(a.clone(), 2_000)]
    );
    let nid = NoticeId::random();
    let n = notice("operator-b.test", "inv-1", &nid);
    let epoch = s.queue_epoch().await.unwrap();
    let queued = s
        .queue_for_fetchers(&n, &nid, &inv, 1_000, 9_000, |_| true)
        .await
        .unwrap();
    assert_eq!(queued, Some(vec![a.clone()]), "c's record expired");
    let after_first = s.queue_epoch().await.unwrap();
    assert_ne!(
        after_first, epoch,
        "a fetch in flight must see the queueing"
    );
    assert_eq!(
        s.queue_for_fetchers(&n, &nid, &inv, 1_000, 9_000, |_| true)
            .await
            .unwrap(),
        None
    );
    // Even a repeat moves it: the fetch cannot know what the transaction will find.
    assert_ne!(s.queue_epoch().await.unwrap(), after_first);
    assert!(
        s.fetchers_of(&inv, 0).await.unwrap().is_empty(),
        "forgotten"
    );
    assert_eq!(s.fetchers_of(&id("inv-10"), 0).await.unwrap().len(), 1);
    let pn = NoticeId::random();
    let from_a = notice("operator-a.test", "inv-7", &pn);
    assert!(
        s.accept_from_partner(&from_a, &pn, 1_000, 8_000)
            .await
            .unwrap()
    );
    assert!(
        !s.accept_from_partner(&from_a, &pn, 1_000, 8_000)
            .await
            .unwrap()
    );
    s.close();
    assert!(matches!(
        s.depth(&Destination::OwnCcf).await,
        Err(StoreError::Closed)
    ));
    drop(s);

    let s = b.open(100).await;
    let rows = s.rows(&Destination::Partner(a.clone())).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].notice.clone(), rows[0].give_up_at_ms), (n, 2_000));
    let mut r = rows[0].clone();
    r.attempts = 3;
    r.next_attempt_at_ms = 4_242;
    s.reschedule(&r).await.unwrap();
    assert_eq!(
        s.rows(&Destination::Partner(a.clone())).await.unwrap(),
        vec![r.clone()]
    );
    let own = s.rows(&Destination::OwnCcf).await.unwrap();
    assert_eq!((own.len(), own[0].notice.clone()), (1, from_a));
    assert!(s.seen(&a, &pn).await.unwrap());
    assert_eq!(s.total_depth().await.unwrap(), 2);
    s.remove(&r).await.unwrap();
    s.remove(&r).await.unwrap();
    // A rescheduled row that was removed meanwhile stays removed.
    s.reschedule(&r).await.unwrap();
    assert_eq!(s.depth(&Destination::Partner(a)).await.unwrap(), 0);
    assert_eq!(s.depth(&Destination::OwnCcf).await.unwrap(), 1);
    s.close();
}

/// Expired records and marks are purged; live ones stay; marks beyond the cap evict the oldest
/// first.
async fn purge_and_cap_remove_only_what_is_old(b: &Backing) {
    let s = b.open(3).await;
    let bb = ccf("operator-b.test");
    s.extend_fetch(&id("inv-1"), &bb, 100).await.unwrap();
    s.extend_fetch(&id("inv-2"), &bb, 1_000).await.unwrap();
    let ids: Vec<NoticeId> = (0..4).map(|_| NoticeId::random()).collect();
    for (i, nid) in ids.iter().enumerate() {
        let n = notice("operator-b.test", "inv-9", nid);
        s.accept_from_partner(&n, nid, 0, 200 * (i as u64 + 1))
            .await
            .unwrap();
    }
    assert!(
        !s.seen(&bb, &ids[0]).await.unwrap(),
        "oldest evicted beyond the cap"
    );
    assert!(s.seen(&bb, &ids[1]).await.unwrap());
    assert_eq!(s.purge(400).await.unwrap(), (1, 1));
    assert!(!s.seen(&bb, &ids[1]).await.unwrap());
    assert!(s.seen(&bb, &ids[2]).await.unwrap() && s.seen(&bb, &ids[3]).await.unwrap());
    assert!(s.fetchers_of(&id("inv-1"), 0).await.unwrap().is_empty());
    assert_eq!(s.fetchers_of(&id("inv-2"), 0).await.unwrap().len(), 1);
    s.close();
}

/// Concurrent grouped extensions of one record each see the record as it was before their own
/// change (exactly one saw none), and the record ends at the largest; a queued settle applies
/// after the extension before it.
async fn concurrent_fetch_records_see_each_other(b: &Backing) {
    let s = std::sync::Arc::new(b.open(100).await);
    let (inv, p) = (id("inv-c"), ccf("operator-a.test"));
    let calls: Vec<_> = (0..16u64)
        .map(|i| {
            let (s, inv, p) = (s.clone(), inv.clone(), p.clone());
            tokio::spawn(async move { s.extend_fetch_grouped(&inv, &p, 1_000 + i).await })
        })
        .collect();
    let mut priors = Vec::new();
    for c in calls {
        priors.push(c.await.unwrap().unwrap());
    }
    assert_eq!(
        priors.iter().filter(|p| p.is_none()).count(),
        1,
        "{priors:?}"
    );
    assert_eq!(
        s.fetchers_of(&inv, 0).await.unwrap(),
        vec![(p.clone(), 1_015)]
    );
    let prior = s.extend_fetch_grouped(&inv, &p, 9_000).await.unwrap();
    s.settle_fetch_queued(&inv, &p, 9_000, prior, Some(4_000))
        .unwrap();
    let settled = async {
        while s.fetchers_of(&inv, 0).await.unwrap() != vec![(p.clone(), 4_000)] {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), settled)
        .await
        .expect("the queued settle is applied");
    s.close();
}

fn pg_url() -> DatabaseUrl {
    DatabaseUrl::new(capif_testkit::postgres::fresh_database())
}

/// Two replicas on one database: a fetch record written through one is found by a revocation
/// queued through the other, whose queueing moves the epoch the first reads; a notice accepted
/// at one is a duplicate at the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_records_epoch_and_seen_marks() {
    let url = pg_url();
    let (r1, r2) = (
        RevocationStore::connect(&url, 2, 100).await.unwrap(),
        RevocationStore::connect(&url, 2, 100).await.unwrap(),
    );
    let (inv, a) = (id("inv-1"), ccf("operator-a.test"));
    let epoch = r1.queue_epoch().await.unwrap();
    r1.extend_fetch_grouped(&inv, &a, 9_000).await.unwrap();
    let nid = NoticeId::random();
    let n = notice("operator-b.test", "inv-1", &nid);
    let queued = r2
        .queue_for_fetchers(&n, &nid, &inv, 1_000, 9_000, |_| true)
        .await
        .unwrap();
    assert_eq!(queued, Some(vec![a.clone()]));
    assert_ne!(
        r1.queue_epoch().await.unwrap(),
        epoch,
        "the epoch is global"
    );
    assert_eq!(r1.depth(&Destination::Partner(a)).await.unwrap(), 1);
    let pn = NoticeId::random();
    let from_a = notice("operator-a.test", "inv-7", &pn);
    assert!(
        r1.accept_from_partner(&from_a, &pn, 1_000, 8_000)
            .await
            .unwrap()
    );
    assert!(
        !r2.accept_from_partner(&from_a, &pn, 1_000, 8_000)
            .await
            .unwrap()
    );
    r1.close();
    r2.close();
}

/// What `r`'s listener hands over next, within `within`.
async fn next_eviction(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Eviction>,
    within: Duration,
) -> Eviction {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("an eviction within the deadline")
        .expect("the listener runs")
}

/// A notice accepted at replica 1 reaches replica 2's listener (not replica 1's own); after
/// replica 2's listener connection is killed, a notice accepted while it reconnects still
/// reaches it (replayed, or heard once listening again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictions_reach_the_other_replica_also_across_a_lost_connection() {
    let url = pg_url();
    let r1 = RevocationStore::connect(&url, 2, 100).await.unwrap();
    let r2 = RevocationStore::connect(&url, 2, 100).await.unwrap();
    let mut own = r1.evictions().unwrap();
    let mut heard = r2.evictions().unwrap();
    assert!(r2.evictions().is_none(), "taken once");
    let pn = NoticeId::random();
    let mut n = notice("operator-a.test", "inv-7", &pn);
    n.kind = RevocationKind::KeyReplacedByNewer as i32;
    n.key_id = "0123456789abcdef".into();
    n.aef_ids = vec!["aef-1".into()];
    let accepted = std::time::Instant::now();
    assert!(
        r1.accept_from_partner(&n, &pn, 1_000, u64::MAX / 4)
            .await
            .unwrap()
    );
    let e = next_eviction(&mut heard, Duration::from_secs(1)).await;
    eprintln!(
        "eviction heard at the other replica {:?} after the accept began",
        accepted.elapsed()
    );
    assert_eq!(
        e,
        Eviction {
            home: ccf("operator-a.test"),
            invoker: id("inv-7"),
            aefs: vec![AefId::new("aef-1").unwrap()],
            key_id: Some("0123456789abcdef".into()),
        }
    );

    // Kill replica 2's listener connection (replica 1's too: both listen on this database).
    let killer = tokio_postgres_connect(&url).await;
    let killed = killer
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'capif-gateway-listener' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(killed.len(), 2, "both replicas' listeners");
    let killed_at = std::time::Instant::now();
    let pn2 = NoticeId::random();
    let n2 = notice("operator-a.test", "inv-8", &pn2);
    assert!(
        r1.accept_from_partner(&n2, &pn2, 1_000, u64::MAX / 4)
            .await
            .unwrap()
    );
    // Reconnecting takes its backoff (at most a few hundred ms the first time).
    loop {
        let e = next_eviction(&mut heard, Duration::from_secs(10)).await;
        if e.invoker == id("inv-8") {
            assert_eq!((e.aefs, e.key_id), (vec![], None));
            eprintln!(
                "eviction after a killed connection heard {:?} after the kill",
                killed_at.elapsed()
            );
            break;
        }
        // The replay starts a little before the last checkpoint: inv-7 may come again.
        assert_eq!(e.invoker, id("inv-7"));
    }
    // Replica 1 hears nothing live of its own; a replay after its reconnect may repeat its own
    // accepts (harmless: a second eviction), never another's that did not happen.
    while let Ok(e) = own.try_recv() {
        assert!(["inv-7", "inv-8"].contains(&e.invoker.as_str()), "{e:?}");
    }
    // An explicit broadcast (EvictPartnerInvoker) reaches the other replica too.
    let b = Eviction {
        home: ccf("operator-a.test"),
        invoker: id("inv-9"),
        aefs: vec![],
        key_id: None,
    };
    r1.broadcast_eviction(&b).await.unwrap();
    loop {
        let e = next_eviction(&mut heard, Duration::from_secs(5)).await;
        if e == b {
            break;
        }
        // Replays of what was heard already may come first.
        assert!(["inv-7", "inv-8"].contains(&e.invoker.as_str()), "{e:?}");
    }
    r1.close();
    r2.close();
}

async fn tokio_postgres_connect(url: &DatabaseUrl) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url.expose(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}
