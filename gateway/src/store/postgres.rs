//! The gateway store's PostgreSQL backend: the same operations as the redb file, on tables that
//! every gateway replica of one domain shares (`gateway_fetch_records`, `gateway_outbox`,
//! `gateway_seen_notices`, `gateway_queue_epoch`; the prefix and the migration component
//! `"gateway"` let a gateway share a database with its CCF).
//!
//! Each acknowledged change is one transaction, committed (durably: the server's default
//! `synchronous_commit`) before the call returns. Across replicas: a notice is acted on once
//! because the seen mark is inserted with `ON CONFLICT DO NOTHING` (a concurrent repeat waits
//! for the first transaction and then finds the mark: no read-then-write race); the queue epoch
//! is one row (see [`PgStore::queue_epoch`]); several replicas' outbox workers may send the same
//! row, which is at-least-once delivery (the receiver dedups by `notice_id`), and removing a row
//! already removed is a no-op; an idle worker looks at the shared outbox every [`OUTBOX_POLL`],
//! so rows a replica queued and could not deliver (it stopped) are delivered by the others.
//!
//! Eviction at every replica: accepting a partner's notice calls
//! `pg_notify('capif_gateway_revocations', ids)` in the accepting transaction (so it is sent on
//! commit, and only then), and each replica's listener ([`listen`]), on a connection of its own,
//! hands what it hears to the gateway's cache. A listener whose connection dropped reconnects
//! with a backoff and then replays, from `gateway_seen_notices`, the partner notices accepted
//! since its last checkpoint (taken every [`CHECKPOINT_EVERY`] on the database's clock) minus
//! [`REPLAY_SLACK_MS`]: nothing is missed unless an accepting transaction took longer than that
//! slack between its insert and its commit. `EvictPartnerInvoker` evictions are notified too,
//! but are not stored: a replica reconnecting at that moment misses them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capif_proto::v1::RevocationNotice;
use ccf_core::delivery::NoticeId;
use ccf_core::ids::{AefId, ApiInvokerId, CcfId};
use ccf_core::pg::{DatabaseUrl, PgError, Pool};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_postgres::AsyncMessage;

use super::{Destination, Eviction, OutboxRow, StoreError};

/// The component name of the gateway's schema in `schema_migrations`.
const COMPONENT: &str = "gateway";

/// The channel the replicas of one database tell each other to evict on.
pub const CHANNEL: &str = "capif_gateway_revocations";

/// The application name of the listeners' connections (to find them in `pg_stat_activity`).
pub const LISTENER_APPLICATION: &str = "capif-gateway-listener";

/// How often an idle outbox worker reads the shared outbox (`RevocationStore::shared_poll`).
pub(super) const OUTBOX_POLL: Duration = Duration::from_secs(2);

/// How often a listener notes how far it has heard (the database's clock).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// How far before its last checkpoint a reconnected listener replays: covers the time between
/// an accepting transaction's insert (its `accepted_at_ms`) and its commit.
const REPLAY_SLACK_MS: i64 = 10_000;

/// A listener's backoff between connection attempts, doubling from the first to the last.
const RECONNECT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(2));

/// pg_notify refuses payloads of 8000 bytes or more: beyond this the AEF list is left out,
/// which evicts the invoker at every AEF (more than needed, never less).
const MAX_PAYLOAD: usize = 7_000;

/// The database's clock in Unix ms.
const DB_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// The gateway's schema, version by version (never edit one that shipped: add the next).
const MIGRATIONS: &[&str] = &[
    // 1: the state the redb file holds, and the shared queue epoch.
    "CREATE TABLE gateway_fetch_records (
         api_invoker_id text NOT NULL,
         partner_ccf_id text NOT NULL,
         expires_at_ms bigint NOT NULL,
         PRIMARY KEY (api_invoker_id, partner_ccf_id));
     CREATE INDEX gateway_fetch_records_expiry ON gateway_fetch_records (expires_at_ms);
     CREATE TABLE gateway_outbox (
         destination text NOT NULL,
         home_ccf_id text NOT NULL,
         notice_id text NOT NULL,
         notice bytea NOT NULL,
         give_up_at_ms bigint NOT NULL,
         attempts integer NOT NULL,
         next_attempt_at_ms bigint NOT NULL,
         PRIMARY KEY (destination, home_ccf_id, notice_id));
     CREATE TABLE gateway_seen_notices (
         sender text NOT NULL,
         notice_id text NOT NULL,
         until_ms bigint NOT NULL,
         accepted_at_ms bigint NOT NULL,
         api_invoker_id text,
         aef_ids text[],
         key_id text,
         PRIMARY KEY (sender, notice_id));
     CREATE INDEX gateway_seen_notices_until ON gateway_seen_notices (until_ms, sender, notice_id);
     CREATE INDEX gateway_seen_notices_accepted ON gateway_seen_notices (accepted_at_ms)
         WHERE api_invoker_id IS NOT NULL;
     CREATE TABLE gateway_queue_epoch (
         id integer PRIMARY KEY CHECK (id = 1),
         epoch bigint NOT NULL);
     INSERT INTO gateway_queue_epoch (id, epoch) VALUES (1, 0);",
];

/// Unix ms as PostgreSQL's bigint (saturating: no clock reaches 2^63 ms).
fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn ums(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The own CCF's rows have destination "" (as in the redb keys).
fn dest(d: &Destination) -> &str {
    d.prefix()
}

/// The notification text of `e` from replica `origin`: tab-separated ids, the key id last.
fn payload(origin: &str, e: &Eviction) -> String {
    let aefs: Vec<&str> = e.aefs.iter().map(AefId::as_str).collect();
    let text = |aefs: &str| {
        format!(
            "{origin}\t{}\t{}\t{aefs}\t{}",
            e.home,
            e.invoker,
            e.key_id.as_deref().unwrap_or_default()
        )
    };
    let full = text(&aefs.join(","));
    if full.len() > MAX_PAYLOAD {
        text("")
    } else {
        full
    }
}

/// Reads a notification; `None` for anything malformed (logged by the caller).
fn parse(payload: &str) -> Option<(&str, Eviction)> {
    let mut f = payload.splitn(5, '\t');
    let origin = f.next()?;
    let home = CcfId::new(f.next()?).ok()?;
    let invoker = ApiInvokerId::new(f.next()?).ok()?;
    let aefs = f.next()?;
    let aefs = if aefs.is_empty() {
        Vec::new()
    } else {
        aefs.split(',')
            .map(AefId::new)
            .collect::<Result<_, _>>()
            .ok()?
    };
    let key_id = Some(f.next()?.to_string()).filter(|k| !k.is_empty());
    Some((
        origin,
        Eviction {
            home,
            invoker,
            aefs,
            key_id,
        },
    ))
}

/// The last outbox depths read for `/metrics`, and when they were last asked for.
#[derive(Default)]
struct DepthCache {
    by_destination: HashMap<String, u64>,
    asked: Option<Instant>,
}

fn lock(m: &Mutex<DepthCache>) -> std::sync::MutexGuard<'_, DepthCache> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The PostgreSQL store: a pool of connections to one database, and this replica's listener.
pub(super) struct PgStore {
    pool: Pool,
    seen_cap: i64,
    /// True once closed; the listener ends when it changes (or when this is dropped).
    closed: watch::Sender<bool>,
    /// This replica's name in its notifications: its listener skips its own.
    origin: String,
    /// The other replicas' evictions, until [`Self::evictions`] takes them.
    evictions: parking_lot::Mutex<Option<mpsc::UnboundedReceiver<Eviction>>>,
    depths: Arc<Mutex<DepthCache>>,
}

impl PgStore {
    /// Connects (at most `pool_size` connections), brings the schema up to date and starts the
    /// listener.
    pub(super) async fn connect(
        url: &DatabaseUrl,
        pool_size: usize,
        seen_cap: u64,
    ) -> Result<Self, StoreError> {
        let pool = ccf_core::pg::pool(url, pool_size)?;
        ccf_core::pg::migrate(&pool, COMPONENT, MIGRATIONS)
            .await
            .map_err(|e| match e {
                PgError::Db(m) => PgError::Db(format!("{m} (store.url {})", url.redacted())),
                e => e,
            })?;
        // Accepted from here on is what the listener must hand over, even before its first
        // LISTEN: it starts by replaying from this point.
        let since: i64 = pool
            .get()
            .await
            .map_err(PgError::from)?
            .query_one(&format!("SELECT {DB_MS}"), &[])
            .await?
            .try_get(0)?;
        let origin = format!("{:016x}", rand::random::<u64>());
        let (closed, closing) = watch::channel(false);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(listen(
            url.clone(),
            pool.clone(),
            origin.clone(),
            since,
            tx,
            closing,
        ));
        Ok(Self {
            pool,
            seen_cap: ms(seen_cap.max(1)),
            closed,
            origin,
            evictions: parking_lot::Mutex::new(Some(rx)),
            depths: Arc::default(),
        })
    }

    pub(super) fn evictions(&self) -> Option<mpsc::UnboundedReceiver<Eviction>> {
        self.evictions.lock().take()
    }

    pub(super) fn close(&self) {
        self.closed.send_replace(true);
        self.pool.close();
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        if *self.closed.borrow() {
            return Err(StoreError::Closed);
        }
        Ok(self.pool.get().await.map_err(PgError::from)?)
    }

    pub(super) async fn broadcast_eviction(&self, e: &Eviction) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "SELECT pg_notify($1, $2)",
                &[&CHANNEL, &payload(&self.origin, e)],
            )
            .await?;
        Ok(())
    }

    /// The record's prior value exactly, also when replicas extend it concurrently: the insert
    /// of a new record waits for a concurrent one and then conflicts, and an existing record is
    /// locked before it is read.
    pub(super) async fn extend_fetch(
        &self,
        invoker: &ApiInvokerId,
        partner: &CcfId,
        provisional: u64,
    ) -> Result<Option<u64>, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let key: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&invoker.as_str(), &partner.as_str(), &ms(provisional)];
        // Prepared once per connection: this runs on every miss a partner causes, and an
        // unprepared statement costs a parse and a round trip more.
        let insert = tx
            .prepare_cached(
                "INSERT INTO gateway_fetch_records (api_invoker_id, partner_ccf_id, \
                 expires_at_ms) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )
            .await?;
        let prior = loop {
            let inserted = tx.execute(&insert, &key).await?;
            if inserted == 1 {
                break None;
            }
            let current = tx
                .query_opt(
                    "SELECT expires_at_ms FROM gateway_fetch_records \
                     WHERE api_invoker_id = $1 AND partner_ccf_id = $2 FOR UPDATE",
                    &key[..2],
                )
                .await?;
            // Gone meanwhile (purged): insert again.
            if let Some(row) = current {
                let current: i64 = row.try_get(0)?;
                tx.execute(
                    "UPDATE gateway_fetch_records SET expires_at_ms = greatest(expires_at_ms, $3) \
                     WHERE api_invoker_id = $1 AND partner_ccf_id = $2",
                    &key,
                )
                .await?;
                break Some(ums(current));
            }
        };
        tx.commit().await?;
        Ok(prior)
    }

    /// Why reading this before writing a fetch record and again after its commit tells the
    /// fetch whether some replica's revocation may have missed the record.
    ///
    /// [`Self::queue_for_fetchers`] increments the row FIRST in its transaction, before it
    /// reads the fetch records (with a new snapshot per statement, READ COMMITTED). This read
    /// takes a share lock on the row (`FOR SHARE`), so it waits for any transaction that has
    /// incremented it and not yet committed, and then returns the committed value. Take a
    /// revocation R that did not see the record F: R's read of the records came before F's
    /// commit, so R's increment came before F's commit too, hence before the fetch's second read;
    /// that read therefore waits for R and sees R's increment: the epochs differ and the CCF is
    /// asked again (which refuses, R being published). An R whose increment comes after the
    /// second read reads the records after F's commit, and finds F. The first read needs no
    /// lock: an R still uncommitted then shows up as a change at the second read.
    pub(super) async fn queue_epoch(&self) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let stmt = c
            .prepare_cached("SELECT epoch FROM gateway_queue_epoch WHERE id = 1 FOR SHARE")
            .await?;
        let epoch: i64 = c.query_one(&stmt, &[]).await?.try_get(0)?;
        Ok(ums(epoch))
    }

    /// The epoch as committed now, without waiting for a revocation in progress: the read a
    /// fetch makes before its record (see [`Self::queue_epoch`]).
    pub(super) async fn queue_epoch_unlocked(&self) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let stmt = c
            .prepare_cached("SELECT epoch FROM gateway_queue_epoch WHERE id = 1")
            .await?;
        let epoch: i64 = c.query_one(&stmt, &[]).await?.try_get(0)?;
        Ok(ums(epoch))
    }

    /// One statement: the `WHERE expires_at_ms = expected` is re-checked against a concurrent
    /// change, so a record another fetch changed meanwhile is left to that fetch.
    async fn settle_on(
        pool: &Pool,
        invoker: &str,
        partner: &str,
        provisional: u64,
        prior: Option<u64>,
        handed: Option<u64>,
    ) -> Result<(), StoreError> {
        let mut c = pool.get().await.map_err(PgError::from)?;
        let expected = ms(prior.unwrap_or(0).max(provisional));
        // Not durable on its own, like the redb committer's settles: a settle lost in a crash
        // leaves the record at its provisional, later expiry (a revocation then reaches that
        // partner once more than needed), never lower. It saves a WAL flush on every miss.
        let tx = c.transaction().await?;
        tx.batch_execute("SET LOCAL synchronous_commit = off")
            .await?;
        match prior.max(handed) {
            Some(e) => {
                let stmt = tx
                    .prepare_cached(
                        "UPDATE gateway_fetch_records SET expires_at_ms = $4 \
                         WHERE api_invoker_id = $1 AND partner_ccf_id = $2 \
                         AND expires_at_ms = $3",
                    )
                    .await?;
                tx.execute(&stmt, &[&invoker, &partner, &expected, &ms(e)])
                    .await?
            }
            None => {
                let stmt = tx
                    .prepare_cached(
                        "DELETE FROM gateway_fetch_records \
                         WHERE api_invoker_id = $1 AND partner_ccf_id = $2 \
                         AND expires_at_ms = $3",
                    )
                    .await?;
                tx.execute(&stmt, &[&invoker, &partner, &expected]).await?
            }
        };
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn settle_fetch(
        &self,
        invoker: &ApiInvokerId,
        partner: &CcfId,
        provisional: u64,
        prior: Option<u64>,
        handed: Option<u64>,
    ) -> Result<(), StoreError> {
        if *self.closed.borrow() {
            return Err(StoreError::Closed);
        }
        Self::settle_on(
            &self.pool,
            invoker.as_str(),
            partner.as_str(),
            provisional,
            prior,
            handed,
        )
        .await
    }

    /// The extension it follows is committed already, so a task of its own keeps the order.
    pub(super) fn settle_fetch_spawned(
        &self,
        invoker: &ApiInvokerId,
        partner: &CcfId,
        provisional: u64,
        prior: Option<u64>,
        handed: Option<u64>,
    ) -> Result<(), StoreError> {
        if *self.closed.borrow() {
            return Err(StoreError::Closed);
        }
        let (pool, invoker, partner) = (self.pool.clone(), invoker.clone(), partner.clone());
        tokio::spawn(async move {
            if let Err(e) = Self::settle_on(
                &pool,
                invoker.as_str(),
                partner.as_str(),
                provisional,
                prior,
                handed,
            )
            .await
            {
                tracing::warn!(error = %e, "could not settle a fetch record");
            }
        });
        Ok(())
    }

    pub(super) async fn fetchers_of(
        &self,
        invoker: &ApiInvokerId,
        now: u64,
    ) -> Result<Vec<(CcfId, u64)>, StoreError> {
        let c = self.client().await?;
        fetchers_in(&c, invoker, now).await
    }

    pub(super) async fn queue_for_fetchers(
        &self,
        notice: &RevocationNotice,
        id: &NoticeId,
        invoker: &ApiInvokerId,
        now: u64,
        seen_until: u64,
        keep: impl Fn(&CcfId) -> bool + Send,
    ) -> Result<Option<Vec<CcfId>>, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // First, before the fetch records are read: see `queue_epoch`. A repeat moves it too
        // (committed below), like the redb counter: a fetch cannot know what this will find.
        tx.execute(
            "UPDATE gateway_queue_epoch SET epoch = epoch + 1 WHERE id = 1",
            &[],
        )
        .await?;
        let marked = tx
            .execute(
                &format!(
                    "INSERT INTO gateway_seen_notices (sender, notice_id, until_ms, \
                     accepted_at_ms) VALUES ($1, $2, $3, {DB_MS}) ON CONFLICT DO NOTHING"
                ),
                &[&notice.home_ccf_id, &id.as_str(), &ms(seen_until)],
            )
            .await?;
        if marked == 0 {
            tx.commit().await?;
            return Ok(None);
        }
        let fetchers = fetchers_in(&tx, invoker, now).await?;
        let mut queued = Vec::new();
        let encoded = notice.encode_to_vec();
        for (partner, expires) in fetchers.into_iter().filter(|(p, _)| keep(p)) {
            tx.execute(
                "INSERT INTO gateway_outbox (destination, home_ccf_id, notice_id, notice, \
                 give_up_at_ms, attempts, next_attempt_at_ms) VALUES ($1, $2, $3, $4, $5, 0, $6) \
                 ON CONFLICT DO NOTHING",
                &[
                    &partner.as_str(),
                    &notice.home_ccf_id,
                    &notice.notice_id,
                    &encoded,
                    &ms(expires),
                    &ms(now),
                ],
            )
            .await?;
            queued.push(partner);
        }
        if notice.kind() == capif_proto::v1::RevocationKind::Offboarded {
            tx.execute(
                "DELETE FROM gateway_fetch_records WHERE api_invoker_id = $1",
                &[&invoker.as_str()],
            )
            .await?;
        }
        self.cap_seen(&tx).await?;
        tx.commit().await?;
        Ok(Some(queued))
    }

    /// Evicts the oldest seen marks beyond the cap (as the redb backend does).
    async fn cap_seen(&self, tx: &tokio_postgres::Transaction<'_>) -> Result<(), StoreError> {
        tx.execute(
            "DELETE FROM gateway_seen_notices WHERE (sender, notice_id) IN ( \
                 SELECT sender, notice_id FROM gateway_seen_notices \
                 ORDER BY until_ms, sender, notice_id \
                 LIMIT greatest((SELECT count(*) FROM gateway_seen_notices) - $1, 0))",
            &[&self.seen_cap],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn seen(&self, sender: &CcfId, id: &NoticeId) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM gateway_seen_notices \
                 WHERE sender = $1 AND notice_id = $2)",
                &[&sender.as_str(), &id.as_str()],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    pub(super) async fn accept_from_partner(
        &self,
        notice: &RevocationNotice,
        id: &NoticeId,
        now: u64,
        until: u64,
    ) -> Result<bool, StoreError> {
        let eviction = Eviction::of_notice(notice);
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let aefs: Option<Vec<&str>> = eviction
            .as_ref()
            .map(|e| e.aefs.iter().map(AefId::as_str).collect());
        // The columns after `accepted_at_ms` are what a reconnected listener replays.
        let marked = tx
            .execute(
                &format!(
                    "INSERT INTO gateway_seen_notices (sender, notice_id, until_ms, \
                     accepted_at_ms, api_invoker_id, aef_ids, key_id) \
                     VALUES ($1, $2, $3, {DB_MS}, $4, $5, $6) ON CONFLICT DO NOTHING"
                ),
                &[
                    &notice.home_ccf_id,
                    &id.as_str(),
                    &ms(until),
                    &eviction.as_ref().map(|e| e.invoker.as_str()),
                    &aefs,
                    &eviction.as_ref().and_then(|e| e.key_id.as_deref()),
                ],
            )
            .await?;
        if marked == 0 {
            return Ok(false);
        }
        self.cap_seen(&tx).await?;
        tx.execute(
            "INSERT INTO gateway_outbox (destination, home_ccf_id, notice_id, notice, \
             give_up_at_ms, attempts, next_attempt_at_ms) VALUES ('', $1, $2, $3, $4, 0, $5) \
             ON CONFLICT (destination, home_ccf_id, notice_id) DO UPDATE SET \
             notice = EXCLUDED.notice, give_up_at_ms = EXCLUDED.give_up_at_ms, \
             attempts = 0, next_attempt_at_ms = EXCLUDED.next_attempt_at_ms",
            &[
                &notice.home_ccf_id,
                &notice.notice_id,
                &notice.encode_to_vec(),
                &ms(until),
                &ms(now),
            ],
        )
        .await?;
        if let Some(e) = &eviction {
            // Sent on commit, and only if it commits.
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&CHANNEL, &payload(&self.origin, e)],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn rows(&self, d: &Destination) -> Result<Vec<OutboxRow>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT home_ccf_id, notice_id, notice, give_up_at_ms, attempts, \
                 next_attempt_at_ms FROM gateway_outbox WHERE destination = $1 \
                 ORDER BY home_ccf_id, notice_id",
                &[&dest(d)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let bytes: Vec<u8> = r.try_get(2)?;
                let attempts: i32 = r.try_get(4)?;
                Ok(OutboxRow {
                    destination: d.clone(),
                    notice: RevocationNotice::decode(bytes.as_slice()).map_err(|_| {
                        StoreError::Corrupt(format!(
                            "{}/{}/{}",
                            dest(d),
                            r.get::<_, String>(0),
                            r.get::<_, String>(1)
                        ))
                    })?,
                    give_up_at_ms: ums(r.try_get(3)?),
                    attempts: u32::try_from(attempts).unwrap_or(0),
                    next_attempt_at_ms: ums(r.try_get(5)?),
                })
            })
            .collect()
    }

    /// Rows for `d`, or for every destination.
    pub(super) async fn depth(&self, d: Option<&Destination>) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let row = match d {
            Some(d) => {
                c.query_one(
                    "SELECT count(*) FROM gateway_outbox WHERE destination = $1",
                    &[&dest(d)],
                )
                .await?
            }
            None => {
                c.query_one("SELECT count(*) FROM gateway_outbox", &[])
                    .await?
            }
        };
        Ok(ums(row.try_get(0)?))
    }

    /// The cached depth; asks for fresh ones in the background when they are a second old.
    pub(super) fn depth_cached(&self, d: &Destination) -> u64 {
        let mut cache = lock(&self.depths);
        let stale = cache
            .asked
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if stale && let Ok(rt) = tokio::runtime::Handle::try_current() {
            cache.asked = Some(Instant::now());
            let (pool, cell) = (self.pool.clone(), self.depths.clone());
            rt.spawn(async move {
                let fresh = async {
                    let c = pool.get().await.map_err(PgError::from)?;
                    let rows = c
                        .query(
                            "SELECT destination, count(*) FROM gateway_outbox \
                             GROUP BY destination",
                            &[],
                        )
                        .await?;
                    rows.iter()
                        .map(|r| Ok((r.try_get::<_, String>(0)?, ums(r.try_get(1)?))))
                        .collect::<Result<HashMap<_, _>, StoreError>>()
                };
                if let Ok(fresh) = fresh.await {
                    lock(&cell).by_destination = fresh;
                }
            });
        }
        cache.by_destination.get(dest(d)).copied().unwrap_or(0)
    }

    pub(super) async fn remove(&self, row: &OutboxRow) -> Result<(), StoreError> {
        // Zero rows deleted is fine: another replica's worker delivered it too.
        self.client()
            .await?
            .execute(
                "DELETE FROM gateway_outbox \
                 WHERE destination = $1 AND home_ccf_id = $2 AND notice_id = $3",
                &[
                    &dest(&row.destination),
                    &row.notice.home_ccf_id,
                    &row.notice.notice_id,
                ],
            )
            .await?;
        Ok(())
    }

    pub(super) async fn reschedule(&self, row: &OutboxRow) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "UPDATE gateway_outbox SET attempts = $4, next_attempt_at_ms = $5 \
                 WHERE destination = $1 AND home_ccf_id = $2 AND notice_id = $3",
                &[
                    &dest(&row.destination),
                    &row.notice.home_ccf_id,
                    &row.notice.notice_id,
                    &i32::try_from(row.attempts).unwrap_or(i32::MAX),
                    &ms(row.next_attempt_at_ms),
                ],
            )
            .await?;
        Ok(())
    }

    pub(super) async fn purge(&self, now: u64) -> Result<(u64, u64), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let fetches = tx
            .execute(
                "DELETE FROM gateway_fetch_records WHERE expires_at_ms <= $1",
                &[&ms(now)],
            )
            .await?;
        let seen = tx
            .execute(
                "DELETE FROM gateway_seen_notices WHERE until_ms <= $1",
                &[&ms(now)],
            )
            .await?;
        tx.commit().await?;
        Ok((fetches, seen))
    }
}

async fn fetchers_in(
    c: &impl deadpool_postgres::GenericClient,
    invoker: &ApiInvokerId,
    now: u64,
) -> Result<Vec<(CcfId, u64)>, StoreError> {
    let rows = c
        .query(
            "SELECT partner_ccf_id, expires_at_ms FROM gateway_fetch_records \
             WHERE api_invoker_id = $1 AND expires_at_ms > $2 ORDER BY partner_ccf_id",
            &[&invoker.as_str(), &ms(now)],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        if let Ok(p) = CcfId::new(r.try_get::<_, String>(0)?) {
            out.push((p, ums(r.try_get(1)?)));
        }
    }
    Ok(out)
}

/// This replica's listener: hands the other replicas' evictions to `out` until the store is
/// closed or dropped (or nobody reads `out`). Reconnects with a backoff, and after each
/// connection replays what was accepted since its last checkpoint (see the module comment).
async fn listen(
    url: DatabaseUrl,
    pool: Pool,
    origin: String,
    mut since: i64,
    out: mpsc::UnboundedSender<Eviction>,
    mut closing: watch::Receiver<bool>,
) {
    let mut backoff = RECONNECT_BACKOFF.0;
    loop {
        if *closing.borrow() || out.is_closed() {
            return;
        }
        let lost = tokio::select! {
            r = listen_once(&url, &pool, &origin, &mut since, &out, &mut backoff) => r,
            _ = closing.changed() => return,
        };
        tracing::warn!(error = %lost, retry_in_ms = backoff.as_millis() as u64, "revocation listener lost its database connection; reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = closing.changed() => return,
        }
        backoff = (backoff * 2).min(RECONNECT_BACKOFF.1);
    }
}

/// One connection's life: LISTEN, replay, then relay notifications and take checkpoints until
/// the connection fails (the error is returned).
async fn listen_once(
    url: &DatabaseUrl,
    pool: &Pool,
    origin: &str,
    since: &mut i64,
    out: &mpsc::UnboundedSender<Eviction>,
    backoff: &mut Duration,
) -> StoreError {
    let mut config: tokio_postgres::Config = match url.expose().parse() {
        Ok(c) => c,
        Err(e) => return StoreError::Postgres(PgError::db(&e, Some(url))),
    };
    config.connect_timeout(Duration::from_secs(5));
    config.application_name(LISTENER_APPLICATION);
    let (client, mut connection) = match config.connect(tokio_postgres::NoTls).await {
        Ok(c) => c,
        Err(e) => return StoreError::Postgres(PgError::db(&e, Some(url))),
    };
    // The connection is driven here; its notifications go to `heard`, in order.
    let (heard_tx, mut heard) = mpsc::unbounded_channel::<String>();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if heard_tx.send(n.payload().to_string()).is_err() {
                        return None;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    });
    let relay = |payload: &str| match parse(payload) {
        Some((o, _)) if o == origin => {}
        Some((_, e)) => {
            let _ = out.send(e);
        }
        None => tracing::warn!("a malformed eviction notification was ignored"),
    };
    let failed = async {
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        // Listening now: what committed since the checkpoint (less the slack) may have been
        // missed while no connection listened.
        let checkpoint: i64 = client
            .query_one(&format!("SELECT {DB_MS}"), &[])
            .await?
            .try_get(0)?;
        let replayed = replay(pool, *since - REPLAY_SLACK_MS, out).await?;
        if replayed > 0 {
            tracing::info!(
                replayed,
                "revocation listener replayed evictions accepted while it was reconnecting"
            );
        }
        *since = checkpoint;
        *backoff = RECONNECT_BACKOFF.0;
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.tick().await;
        loop {
            tokio::select! {
                n = heard.recv() => match n {
                    Some(p) => relay(&p),
                    None => return Err(StoreError::Closed),
                },
                _ = tick.tick() => {
                    let at: i64 = client.query_one(&format!("SELECT {DB_MS}"), &[]).await?.try_get(0)?;
                    // Notifications sent before this answer were queued before it: relay them
                    // before the checkpoint moves past them.
                    while let Ok(p) = heard.try_recv() {
                        relay(&p);
                    }
                    *since = at;
                }
            }
        }
    };
    let e: Result<(), StoreError> = failed.await;
    drop(client);
    // What the connection delivered before it failed is still relayed.
    while let Some(p) = heard.recv().await {
        relay(&p);
    }
    let cause = driver.await.ok().flatten();
    match (e, cause) {
        (_, Some(c)) => StoreError::Postgres(PgError::db(&c, Some(url))),
        (Err(e), None) => e,
        (Ok(()), None) => StoreError::Closed,
    }
}

/// Hands over the partner notices accepted since `from_ms` (database clock). Returns how many.
async fn replay(
    pool: &Pool,
    from_ms: i64,
    out: &mpsc::UnboundedSender<Eviction>,
) -> Result<usize, StoreError> {
    let c = pool.get().await.map_err(PgError::from)?;
    let rows = c
        .query(
            "SELECT sender, api_invoker_id, aef_ids, key_id FROM gateway_seen_notices \
             WHERE api_invoker_id IS NOT NULL AND accepted_at_ms >= $1",
            &[&from_ms],
        )
        .await?;
    let mut n = 0;
    for r in &rows {
        let aefs: Option<Vec<String>> = r.try_get(2)?;
        let e = (|| {
            Some(Eviction {
                home: CcfId::new(r.try_get::<_, String>(0).ok()?).ok()?,
                invoker: ApiInvokerId::new(r.try_get::<_, String>(1).ok()?).ok()?,
                aefs: aefs
                    .unwrap_or_default()
                    .into_iter()
                    .map(AefId::new)
                    .collect::<Result<_, _>>()
                    .ok()?,
                key_id: r.try_get::<_, Option<String>>(3).ok()?,
            })
        })();
        if let Some(e) = e {
            let _ = out.send(e);
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_carries_ids_only_and_reads_back() {
        let e = Eviction {
            home: CcfId::new("operator-b.test").unwrap(),
            invoker: ApiInvokerId::new("inv-1").unwrap(),
            aefs: vec![AefId::new("aef-1").unwrap(), AefId::new("aef.2").unwrap()],
            key_id: Some("0123456789abcdef".into()),
        };
        let p = payload("r1", &e);
        assert_eq!(
            p,
            "r1\toperator-b.test\tinv-1\taef-1,aef.2\t0123456789abcdef"
        );
        assert_eq!(parse(&p), Some(("r1", e.clone())));
        let all = Eviction {
            aefs: vec![],
            key_id: None,
            ..e.clone()
        };
        assert_eq!(parse(&payload("r2", &all)), Some(("r2", all)));
        // Too many AEFs for one notification: every AEF of the invoker, never fewer.
        let many = Eviction {
            aefs: (0..200)
                .map(|i| AefId::new(format!("aef-{i:0>60}")).unwrap())
                .collect(),
            ..e
        };
        let p = payload("r3", &many);
        assert!(p.len() < 8000);
        assert!(parse(&p).unwrap().1.aefs.is_empty());
        assert_eq!(parse("garbage"), None);
    }
}
