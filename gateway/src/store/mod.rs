//! What the gateway must not forget across a restart: who was handed which invoker's keys (fetch
//! records), the revocation notices not yet acknowledged (the outbox that `outbox` delivers),
//! and the notices already acted on (seen, for idempotency). docs/PROTOCOL.md 6.8.
//!
//! One async API ([`RevocationStore`]) over two backends, chosen by `[store]`
//! ([`ccf_core::pg::StoreConfig`]): redb (the default; one file in `state_dir`, or redb's
//! in-memory backend when none is configured; this module, its behaviour unchanged) or a
//! PostgreSQL database that several replicas of one domain's gateway share ([`postgres`]): then
//! the queue epoch, the seen notices and the outbox are global, and a partner's revocation
//! accepted at one replica evicts at every replica ([`Eviction`]).
//!
//! Every change that an acknowledgement depends on is one durable write transaction committed
//! before the RPC answers: a queued notice and its "seen" mark go together, so a crash between
//! them cannot lose the one or repeat the other. Notices carry no secret; the file is still
//! created owner-only like the CCF's.

mod postgres;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use capif_proto::v1::RevocationNotice;
use ccf_core::delivery::NoticeId;
use ccf_core::ids::{ApiInvokerId, CcfId};
use prost::Message;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};

/// "<api_invoker_id>/<partner ccf_id>" -> the latest key expiry (Unix ms) handed to the partner.
const FETCHES: TableDefinition<&str, u64> = TableDefinition::new("fetch_records");
/// "<destination>/<home ccf_id>/<notice_id>" -> an encoded [`OutboxRow`] (destination "" is the
/// own CCF).
const OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("outbox");
/// "<sender>/<notice_id>" -> until when (Unix ms) a repeat is recognised.
const SEEN: TableDefinition<&str, u64> = TableDefinition::new("seen_notices");
/// "<until, 20 digits>/<sender>/<notice_id>": the same marks ordered by age, to evict the oldest.
const SEEN_BY_EXPIRY: TableDefinition<&str, ()> = TableDefinition::new("seen_notices_by_expiry");

/// Why the store failed. The operation changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("revocation store: {0}")]
    Db(#[source] redb::Error),
    /// The PostgreSQL database failed or cannot be reached. The message never carries the
    /// URL's password.
    #[error("revocation store: {0}")]
    Postgres(#[from] ccf_core::pg::PgError),
    /// The store file or directory could not be opened.
    #[error("revocation store {}: {source}", .path.display())]
    File {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A stored row cannot be read back.
    #[error("revocation store holds a corrupt outbox row {0:?}")]
    Corrupt(String),
    /// The gateway is stopping.
    #[error("revocation store is closed")]
    Closed,
    /// The group commit that held this change failed (the cause, shared by every change of it).
    #[error("{0}")]
    Group(std::sync::Arc<StoreError>),
    /// The store file can be read or written by users other than its owner: whoever can write
    /// it could drop revocation notices or fetch records.
    #[error(
        "the revocation store {} has mode {mode:04o}, so other users could alter pending revocations; fix with `chmod 600 {}`",
        .path.display(),
        .path.display()
    )]
    Exposed {
        /// The store file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.into()) }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Postgres(ccf_core::pg::PgError::from(e))
    }
}

/// Where an outbox row goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Destination {
    /// A partner's gateway (`Interconnect.NotifyRevocation`).
    Partner(CcfId),
    /// The own CCF (`Federation.NotifyRevocation`), for notices received from partners.
    OwnCcf,
}

impl Destination {
    fn prefix(&self) -> &str {
        match self {
            Destination::Partner(p) => p.as_str(),
            Destination::OwnCcf => "",
        }
    }

    fn range(&self) -> (String, String) {
        // ids never contain '/', and '0' is the character after '/'.
        (format!("{}/", self.prefix()), format!("{}0", self.prefix()))
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Partner(p) => write!(f, "{p}"),
            Destination::OwnCcf => f.write_str("own CCF"),
        }
    }
}

/// One notice waiting for one destination's acknowledgement.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxRow {
    /// Where it goes.
    pub destination: Destination,
    /// The notice, as it is sent (its `home_ccf_id` and `notice_id` name it).
    pub notice: RevocationNotice,
    /// After this (Unix ms) the keys concerned have expired anyway: the row is dropped.
    pub give_up_at_ms: u64,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Not before this (Unix ms).
    pub next_attempt_at_ms: u64,
}

impl OutboxRow {
    fn key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.destination.prefix(),
            self.notice.home_ccf_id,
            self.notice.notice_id
        )
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(20 + self.notice.encoded_len());
        v.extend_from_slice(&self.give_up_at_ms.to_be_bytes());
        v.extend_from_slice(&self.attempts.to_be_bytes());
        v.extend_from_slice(&self.next_attempt_at_ms.to_be_bytes());
        self.notice.encode(&mut v).unwrap_or_default();
        v
    }

    fn decode(destination: Destination, key: &str, b: &[u8]) -> Result<Self, StoreError> {
        let corrupt = || StoreError::Corrupt(key.to_string());
        let (give_up, rest) = b.split_at_checked(8).ok_or_else(corrupt)?;
        let (attempts, rest) = rest.split_at_checked(4).ok_or_else(corrupt)?;
        let (next, rest) = rest.split_at_checked(8).ok_or_else(corrupt)?;
        let u64_of = |s: &[u8]| s.try_into().map(u64::from_be_bytes).map_err(|_| corrupt());
        Ok(Self {
            destination,
            notice: RevocationNotice::decode(rest).map_err(|_| corrupt())?,
            give_up_at_ms: u64_of(give_up)?,
            attempts: attempts
                .try_into()
                .map(u32::from_be_bytes)
                .map_err(|_| corrupt())?,
            next_attempt_at_ms: u64_of(next)?,
        })
    }
}

/// The redb backend: what the store holds across restarts, in one file.
struct RedbStore {
    db: Arc<parking_lot::RwLock<Option<Database>>>,
    seen_cap: u64,
    /// The fetch record changes waiting for the next group commit
    /// ([`Self::extend_fetch_grouped`], [`Self::settle_fetch_queued`]).
    fetches: tokio::sync::mpsc::UnboundedSender<PendingFetch>,
    /// How many [`Self::queue_for_fetchers`] calls began, bumped before their transaction: see
    /// [`Self::queue_epoch`].
    queues_begun: std::sync::atomic::AtomicU64,
}

/// One change of a fetch record waiting for the committer, applied in arrival order.
struct PendingFetch {
    key: String,
    provisional: u64,
    change: FetchChange,
}

/// What the committer does with a [`PendingFetch`].
enum FetchChange {
    /// [`RedbStore::extend_fetch`], answered once durable.
    Extend(tokio::sync::oneshot::Sender<Result<Option<u64>, StoreError>>),
    /// [`RedbStore::settle_fetch`], answered to nobody.
    Settle {
        prior: Option<u64>,
        handed: Option<u64>,
    },
}

impl Drop for RedbStore {
    // The committer thread shares the database: close it here, with the store, so the file can
    // be opened again at once (the thread ends when it sees the channel closed).
    fn drop(&mut self) {
        self.close();
    }
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedbStore")
    }
}

/// The store file's name in `state_dir`.
pub const STORE_FILE: &str = "gateway.redb";

/// The committer of [`RedbStore::extend_fetch_grouped`] and
/// [`RedbStore::settle_fetch_queued`]: takes every change waiting, applies them in order
/// in one transaction, commits it (durably when it holds an extension), then answers each
/// extension. Ends with the store.
fn commit_fetches(
    db: &parking_lot::RwLock<Option<Database>>,
    mut pending: tokio::sync::mpsc::UnboundedReceiver<PendingFetch>,
) {
    while let Some(first) = pending.blocking_recv() {
        let mut batch = vec![first];
        while let Ok(next) = pending.try_recv() {
            batch.push(next);
        }
        let written = match &*db.read() {
            Some(db) => write_fetches(db, &batch),
            None => Err(StoreError::Closed),
        };
        let (priors, failure) = match written {
            Ok(priors) => (priors, None),
            Err(e) => {
                // The provisional records of settles stay: a notice may reach a partner
                // needlessly.
                tracing::warn!(error = %e, changes = batch.len(), "could not write fetch records");
                (Vec::new(), Some(Arc::new(e)))
            }
        };
        let mut priors = priors.into_iter();
        for p in batch {
            let prior = priors.next().flatten();
            if let FetchChange::Extend(done) = p.change {
                let _ = done.send(match &failure {
                    None => Ok(prior),
                    Some(e) => Err(StoreError::Group(e.clone())),
                });
            }
        }
    }
}

/// One transaction applying `batch` in order, durable when it extends a record; the prior value
/// of each record changed.
fn write_fetches(db: &Database, batch: &[PendingFetch]) -> Result<Vec<Option<u64>>, StoreError> {
    let mut tx = db.begin_write()?;
    if !batch
        .iter()
        .any(|p| matches!(p.change, FetchChange::Extend(_)))
    {
        tx.set_durability(Durability::None)?;
    }
    let priors = {
        let mut t = tx.open_table(FETCHES)?;
        let mut priors = Vec::with_capacity(batch.len());
        for p in batch {
            let current = t.get(p.key.as_str())?.map(|v| v.value());
            match p.change {
                FetchChange::Extend(_) => {
                    t.insert(p.key.as_str(), current.unwrap_or(0).max(p.provisional))?;
                }
                FetchChange::Settle { prior, handed } => {
                    if current == Some(prior.unwrap_or(0).max(p.provisional)) {
                        match prior.max(handed) {
                            Some(e) => t.insert(p.key.as_str(), e)?,
                            None => t.remove(p.key.as_str())?,
                        };
                    }
                }
            }
            priors.push(current);
        }
        priors
    };
    tx.commit()?;
    Ok(priors)
}

fn seen_key(sender: &str, id: &str) -> String {
    format!("{sender}/{id}")
}

fn fetch_key(invoker: &ApiInvokerId, partner: &CcfId) -> String {
    format!("{invoker}/{partner}")
}

/// Remembers `(sender, id)` until `until`, evicting the oldest marks beyond `cap`.
fn insert_seen(
    tx: &redb::WriteTransaction,
    sender: &str,
    id: &str,
    until: u64,
    cap: u64,
) -> Result<(), StoreError> {
    let mut seen = tx.open_table(SEEN)?;
    let mut by_expiry = tx.open_table(SEEN_BY_EXPIRY)?;
    let key = seen_key(sender, id);
    if let Some(old) = seen.insert(key.as_str(), until)? {
        by_expiry.remove(format!("{:020}/{key}", old.value()).as_str())?;
    }
    by_expiry.insert(format!("{until:020}/{key}").as_str(), ())?;
    while seen.len()? > cap {
        let Some((oldest, ())) = by_expiry
            .pop_first()?
            .map(|(k, v)| (k.value().to_string(), v.value()))
        else {
            break;
        };
        if let Some((_, k)) = oldest.split_once('/') {
            seen.remove(k)?;
        }
    }
    Ok(())
}

/// The store's page cache. redb's default (1 GiB) would let the gateway's memory follow the
/// file's size; the rows the hot path reads (one fetch record per partner fetch) are few.
const PAGE_CACHE_BYTES: usize = 16 << 20;

impl RedbStore {
    /// Opens (or creates) the store in `dir` (created 0700; the file 0600), or in memory when
    /// `dir` is `None`. At most `seen_cap` seen marks are kept.
    fn open(dir: Option<&Path>, seen_cap: u64) -> Result<Self, StoreError> {
        let db = match dir {
            None => {
                redb::Builder::new().create_with_backend(redb::backends::InMemoryBackend::new())?
            }
            Some(dir) => {
                let io = |path: &Path| {
                    let path = path.to_path_buf();
                    move |source| StoreError::File { path, source }
                };
                ccf_core::pki::create_private_dir(dir).map_err(io(dir))?;
                let path = dir.join(STORE_FILE);
                let file = ccf_core::pki::open_private_file(&path).map_err(io(&path))?;
                // Refused, not fixed: it may already have been altered.
                if let Some(mode) = ccf_core::pki::exposed_mode(&file).map_err(io(&path))? {
                    return Err(StoreError::Exposed { path, mode });
                }
                redb::Builder::new()
                    .set_cache_size(PAGE_CACHE_BYTES)
                    .create_file(file)?
            }
        };
        let tx = db.begin_write()?;
        tx.open_table(FETCHES)?;
        tx.open_table(OUTBOX)?;
        tx.open_table(SEEN)?;
        tx.open_table(SEEN_BY_EXPIRY)?;
        tx.commit()?;
        let db = Arc::new(parking_lot::RwLock::new(Some(db)));
        let (fetches, pending) = tokio::sync::mpsc::unbounded_channel();
        let committer = db.clone();
        std::thread::Builder::new()
            .name("fetch-commit".into())
            .spawn(move || commit_fetches(&committer, pending))
            .map_err(|source| StoreError::File {
                path: PathBuf::from("(fetch record committer thread)"),
                source,
            })?;
        Ok(Self {
            fetches,
            db,
            seen_cap: seen_cap.max(1),
            queues_begun: Default::default(),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match &*self.db.read() {
            Some(db) => f(db),
            None => Err(StoreError::Closed),
        }
    }

    /// Closes the database (its file can be opened again); every later call fails with
    /// [`StoreError::Closed`].
    fn close(&self) {
        self.db.write().take();
    }

    /// Before a key of `invoker` may leave for `partner`: extends its fetch record to at least
    /// `provisional` (Unix ms), durably. Returns the record as it was, for [`Self::settle_fetch`].
    fn extend_fetch(
        &self,
        invoker: &ApiInvokerId,
        partner: &CcfId,
        provisional: u64,
    ) -> Result<Option<u64>, StoreError> {
        self.with(|db| {
            let tx = db.begin_write()?;
            let prior = {
                let mut t = tx.open_table(FETCHES)?;
                let key = fetch_key(invoker, partner);
                let prior = t.get(key.as_str())?.map(|v| v.value());
                t.insert(key.as_str(), prior.unwrap_or(0).max(provisional))?;
                prior
            };
            tx.commit()?;
            Ok(prior)
        })
    }

    /// Changes whenever a [`Self::queue_for_fetchers`] begins (before its transaction). A fetch
    /// that reads the same epoch before writing its record and after the record is durable knows
    /// that no revocation of this process queued its notices without seeing that record: such a
    /// revocation's transaction came before the record's commit, so its epoch change came before
    /// the second read. (Write transactions are serialized; one that comes after the record's
    /// commit sees the record.) This process's revocations only: replicas sharing a store need a
    /// shared epoch.
    fn queue_epoch(&self) -> u64 {
        self.queues_begun.load(Ordering::SeqCst)
    }

    /// [`Self::extend_fetch`], committed together with the other fetches waiting at that moment:
    /// one durable (fsync'd) transaction for all of them, on the committer thread, so the
    /// request's task never blocks on the disk and concurrent misses share one fsync. Returns
    /// only after the transaction holding this record is durable, so it is exactly as durable as
    /// [`Self::extend_fetch`]; within a transaction the changes apply in arrival order.
    async fn extend_fetch_grouped(
        &self,
        invoker: &ApiInvokerId,
        partner: &CcfId,
        provisional: u64,
    ) -> Result<Option<u64>, StoreError> {
        let (done, answer) = tokio::sync::oneshot::channel();
        self.fetches
            .send(PendingFetch {
                key: fetch_key(invoker, partner),
                provisional,
                change: FetchChange::Extend(done),
            })
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// [`Self::settle_fetch`] without waiting: queued behind this request's own
    /// [`Self::extend_fetch_grouped`] (so applied after it) and written with the next group
    /// commit. Until then the record keeps its provisional expiry, which only makes a notice
    /// reach the partner needlessly (as a failed settle does); a failure is logged there.
    fn settle_fetch_queued(
        &self,
        invoker: &ApiInvokerId,
        partner: &CcfId,
        provisional: u64,
        prior: Option<u64>,
        handed: Option<u64>,
    ) -> Result<(), StoreError> {
        self.fetches
            .send(PendingFetch {
                key: fetch_key(invoker, partner),
                provisional,
                change: FetchChange::Settle { prior, handed },
            })
            .map_err(|_| StoreError::Closed)
    }

    /// After the own CCF answered: lowers a provisional record to `max(prior, handed)` (`handed`:
    /// the expiry of the key that left, `None` when none did), unless another fetch changed the
    /// record meanwhile (it settles it then). Not durable on its own: a crash keeps the
    /// provisional expiry, which only makes a later notice reach the partner needlessly.
    fn settle_fetch(
        &self,
        invoker: &ApiInvokerId,
        partner: &CcfId,
        provisional: u64,
        prior: Option<u64>,
        handed: Option<u64>,
    ) -> Result<(), StoreError> {
        self.with(|db| {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::None)?;
            {
                let mut t = tx.open_table(FETCHES)?;
                let key = fetch_key(invoker, partner);
                let current = t.get(key.as_str())?.map(|v| v.value());
                if current == Some(prior.unwrap_or(0).max(provisional)) {
                    match prior.max(handed) {
                        Some(e) => t.insert(key.as_str(), e)?,
                        None => t.remove(key.as_str())?,
                    };
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// The partners holding keys of `invoker` at `now`, with the latest expiry of each.
    fn fetchers_of(
        &self,
        invoker: &ApiInvokerId,
        now: u64,
    ) -> Result<Vec<(CcfId, u64)>, StoreError> {
        self.with(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(FETCHES)?;
            Self::fetchers_in(&t, invoker, now)
        })
    }

    fn fetchers_in(
        t: &impl ReadableTable<&'static str, u64>,
        invoker: &ApiInvokerId,
        now: u64,
    ) -> Result<Vec<(CcfId, u64)>, StoreError> {
        let (lo, hi) = (format!("{invoker}/"), format!("{invoker}0"));
        let mut out = Vec::new();
        for r in t.range(lo.as_str()..hi.as_str())? {
            let (k, v) = r?;
            let partner = k.value().rsplit('/').next().unwrap_or_default();
            if let Ok(p) = CcfId::new(partner)
                && v.value() > now
            {
                out.push((p, v.value()));
            }
        }
        Ok(out)
    }

    /// The own CCF published `notice` (its `notice_id` is `id`): in one durable transaction,
    /// queues one row per partner (`keep(partner)`) with an unexpired fetch record, given up at
    /// that record's expiry; forgets the invoker's records when it is offboarded; and remembers the
    /// notice as seen until `seen_until`. Returns the partners queued for, or `None` when the
    /// notice was published before (nothing changed).
    fn queue_for_fetchers(
        &self,
        notice: &RevocationNotice,
        id: &NoticeId,
        invoker: &ApiInvokerId,
        now: u64,
        seen_until: u64,
        keep: impl Fn(&CcfId) -> bool,
    ) -> Result<Option<Vec<CcfId>>, StoreError> {
        // Before the transaction: see `queue_epoch`.
        self.queues_begun.fetch_add(1, Ordering::SeqCst);
        self.with(|db| {
            let tx = db.begin_write()?;
            let queued = {
                if tx
                    .open_table(SEEN)?
                    .get(seen_key(&notice.home_ccf_id, id.as_str()).as_str())?
                    .is_some()
                {
                    return Ok(None);
                }
                let mut fetches = tx.open_table(FETCHES)?;
                let fetchers = Self::fetchers_in(&fetches, invoker, now)?;
                let mut outbox = tx.open_table(OUTBOX)?;
                let mut queued = Vec::new();
                for (partner, expires) in fetchers.into_iter().filter(|(p, _)| keep(p)) {
                    let row = OutboxRow {
                        destination: Destination::Partner(partner.clone()),
                        notice: notice.clone(),
                        give_up_at_ms: expires,
                        attempts: 0,
                        next_attempt_at_ms: now,
                    };
                    outbox.insert(row.key().as_str(), row.encode().as_slice())?;
                    queued.push(partner);
                }
                if notice.kind() == capif_proto::v1::RevocationKind::Offboarded {
                    let (lo, hi) = (format!("{invoker}/"), format!("{invoker}0"));
                    fetches.retain_in(lo.as_str()..hi.as_str(), |_, _| false)?;
                }
                queued
            };
            insert_seen(
                &tx,
                &notice.home_ccf_id,
                id.as_str(),
                seen_until,
                self.seen_cap,
            )?;
            tx.commit()?;
            Ok(Some(queued))
        })
    }

    /// Whether `(sender, id)` was acted on.
    fn seen(&self, sender: &CcfId, id: &NoticeId) -> Result<bool, StoreError> {
        self.with(|db| {
            let tx = db.begin_read()?;
            Ok(tx
                .open_table(SEEN)?
                .get(seen_key(sender.as_str(), id.as_str()).as_str())?
                .is_some())
        })
    }

    /// A partner's notice was acted on: in one durable transaction, remembers it as seen until
    /// `until` and queues it for the own CCF (given up then too). Returns false when it had been
    /// seen meanwhile (a concurrent repeat; nothing changed).
    fn accept_from_partner(
        &self,
        notice: &RevocationNotice,
        id: &NoticeId,
        now: u64,
        until: u64,
    ) -> Result<bool, StoreError> {
        self.with(|db| {
            let tx = db.begin_write()?;
            if tx
                .open_table(SEEN)?
                .get(seen_key(&notice.home_ccf_id, id.as_str()).as_str())?
                .is_some()
            {
                return Ok(false);
            }
            insert_seen(&tx, &notice.home_ccf_id, id.as_str(), until, self.seen_cap)?;
            let row = OutboxRow {
                destination: Destination::OwnCcf,
                notice: notice.clone(),
                give_up_at_ms: until,
                attempts: 0,
                next_attempt_at_ms: now,
            };
            tx.open_table(OUTBOX)?
                .insert(row.key().as_str(), row.encode().as_slice())?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// Every row for `destination`.
    fn rows(&self, destination: &Destination) -> Result<Vec<OutboxRow>, StoreError> {
        self.with(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(OUTBOX)?;
            let (lo, hi) = destination.range();
            let mut rows = Vec::new();
            for r in t.range(lo.as_str()..hi.as_str())? {
                let (k, v) = r?;
                rows.push(OutboxRow::decode(
                    destination.clone(),
                    k.value(),
                    v.value(),
                )?);
            }
            Ok(rows)
        })
    }

    /// Rows queued for `destination`.
    fn depth(&self, destination: &Destination) -> Result<u64, StoreError> {
        self.with(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(OUTBOX)?;
            let (lo, hi) = destination.range();
            Ok(t.range(lo.as_str()..hi.as_str())?.count() as u64)
        })
    }

    /// Rows queued, every destination together.
    fn total_depth(&self) -> Result<u64, StoreError> {
        self.with(|db| Ok(db.begin_read()?.open_table(OUTBOX)?.len()?))
    }

    /// Deletes a row (acknowledged, or given up).
    fn remove(&self, row: &OutboxRow) -> Result<(), StoreError> {
        self.with(|db| {
            let tx = db.begin_write()?;
            tx.open_table(OUTBOX)?.remove(row.key().as_str())?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Stores a row's new attempt count and next attempt time. Not durable on its own: after a
    /// crash the row is simply tried again at once.
    fn reschedule(&self, row: &OutboxRow) -> Result<(), StoreError> {
        self.with(|db| {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::None)?;
            {
                let mut t = tx.open_table(OUTBOX)?;
                // Only a row still there: an acknowledgement may have removed it meanwhile.
                if t.get(row.key().as_str())?.is_some() {
                    t.insert(row.key().as_str(), row.encode().as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Deletes fetch records and seen marks that expired by `now`. Returns how many of each.
    fn purge(&self, now: u64) -> Result<(u64, u64), StoreError> {
        self.with(|db| {
            let tx = db.begin_write()?;
            let (mut fetches, mut seen) = (0, 0);
            tx.open_table(FETCHES)?.retain(|_, exp| {
                let keep = exp > now;
                fetches += u64::from(!keep);
                keep
            })?;
            {
                let mut by_expiry = tx.open_table(SEEN_BY_EXPIRY)?;
                let mut marks = tx.open_table(SEEN)?;
                // "<until>/..." sorts below "<now>0" exactly when until <= now ('/' < '0').
                let hi = format!("{now:020}0");
                let old: Vec<String> = by_expiry
                    .range(..hi.as_str())?
                    .map(|r| r.map(|(k, _)| k.value().to_string()))
                    .collect::<Result<_, _>>()?;
                for k in old {
                    by_expiry.remove(k.as_str())?;
                    if let Some((_, key)) = k.split_once('/') {
                        marks.remove(key)?;
                        seen += 1;
                    }
                }
            }
            tx.commit()?;
            Ok((fetches, seen))
        })
    }
}

/// A partner's invoker to drop from the cache at every replica of this domain: what one replica
/// accepted (a partner's notice) or was asked (`EvictPartnerInvoker`), as the other replicas
/// receive it. Ids only: no key material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Eviction {
    /// The invoker's home domain.
    pub home: CcfId,
    /// The invoker.
    pub invoker: ApiInvokerId,
    /// The AEFs concerned (empty: all).
    pub aefs: Vec<ccf_core::ids::AefId>,
    /// Only this replaced key (`KEY_REPLACED_BY_NEWER`); `None`: every key of the invoker.
    pub key_id: Option<String>,
}

impl Eviction {
    /// What a partner's accepted `notice` evicts (as `service::interconnect` does locally).
    pub fn of_notice(notice: &RevocationNotice) -> Option<Self> {
        let replaced = notice.kind() == capif_proto::v1::RevocationKind::KeyReplacedByNewer
            && !notice.key_id.is_empty();
        Some(Self {
            home: CcfId::new(notice.home_ccf_id.clone()).ok()?,
            invoker: ApiInvokerId::new(notice.api_invoker_id.clone()).ok()?,
            aefs: notice
                .aef_ids
                .iter()
                .map(|a| ccf_core::ids::AefId::new(a.clone()))
                .collect::<Result<_, _>>()
                .ok()?,
            key_id: replaced.then(|| notice.key_id.clone()),
        })
    }
}

/// Where a [`RevocationStore`] keeps its state.
enum Backend {
    /// The embedded default.
    Redb(RedbStore),
    /// A database the domain's gateway replicas share.
    Postgres(postgres::PgStore),
}

/// What the store holds across restarts (and, on PostgreSQL, shares between replicas).
pub struct RevocationStore {
    backend: Backend,
}

impl std::fmt::Debug for RevocationStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RevocationStore")
    }
}

impl RevocationStore {
    /// Opens (or creates) the redb store in `dir` (created 0700; the file 0600), or in memory
    /// when `dir` is `None`. At most `seen_cap` seen marks are kept.
    pub fn open(dir: Option<&Path>, seen_cap: u64) -> Result<Self, StoreError> {
        Ok(Self {
            backend: Backend::Redb(RedbStore::open(dir, seen_cap)?),
        })
    }

    /// Connects to a PostgreSQL database (at most `pool_size` connections), applies the
    /// gateway's schema migrations it lacks (one replica at a time) and starts listening for the
    /// other replicas' evictions ([`Self::evictions`]).
    pub async fn connect(
        url: &ccf_core::pg::DatabaseUrl,
        pool_size: usize,
        seen_cap: u64,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            backend: Backend::Postgres(postgres::PgStore::connect(url, pool_size, seen_cap).await?),
        })
    }

    /// The store `config` names: redb in `state_dir` (the default) or the database.
    pub async fn from_config(
        config: &ccf_core::pg::StoreConfig,
        state_dir: Option<&Path>,
        seen_cap: u64,
    ) -> Result<Self, StoreError> {
        match config.backend {
            ccf_core::pg::StoreBackend::Redb => Self::open(state_dir, seen_cap),
            ccf_core::pg::StoreBackend::Postgres => {
                let url = config.url.as_ref().ok_or_else(|| {
                    ccf_core::pg::PgError::Config(
                        "store.backend = \"postgres\" needs store.url".into(),
                    )
                })?;
                Self::connect(url, config.pool_size, seen_cap).await
            }
        }
    }

    /// Which engine holds the state.
    pub fn backend(&self) -> ccf_core::pg::StoreBackend {
        match self.backend {
            Backend::Redb(_) => ccf_core::pg::StoreBackend::Redb,
            Backend::Postgres(_) => ccf_core::pg::StoreBackend::Postgres,
        }
    }

    /// The other replicas' evictions, once (later calls: `None`); `None` on redb, which no
    /// other replica shares.
    pub fn evictions(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Eviction>> {
        match &self.backend {
            Backend::Redb(_) => None,
            Backend::Postgres(pg) => pg.evictions(),
        }
    }

    /// Tells the other replicas sharing the database to evict (`EvictPartnerInvoker`). Not
    /// durable: a replica whose listener is reconnecting at that moment misses it (the CCF's
    /// own revocation path, which is durable, still reaches it). A no-op on redb.
    pub async fn broadcast_eviction(&self, eviction: &Eviction) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(_) => Ok(()),
            Backend::Postgres(pg) => pg.broadcast_eviction(eviction).await,
        }
    }

    /// How often an outbox worker looks at a shared outbox even when nothing woke it: other
    /// replicas queue rows too. `None` on redb, which only this process writes.
    pub fn shared_poll(&self) -> Option<std::time::Duration> {
        match self.backend {
            Backend::Redb(_) => None,
            Backend::Postgres(_) => Some(postgres::OUTBOX_POLL),
        }
    }

    /// Closes the store; every later call fails with [`StoreError::Closed`] (the redb file can
    /// be opened again).
    pub fn close(&self) {
        match &self.backend {
            Backend::Redb(r) => r.close(),
            Backend::Postgres(pg) => pg.close(),
        }
    }

    /// Before a key of `invoker` may leave for `partner`: extends its fetch record to at least
    /// `provisional` (Unix ms), durably. Returns the record as it was, for [`Self::settle_fetch`].
    pub async fn extend_fetch(
        &self,
        invoker: &ApiInvokerId,
        partner: &CcfId,
        provisional: u64,
    ) -> Result<Option<u64>, StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.extend_fetch(invoker, partner, provisional),
            Backend::Postgres(pg) => pg.extend_fetch(invoker, partner, provisional).await,
        }
    }

    /// Changes whenever a [`Self::queue_for_fetchers`] begins, at any replica sharing the store.
    /// A fetch reads it before writing its record and again after the record is committed; a
    /// change means a revocation may have queued its notices without seeing the record, so the
    /// CCF is asked again. redb: a counter of this process, bumped before the (serialized) write
    /// transaction. PostgreSQL: see `postgres::PgStore::queue_epoch` for the ordering argument.
    pub async fn queue_epoch(&self) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Redb(r) => Ok(r.queue_epoch()),
            Backend::Postgres(pg) => pg.queue_epoch().await,
        }
    }

    /// [`Self::queue_epoch`] as a fetch reads it BEFORE writing its record: on PostgreSQL
    /// without the row lock, which only the read after the record's commit needs (a share lock
    /// taken by every miss is a tuple write, and a multixact when misses overlap).
    pub async fn queue_epoch_before_record(&self) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Redb(r) => Ok(r.queue_epoch()),
            Backend::Postgres(pg) => pg.queue_epoch_unlocked().await,
        }
    }

    /// [`Self::extend_fetch`], on redb committed together with the other fetches waiting (one
    /// fsync for all, off the request's task); as durable as [`Self::extend_fetch`] when it
    /// returns. PostgreSQL: one transaction of its own (the server groups commits).
    pub async fn extend_fetch_grouped(
        &self,
        invoker: &ApiInvokerId,
        partner: &CcfId,
        provisional: u64,
    ) -> Result<Option<u64>, StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.extend_fetch_grouped(invoker, partner, provisional).await,
            Backend::Postgres(pg) => pg.extend_fetch(invoker, partner, provisional).await,
        }
    }

    /// [`Self::settle_fetch`] without waiting, applied after this request's own extension; a
    /// failure is logged there. Until then the record keeps its provisional expiry, which only
    /// makes a notice reach the partner needlessly.
    pub fn settle_fetch_queued(
        &self,
        invoker: &ApiInvokerId,
        partner: &CcfId,
        provisional: u64,
        prior: Option<u64>,
        handed: Option<u64>,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.settle_fetch_queued(invoker, partner, provisional, prior, handed),
            Backend::Postgres(pg) => {
                pg.settle_fetch_spawned(invoker, partner, provisional, prior, handed)
            }
        }
    }

    /// After the own CCF answered: lowers a provisional record to `max(prior, handed)`, unless
    /// another fetch changed the record meanwhile. Not durable on its own (redb): a crash keeps
    /// the provisional expiry, which only makes a later notice reach the partner needlessly.
    pub async fn settle_fetch(
        &self,
        invoker: &ApiInvokerId,
        partner: &CcfId,
        provisional: u64,
        prior: Option<u64>,
        handed: Option<u64>,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.settle_fetch(invoker, partner, provisional, prior, handed),
            Backend::Postgres(pg) => {
                pg.settle_fetch(invoker, partner, provisional, prior, handed)
                    .await
            }
        }
    }

    /// The partners holding keys of `invoker` at `now`, with the latest expiry of each (ordered
    /// by partner).
    pub async fn fetchers_of(
        &self,
        invoker: &ApiInvokerId,
        now: u64,
    ) -> Result<Vec<(CcfId, u64)>, StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.fetchers_of(invoker, now),
            Backend::Postgres(pg) => pg.fetchers_of(invoker, now).await,
        }
    }

    /// The own CCF published `notice` (its `notice_id` is `id`): in one durable transaction,
    /// queues one row per partner (`keep(partner)`) with an unexpired fetch record, given up at
    /// that record's expiry; forgets the invoker's records when it is offboarded; and remembers
    /// the notice as seen until `seen_until`. Returns the partners queued for, or `None` when the
    /// notice was published before (at any replica; nothing changed).
    pub async fn queue_for_fetchers(
        &self,
        notice: &RevocationNotice,
        id: &NoticeId,
        invoker: &ApiInvokerId,
        now: u64,
        seen_until: u64,
        keep: impl Fn(&CcfId) -> bool + Send,
    ) -> Result<Option<Vec<CcfId>>, StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.queue_for_fetchers(notice, id, invoker, now, seen_until, keep),
            Backend::Postgres(pg) => {
                pg.queue_for_fetchers(notice, id, invoker, now, seen_until, keep)
                    .await
            }
        }
    }

    /// Whether `(sender, id)` was acted on.
    pub async fn seen(&self, sender: &CcfId, id: &NoticeId) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.seen(sender, id),
            Backend::Postgres(pg) => pg.seen(sender, id).await,
        }
    }

    /// A partner's notice was acted on: in one durable transaction, remembers it as seen until
    /// `until` and queues it for the own CCF (given up then too); on PostgreSQL the same
    /// transaction tells the other replicas to evict ([`Eviction`], delivered on commit).
    /// Returns false when it had been seen meanwhile (a concurrent repeat; nothing changed).
    pub async fn accept_from_partner(
        &self,
        notice: &RevocationNotice,
        id: &NoticeId,
        now: u64,
        until: u64,
    ) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.accept_from_partner(notice, id, now, until),
            Backend::Postgres(pg) => pg.accept_from_partner(notice, id, now, until).await,
        }
    }

    /// Every row for `destination`, in key order (home CCF, then notice id).
    pub async fn rows(&self, destination: &Destination) -> Result<Vec<OutboxRow>, StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.rows(destination),
            Backend::Postgres(pg) => pg.rows(destination).await,
        }
    }

    /// Rows queued for `destination`.
    pub async fn depth(&self, destination: &Destination) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.depth(destination),
            Backend::Postgres(pg) => pg.depth(Some(destination)).await,
        }
    }

    /// Rows queued for `destination`, read synchronously for a `/metrics` scrape: redb reads
    /// now; PostgreSQL answers the counts a background query fetched at most a second before
    /// (none yet at the first scrape: 0).
    pub fn depth_now(&self, destination: &Destination) -> u64 {
        match &self.backend {
            Backend::Redb(r) => r.depth(destination).unwrap_or_default(),
            Backend::Postgres(pg) => pg.depth_cached(destination),
        }
    }

    /// Rows queued, every destination together.
    pub async fn total_depth(&self) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.total_depth(),
            Backend::Postgres(pg) => pg.depth(None).await,
        }
    }

    /// Deletes a row (acknowledged, or given up). A row already gone (another replica's
    /// worker delivered it too) is no error.
    pub async fn remove(&self, row: &OutboxRow) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.remove(row),
            Backend::Postgres(pg) => pg.remove(row).await,
        }
    }

    /// Stores a row's new attempt count and next attempt time, if the row is still there. Not
    /// durable on its own (redb): after a crash the row is simply tried again at once.
    pub async fn reschedule(&self, row: &OutboxRow) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.reschedule(row),
            Backend::Postgres(pg) => pg.reschedule(row).await,
        }
    }

    /// Deletes fetch records and seen marks that expired by `now`. Returns how many of each.
    pub async fn purge(&self, now: u64) -> Result<(u64, u64), StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.purge(now),
            Backend::Postgres(pg) => pg.purge(now).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capif_proto::v1::RevocationKind;

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

    /// What another replica evicts for a partner's notice is what `service::interconnect`
    /// evicts locally: the whole invoker, or only the replaced key.
    #[test]
    fn an_eviction_names_what_the_notice_revokes() {
        let mut n = notice("operator-a.test", "inv-1", &NoticeId::random());
        n.aef_ids = vec!["aef-1".into()];
        n.key_id = "0123456789abcdef".into();
        let e = Eviction::of_notice(&n).unwrap();
        assert_eq!(
            (e.home.as_str(), e.invoker.as_str(), e.aefs.len(), e.key_id),
            ("operator-a.test", "inv-1", 1, None),
            "an offboarding evicts every key of the invoker"
        );
        n.kind = RevocationKind::KeyReplacedByNewer as i32;
        let e = Eviction::of_notice(&n).unwrap();
        assert_eq!(e.key_id.as_deref(), Some("0123456789abcdef"));
        n.api_invoker_id = "not an id".into();
        assert!(Eviction::of_notice(&n).is_none());
    }

    /// Concurrent misses share group commits: every record is on disk when its call returns
    /// (a reopened file holds it), each call saw the record as it was before its own change,
    /// and a closed store refuses instead of hanging.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grouped_fetch_records_are_durable_when_the_call_returns() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let store = Arc::new(RedbStore::open(Some(&state), 100).unwrap());
        let partner = ccf("operator-a.test");
        let calls: Vec<_> = (0..64u64)
            .map(|i| {
                let (store, partner) = (store.clone(), partner.clone());
                tokio::spawn(async move {
                    // Two changes of each record: the later one must see the earlier one.
                    let inv = id(&format!("inv-{}", i % 32));
                    let prior = store
                        .extend_fetch_grouped(&inv, &partner, 1_000 + i)
                        .await
                        .unwrap();
                    (i, prior)
                })
            })
            .collect();
        let mut priors = Vec::new();
        for c in calls {
            priors.push(c.await.unwrap());
        }
        for n in 0..32u64 {
            let seen: Vec<_> = priors.iter().filter(|(i, _)| i % 32 == n).collect();
            assert_eq!(
                seen.iter().filter(|(_, p)| p.is_none()).count(),
                1,
                "{seen:?}"
            );
            assert!(
                seen.iter()
                    .any(|(i, p)| p.is_some_and(|p| p == 1_000 + (i + 32) % 64)),
                "{seen:?}"
            );
        }
        // A queued settle lowers a record to the expiry handed, after the extension before it.
        let inv = id("inv-settled");
        let prior = store
            .extend_fetch_grouped(&inv, &partner, 9_000)
            .await
            .unwrap();
        store
            .settle_fetch_queued(&inv, &partner, 9_000, prior, Some(4_000))
            .unwrap();
        // The next grouped change is applied after the settle: once it is durable, so is that.
        store
            .extend_fetch_grouped(&id("inv-barrier"), &partner, 1)
            .await
            .unwrap();
        assert_eq!(
            store.fetchers_of(&inv, 0).unwrap(),
            vec![(partner.clone(), 4_000)]
        );
        let store = Arc::into_inner(store).unwrap();
        drop(store);
        let reopened = RedbStore::open(Some(&state), 100).unwrap();
        for n in 0..32u64 {
            let holders = reopened.fetchers_of(&id(&format!("inv-{n}")), 0).unwrap();
            assert_eq!(holders, vec![(partner.clone(), 1_000 + n + 32)]);
        }
        reopened.close();
        let refused = reopened
            .extend_fetch_grouped(&id("inv-0"), &partner, 5_000)
            .await;
        assert!(refused.is_err());
    }

    /// A store file others may write is refused (as the CCF's is), with the fix in the message,
    /// and its mode is not changed behind the operator's back.
    #[test]
    fn an_exposed_store_file_is_refused_and_left_as_it_is() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        RedbStore::open(Some(&state), 100).unwrap().close();
        let file = state.join(STORE_FILE);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o664)).unwrap();
        let e = RedbStore::open(Some(&state), 100).unwrap_err();
        assert!(
            matches!(&e, StoreError::Exposed { mode, .. } if *mode == 0o664),
            "{e:?}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o664, "refused, not silently fixed");
    }
}
