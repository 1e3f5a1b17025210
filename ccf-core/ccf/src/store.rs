//! The CCF's acknowledged state: onboarded invokers, used onboarding credentials, security
//! contexts with their expiry, refusals of foreign invokers and the revocation outbox. Two
//! backends behind one async API (`[store]`, [`ccf_core::pg::StoreConfig`]): an embedded ACID
//! file (redb, in the state directory; the default, nothing to install) or a PostgreSQL database
//! that several CCF replicas may share ([`postgres`]).
//!
//! Every operation is one transaction, committed durably before the RPC that caused it is
//! answered, so whatever a client saw acknowledged survives a crash. In the redb file values are
//! JSON; a context's AEFPSK is kept (hex) because the CCF must hand it to AEFs later. The redb
//! operations run on the calling task, as before: their commits are short.
//!
//! Because the redb file holds those keys, it is owner-only (0600) from the moment it is created, a
//! file that others can read is refused, and expired contexts are deleted
//! ([`Store::purge_expired`]) rather than kept forever.

mod postgres;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use capif_proto::v1::RevocationNotice;
use ccf_core::ids::{AefId, ApiInvokerId, ApiName, CcfId};
use ccf_core::kdf::AefPsk;
use ccf_core::metrics::{Histogram, latency_histogram};
use ccf_core::pg::{DatabaseUrl, PgError, StoreBackend, StoreConfig};
use ccf_core::registry::SecurityMethod;
use ccf_core::token::{TokenError, TokenKeys};
use prost::Message;

const INVOKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("invokers");
const CONTEXTS: TableDefinition<&str, &[u8]> = TableDefinition::new("security_contexts");
const CREDENTIALS: TableDefinition<&str, &str> =
    TableDefinition::new("used_onboarding_credentials");
/// Invokers of other domains refused at AEFs of this one: "<home>/<invoker>/<aef>" -> until
/// (Unix ms).
const FOREIGN_REVOCATIONS: TableDefinition<&str, u64> = TableDefinition::new("foreign_revocations");
/// notice_id -> attempts (4 bytes) + next attempt (8 bytes, Unix ms) + the encoded notice: what
/// the gateway has not acknowledged yet.
const REVOCATION_OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("revocation_outbox");

/// Why the store failed. The operation changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("state store: {0}")]
    Db(#[source] redb::Error),
    /// The PostgreSQL database failed or cannot be reached. The message never carries the
    /// URL's password.
    #[error("state store: {0}")]
    Postgres(#[from] PgError),
    /// A PostgreSQL row cannot be read back as a record.
    #[error("state store holds a corrupt record: {0}")]
    CorruptRow(String),
    /// The CCF shut down before the operation finished.
    #[error("the state store operation was interrupted by the CCF's shutdown")]
    Interrupted,
    /// The store file could not be opened.
    #[error("state store {}: {source}", .path.display())]
    File {
        /// The store file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A stored value cannot be written or read back.
    #[error("state store holds a corrupt record: {0}")]
    Corrupt(#[source] serde_json::Error),
    /// A queued revocation notice cannot be read back.
    #[error("state store holds a corrupt revocation notice {0:?}")]
    CorruptNotice(String),
    /// The token signing keys cannot be read, made or written.
    #[error(transparent)]
    TokenKeys(#[from] TokenError),
    /// The onboarding credential was used before.
    #[error("the onboarding credential was already used")]
    CredentialUsed,
    /// The invoker is not (or no longer) onboarded.
    #[error("the API invoker is not onboarded")]
    InvokerGone,
    /// The store file can be read or written by users other than its owner.
    #[error(
        "the state store {} has mode {mode:04o}, so other users can read the AEFPSKs in it; \
         fix with `chmod 600 {}`",
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
        StoreError::Postgres(PgError::from(e))
    }
}

/// A revocation notice waiting for the gateway's acknowledgement. It is given up at its
/// `not_after_unix_ms`.
#[derive(Clone, Debug, PartialEq)]
pub struct QueuedNotice {
    /// The notice, as it is sent.
    pub notice: RevocationNotice,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Not before this (Unix ms).
    pub next_attempt_at_ms: u64,
}

impl QueuedNotice {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(12 + self.notice.encoded_len());
        v.extend_from_slice(&self.attempts.to_be_bytes());
        v.extend_from_slice(&self.next_attempt_at_ms.to_be_bytes());
        self.notice.encode(&mut v).unwrap_or_default();
        v
    }

    fn decode(key: &str, b: &[u8]) -> Result<Self, StoreError> {
        let corrupt = || StoreError::CorruptNotice(key.to_string());
        let (attempts, rest) = b.split_at_checked(4).ok_or_else(corrupt)?;
        let (next, rest) = rest.split_at_checked(8).ok_or_else(corrupt)?;
        Ok(Self {
            attempts: u32::from_be_bytes(attempts.try_into().map_err(|_| corrupt())?),
            next_attempt_at_ms: u64::from_be_bytes(next.try_into().map_err(|_| corrupt())?),
            notice: RevocationNotice::decode(rest).map_err(|_| corrupt())?,
        })
    }
}

/// Puts `notices` into the revocation outbox of `tx`.
fn queue_in(tx: &redb::WriteTransaction, notices: &[RevocationNotice]) -> Result<(), StoreError> {
    let mut t = tx.open_table(REVOCATION_OUTBOX)?;
    for n in notices {
        let q = QueuedNotice {
            notice: n.clone(),
            attempts: 0,
            next_attempt_at_ms: 0,
        };
        t.insert(n.notice_id.as_str(), q.encode().as_slice())?;
    }
    Ok(())
}

/// An onboarded invoker.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InvokerRecord {
    /// Its id.
    pub api_invoker_id: ApiInvokerId,
    /// The certificate issued at onboarding.
    pub certificate_pem: String,
    /// Its public key.
    pub public_key_pem: String,
    /// When, Unix ms.
    pub onboarded_at_ms: u64,
    /// TS 29.222 apiInvokerInformation.
    pub information: String,
    /// TS 29.222 notificationDestination.
    pub notification_destination: String,
}

mod psk_hex {
    use super::*;
    use serde::{Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(psk: &Option<AefPsk>, s: S) -> Result<S::Ok, S::Error> {
        match psk {
            Some(p) => s.serialize_some(Zeroizing::new(hex::encode(p.expose())).as_str()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<AefPsk>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)?.map(Zeroizing::new) else {
            return Ok(None);
        };
        let bytes = Zeroizing::new(hex::decode(text.as_str()).map_err(D::Error::custom)?);
        AefPsk::from_slice(&bytes)
            .map(Some)
            .ok_or_else(|| D::Error::custom("AEFPSK of wrong length"))
    }
}

/// A security context: what the invoker negotiated for one AEF.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecurityContext {
    /// The invoker.
    pub api_invoker_id: ApiInvokerId,
    /// The AEF.
    pub aef_id: AefId,
    /// The domain owning the AEF.
    pub aef_ccf_id: CcfId,
    /// The selected method.
    pub method: SecurityMethod,
    /// The AEFPSK (PSK only).
    #[serde(with = "psk_hex", default)]
    pub aef_psk: Option<AefPsk>,
    /// Key id of the AEFPSK; empty for other methods.
    pub key_id: String,
    /// P0 the key is bound to.
    pub interface_canonical: String,
    /// APIs the invoker may call at the AEF.
    pub allowed_apis: Vec<ApiName>,
    /// When created, Unix ms.
    pub created_at_ms: u64,
    /// When it stops being valid, Unix ms.
    pub expires_at_ms: u64,
}

fn ctx_key(invoker: &ApiInvokerId, aef: &AefId) -> String {
    format!("{invoker}/{aef}")
}

fn foreign_key(home: &CcfId, invoker: &ApiInvokerId, aef: &AefId) -> String {
    // ids never contain '/'.
    format!("{home}/{invoker}/{aef}")
}

fn ctx_range(invoker: &ApiInvokerId) -> (String, String) {
    // ids never contain '/', and '0' is the character after '/'.
    (format!("{invoker}/"), format!("{invoker}0"))
}

fn encode<T: Serialize>(v: &T) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    serde_json::to_vec(v)
        .map(Zeroizing::new)
        .map_err(StoreError::Corrupt)
}

fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(StoreError::Corrupt)
}

/// What [`Store::context_lookup`] found.
#[derive(Debug)]
pub enum ContextLookup {
    /// The invoker is not onboarded.
    NoInvoker,
    /// The context.
    Found(SecurityContext),
    /// The invoker has contexts, none for this AEF.
    OtherAefsOnly,
    /// The invoker has no context at all.
    NoContext,
}

/// The CCF state store.
pub struct Store {
    backend: Backend,
    timings: StoreTimings,
}

/// The store's sizes, for the `/metrics` gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreSizes {
    /// Onboarded invokers.
    pub invokers: u64,
    /// Security contexts (expired ones until the purge).
    pub contexts: u64,
    /// Revocation notices not yet acknowledged by the gateway.
    pub revocations_pending: u64,
}

/// Where a [`Store`] keeps its state.
enum Backend {
    /// The embedded default: one redb file.
    Redb(Arc<Database>),
    /// A PostgreSQL database several replicas may share.
    Postgres(postgres::PgStore),
}

/// `capif_ccf_store_duration_seconds{operation}`: how long each store operation took, its
/// durable commit included. Cloning shares the histograms.
pub type StoreTimings =
    prometheus_client::metrics::family::Family<StoreOp, Histogram, fn() -> Histogram>;

/// The label of a store operation: the [`Store`] method's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct StoreOp {
    /// The method (`onboard`, `put_contexts_queueing`, ...).
    pub operation: &'static str,
}

/// Observes the time from its creation to its drop.
struct Timer<'a>(&'a StoreTimings, &'static str, std::time::Instant);

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.0
            .get_or_create(&StoreOp { operation: self.1 })
            .observe(self.2.elapsed().as_secs_f64());
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens (or creates, mode 0600) the redb store file. Refuses, with [`StoreError::Exposed`], a
    /// file that group or others may read or write.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let file_err = |source| StoreError::File {
            path: path.to_path_buf(),
            source,
        };
        let file = ccf_core::pki::open_private_file(path).map_err(file_err)?;
        // An existing file is refused, not fixed: it may already have been read.
        if let Some(mode) = ccf_core::pki::exposed_mode(&file).map_err(file_err)? {
            return Err(StoreError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
        let db = redb::Builder::new().create_file(file)?;
        let tx = db.begin_write()?;
        tx.open_table(INVOKERS)?;
        tx.open_table(CONTEXTS)?;
        tx.open_table(CREDENTIALS)?;
        tx.open_table(FOREIGN_REVOCATIONS)?;
        tx.open_table(REVOCATION_OUTBOX)?;
        tx.commit()?;
        Ok(Self::with(Backend::Redb(Arc::new(db))))
    }

    /// Connects to a PostgreSQL database (at most `pool_size` connections) and applies the
    /// CCF's schema migrations it lacks (one replica at a time).
    pub async fn connect(url: &DatabaseUrl, pool_size: usize) -> Result<Self, StoreError> {
        Ok(Self::with(Backend::Postgres(
            postgres::PgStore::connect(url, pool_size).await?,
        )))
    }

    /// The store `config` names: the redb file `redb_file` (the default) or the database.
    pub async fn from_config(config: &StoreConfig, redb_file: &Path) -> Result<Self, StoreError> {
        match config.backend {
            StoreBackend::Redb => Self::open(redb_file),
            StoreBackend::Postgres => {
                let url = config.url.as_ref().ok_or_else(|| {
                    StoreError::Postgres(PgError::Config(
                        "store.backend = \"postgres\" needs store.url".into(),
                    ))
                })?;
                Self::connect(url, config.pool_size).await
            }
        }
    }

    fn with(backend: Backend) -> Self {
        Self {
            backend,
            timings: StoreTimings::new_with_constructor(latency_histogram),
        }
    }

    /// What the `/metrics` gauges show, read synchronously at scrape time: from the redb file
    /// now; from PostgreSQL, the counts a background query fetched at most a second before (the
    /// first scrape after start has none yet). `None` when the store cannot be read.
    pub fn sizes(&self) -> Option<StoreSizes> {
        match &self.backend {
            Backend::Redb(db) => redb_sizes(db).ok(),
            Backend::Postgres(pg) => pg.sizes(),
        }
    }

    /// Which engine holds the state.
    pub fn backend(&self) -> StoreBackend {
        match self.backend {
            Backend::Redb(_) => StoreBackend::Redb,
            Backend::Postgres(_) => StoreBackend::Postgres,
        }
    }

    /// The operations' latency histograms (registered by the CCF's metrics).
    pub fn timings(&self) -> &StoreTimings {
        &self.timings
    }

    fn timed(&self, operation: &'static str) -> Timer<'_> {
        Timer(&self.timings, operation, std::time::Instant::now())
    }

    /// Records a new invoker and marks its onboarding credential (by digest) used, atomically.
    /// A credential already used (at any replica sharing the database) is refused with
    /// [`StoreError::CredentialUsed`].
    pub async fn onboard(
        &self,
        credential_digest: &str,
        rec: &InvokerRecord,
    ) -> Result<(), StoreError> {
        let _timer = self.timed("onboard");
        match &self.backend {
            Backend::Redb(db) => redb_onboard(db, credential_digest, rec),
            Backend::Postgres(pg) => pg.onboard(credential_digest, rec).await,
        }
    }

    /// Whether a credential digest was used.
    pub async fn credential_used(&self, credential_digest: &str) -> Result<bool, StoreError> {
        let _timer = self.timed("credential_used");
        match &self.backend {
            Backend::Redb(db) => redb_credential_used(db, credential_digest),
            Backend::Postgres(pg) => pg.credential_used(credential_digest).await,
        }
    }

    /// An invoker's record.
    pub async fn invoker(&self, id: &ApiInvokerId) -> Result<Option<InvokerRecord>, StoreError> {
        let _timer = self.timed("invoker");
        match &self.backend {
            Backend::Redb(db) => redb_invoker(db, id),
            Backend::Postgres(pg) => pg.invoker(id).await,
        }
    }

    /// Number of onboarded invokers.
    pub async fn invoker_count(&self) -> Result<u64, StoreError> {
        let _timer = self.timed("invoker_count");
        match &self.backend {
            Backend::Redb(db) => redb_invoker_count(db),
            Backend::Postgres(pg) => pg.count(postgres::Counted::Invokers).await,
        }
    }

    /// Number of stored security contexts.
    pub async fn context_count(&self) -> Result<u64, StoreError> {
        let _timer = self.timed("context_count");
        match &self.backend {
            Backend::Redb(db) => redb_context_count(db),
            Backend::Postgres(pg) => pg.count(postgres::Counted::Contexts).await,
        }
    }

    /// Removes an invoker and all its contexts; returns the removed contexts, or `InvokerGone`.
    pub async fn offboard(&self, id: &ApiInvokerId) -> Result<Vec<SecurityContext>, StoreError> {
        self.offboard_queueing(id, |_| Vec::new()).await
    }

    /// [`Self::offboard`], and in the same transaction queues the notices `notices` makes of
    /// the removed contexts for the gateway.
    pub async fn offboard_queueing(
        &self,
        id: &ApiInvokerId,
        notices: impl FnOnce(&[SecurityContext]) -> Vec<RevocationNotice> + Send,
    ) -> Result<Vec<SecurityContext>, StoreError> {
        let _timer = self.timed("offboard_queueing");
        match &self.backend {
            Backend::Redb(db) => redb_offboard_queueing(db, id, notices),
            Backend::Postgres(pg) => pg.offboard_queueing(id, notices).await,
        }
    }

    /// Stores contexts of an onboarded invoker, replacing those for the same AEFs, atomically.
    /// Returns the replaced contexts.
    pub async fn put_contexts(
        &self,
        id: &ApiInvokerId,
        contexts: &[SecurityContext],
    ) -> Result<Vec<SecurityContext>, StoreError> {
        self.put_contexts_queueing(id, contexts, |_| Vec::new())
            .await
    }

    /// [`Self::put_contexts`], and in the same transaction queues the notices `notices` makes
    /// of the replaced contexts for the gateway.
    pub async fn put_contexts_queueing(
        &self,
        id: &ApiInvokerId,
        contexts: &[SecurityContext],
        notices: impl FnOnce(&[SecurityContext]) -> Vec<RevocationNotice> + Send,
    ) -> Result<Vec<SecurityContext>, StoreError> {
        let _timer = self.timed("put_contexts_queueing");
        match &self.backend {
            Backend::Redb(db) => redb_put_contexts_queueing(db, id, contexts, notices),
            Backend::Postgres(pg) => pg.put_contexts_queueing(id, contexts, notices).await,
        }
    }

    /// The context of an invoker for one AEF.
    pub async fn context(
        &self,
        id: &ApiInvokerId,
        aef: &AefId,
    ) -> Result<Option<SecurityContext>, StoreError> {
        let _timer = self.timed("context");
        match &self.backend {
            Backend::Redb(db) => redb_context(db, id, aef),
            Backend::Postgres(pg) => pg.context(id, aef).await,
        }
    }

    /// An invoker's context for `aef`, and what is known when there is none, in ONE read
    /// transaction (PostgreSQL: one statement): the request paths (CAPIF-3, the partner path)
    /// ask this once per request instead of reading the invoker and the context in two.
    pub async fn context_lookup(
        &self,
        id: &ApiInvokerId,
        aef: &AefId,
    ) -> Result<ContextLookup, StoreError> {
        let _timer = self.timed("context_lookup");
        match &self.backend {
            Backend::Redb(db) => redb_context_lookup(db, id, aef),
            Backend::Postgres(pg) => pg.context_lookup(id, aef).await,
        }
    }

    /// Every context of an invoker, by AEF id.
    pub async fn contexts_of(&self, id: &ApiInvokerId) -> Result<Vec<SecurityContext>, StoreError> {
        let _timer = self.timed("contexts_of");
        match &self.backend {
            Backend::Redb(db) => redb_contexts_of(db, id),
            Backend::Postgres(pg) => pg.contexts_of(id).await,
        }
    }

    /// Removes an invoker's contexts (for one AEF, or all); returns what was removed.
    pub async fn remove_contexts(
        &self,
        id: &ApiInvokerId,
        aef: Option<&AefId>,
    ) -> Result<Vec<SecurityContext>, StoreError> {
        self.remove_contexts_queueing(id, aef, |_| Vec::new()).await
    }

    /// [`Self::remove_contexts`], and in the same transaction queues the notices `notices` makes
    /// of the removed contexts for the gateway: a revocation is on disk with its notice, or not
    /// at all.
    pub async fn remove_contexts_queueing(
        &self,
        id: &ApiInvokerId,
        aef: Option<&AefId>,
        notices: impl FnOnce(&[SecurityContext]) -> Vec<RevocationNotice> + Send,
    ) -> Result<Vec<SecurityContext>, StoreError> {
        let _timer = self.timed("remove_contexts_queueing");
        match &self.backend {
            Backend::Redb(db) => redb_remove_contexts_queueing(db, id, aef, notices),
            Backend::Postgres(pg) => pg.remove_contexts_queueing(id, aef, notices).await,
        }
    }

    /// Records that the invoker `invoker` of domain `home` is refused at `aefs` (of this domain)
    /// until `until_ms` (Unix ms), in one write transaction. A longer refusal already recorded
    /// for an AEF is kept.
    pub async fn revoke_foreign(
        &self,
        home: &CcfId,
        invoker: &ApiInvokerId,
        aefs: &[AefId],
        until_ms: u64,
    ) -> Result<(), StoreError> {
        let _timer = self.timed("revoke_foreign");
        match &self.backend {
            Backend::Redb(db) => redb_revoke_foreign(db, home, invoker, aefs, until_ms),
            Backend::Postgres(pg) => pg.revoke_foreign(home, invoker, aefs, until_ms).await,
        }
    }

    /// Every revocation notice the gateway has not acknowledged, by notice id.
    pub async fn revocation_outbox(&self) -> Result<Vec<QueuedNotice>, StoreError> {
        let _timer = self.timed("revocation_outbox");
        match &self.backend {
            Backend::Redb(db) => redb_revocation_outbox(db),
            Backend::Postgres(pg) => pg.revocation_outbox().await,
        }
    }

    /// Deletes a queued notice (acknowledged, or given up).
    pub async fn revocation_done(&self, notice_id: &str) -> Result<(), StoreError> {
        let _timer = self.timed("revocation_done");
        match &self.backend {
            Backend::Redb(db) => redb_revocation_done(db, notice_id),
            Backend::Postgres(pg) => pg.revocation_done(notice_id).await,
        }
    }

    /// Stores a queued notice's attempts and next attempt time. Not durable on its own: after a
    /// crash the notice is simply tried again at once.
    pub async fn revocation_reschedule(&self, q: &QueuedNotice) -> Result<(), StoreError> {
        let _timer = self.timed("revocation_reschedule");
        match &self.backend {
            Backend::Redb(db) => redb_revocation_reschedule(db, q),
            Backend::Postgres(pg) => pg.revocation_reschedule(q).await,
        }
    }

    /// Until when (Unix ms) the invoker `invoker` of domain `home` is refused at `aef`, if it is
    /// refused at `now_ms`.
    pub async fn foreign_revoked_until(
        &self,
        home: &CcfId,
        invoker: &ApiInvokerId,
        aef: &AefId,
        now_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        let _timer = self.timed("foreign_revoked_until");
        match &self.backend {
            Backend::Redb(db) => redb_foreign_revoked_until(db, home, invoker, aef, now_ms),
            Backend::Postgres(pg) => pg.foreign_revoked_until(home, invoker, aef, now_ms).await,
        }
    }

    /// Deletes every security context that expired at or before `cutoff_ms` (Unix ms), and the
    /// refusals of foreign invokers that ended by then, in one write transaction, and returns how
    /// many contexts it deleted. Contexts that expire later, invokers and credentials are not
    /// touched.
    pub async fn purge_expired(&self, cutoff_ms: u64) -> Result<u64, StoreError> {
        let _timer = self.timed("purge_expired");
        match &self.backend {
            Backend::Redb(db) => {
                // A durable redb commit over many records blocks on fsync: off the workers.
                let db = db.clone();
                match tokio::task::spawn_blocking(move || redb_purge_expired(&db, cutoff_ms)).await
                {
                    Ok(r) => r,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(_) => Err(StoreError::Interrupted),
                }
            }
            Backend::Postgres(pg) => pg.purge_expired(cutoff_ms).await,
        }
    }

    /// The token signing keys, a first one generated when there is none. With redb they live in
    /// `state_dir`'s key file (one process). With PostgreSQL they live in the database, so every
    /// replica signs with and publishes the same set; replicas starting together generate one
    /// first key between them (the table is locked while it is read and written).
    pub async fn token_keys(
        &self,
        state_dir: &Path,
        token_lifetime_secs: u64,
        now_ms: u64,
    ) -> Result<TokenKeys, StoreError> {
        match &self.backend {
            Backend::Redb(_) => Ok(TokenKeys::load_or_generate(
                state_dir,
                token_lifetime_secs,
                now_ms,
            )?),
            Backend::Postgres(pg) => {
                let stored = pg.token_keys_or_first(now_ms).await?;
                Ok(TokenKeys::from_stored(stored, token_lifetime_secs)?)
            }
        }
    }

    /// Rotates the token signing key ([`ccf_core::token::rotated`]) where the keys live, and
    /// makes `keys` hold the new set. With PostgreSQL the rotation is one transaction on the
    /// shared set (concurrent rotations at two replicas both take effect, one after the other),
    /// and the other replicas see it at their next [`Store::refresh_token_keys`]. Returns the new
    /// current key id.
    pub async fn rotate_token_key(
        &self,
        keys: &TokenKeys,
        token_lifetime_secs: u64,
        now_ms: u64,
    ) -> Result<String, StoreError> {
        let _timer = self.timed("rotate_token_key");
        match &self.backend {
            Backend::Redb(_) => Ok(keys.rotate(now_ms)?),
            Backend::Postgres(pg) => {
                let fresh = TokenKeys::generate_key(now_ms)?;
                let kid = fresh.kid.clone();
                let retention = TokenKeys::retention_ms(token_lifetime_secs);
                let set = pg.rotate_token_key(fresh, now_ms, retention).await?;
                keys.replace(set)?;
                Ok(kid)
            }
        }
    }

    /// Makes `keys` hold the set as stored now: what another replica rotated. Nothing to do
    /// with redb, whose one process holds the set.
    pub async fn refresh_token_keys(&self, keys: &TokenKeys) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(_) => Ok(()),
            Backend::Postgres(pg) => Ok(keys.replace(pg.token_keys().await?)?),
        }
    }
}

// The redb backend: each operation one redb transaction, write transactions committed durably.

fn redb_sizes(db: &Database) -> Result<StoreSizes, StoreError> {
    let tx = db.begin_read()?;
    Ok(StoreSizes {
        invokers: tx.open_table(INVOKERS)?.len()?,
        contexts: tx.open_table(CONTEXTS)?.len()?,
        revocations_pending: tx.open_table(REVOCATION_OUTBOX)?.len()?,
    })
}

fn redb_onboard(
    db: &Database,
    credential_digest: &str,
    rec: &InvokerRecord,
) -> Result<(), StoreError> {
    let tx = db.begin_write()?;
    {
        let mut creds = tx.open_table(CREDENTIALS)?;
        if creds.get(credential_digest)?.is_some() {
            return Err(StoreError::CredentialUsed);
        }
        creds.insert(credential_digest, rec.api_invoker_id.as_str())?;
        let mut inv = tx.open_table(INVOKERS)?;
        inv.insert(rec.api_invoker_id.as_str(), encode(rec)?.as_slice())?;
    }
    tx.commit()?;
    Ok(())
}

fn redb_credential_used(db: &Database, credential_digest: &str) -> Result<bool, StoreError> {
    let tx = db.begin_read()?;
    Ok(tx
        .open_table(CREDENTIALS)?
        .get(credential_digest)?
        .is_some())
}

fn redb_invoker(db: &Database, id: &ApiInvokerId) -> Result<Option<InvokerRecord>, StoreError> {
    let tx = db.begin_read()?;
    let t = tx.open_table(INVOKERS)?;
    t.get(id.as_str())?.map(|v| decode(v.value())).transpose()
}

fn redb_invoker_count(db: &Database) -> Result<u64, StoreError> {
    let tx = db.begin_read()?;
    Ok(tx.open_table(INVOKERS)?.len()?)
}

fn redb_context_count(db: &Database) -> Result<u64, StoreError> {
    let tx = db.begin_read()?;
    Ok(tx.open_table(CONTEXTS)?.len()?)
}

fn redb_offboard_queueing(
    db: &Database,
    id: &ApiInvokerId,
    notices: impl FnOnce(&[SecurityContext]) -> Vec<RevocationNotice>,
) -> Result<Vec<SecurityContext>, StoreError> {
    let tx = db.begin_write()?;
    let removed = {
        let mut inv = tx.open_table(INVOKERS)?;
        if inv.remove(id.as_str())?.is_none() {
            return Err(StoreError::InvokerGone);
        }
        remove_in(&tx, id, None)?
    };
    queue_in(&tx, &notices(&removed))?;
    tx.commit()?;
    Ok(removed)
}

fn remove_in(
    tx: &redb::WriteTransaction,
    id: &ApiInvokerId,
    aef: Option<&AefId>,
) -> Result<Vec<SecurityContext>, StoreError> {
    let mut t = tx.open_table(CONTEXTS)?;
    let keys: Vec<String> = match aef {
        Some(a) => vec![ctx_key(id, a)],
        None => {
            let (lo, hi) = ctx_range(id);
            t.range(lo.as_str()..hi.as_str())?
                .map(|r| r.map(|(k, _)| k.value().to_string()))
                .collect::<Result<_, _>>()?
        }
    };
    let mut removed = Vec::new();
    for k in keys {
        if let Some(v) = t.remove(k.as_str())? {
            removed.push(decode(v.value())?);
        }
    }
    Ok(removed)
}

fn redb_put_contexts_queueing(
    db: &Database,
    id: &ApiInvokerId,
    contexts: &[SecurityContext],
    notices: impl FnOnce(&[SecurityContext]) -> Vec<RevocationNotice>,
) -> Result<Vec<SecurityContext>, StoreError> {
    let tx = db.begin_write()?;
    let mut replaced = Vec::new();
    {
        if tx.open_table(INVOKERS)?.get(id.as_str())?.is_none() {
            return Err(StoreError::InvokerGone);
        }
        let mut t = tx.open_table(CONTEXTS)?;
        for c in contexts {
            let key = ctx_key(id, &c.aef_id);
            if let Some(old) = t.insert(key.as_str(), encode(c)?.as_slice())? {
                replaced.push(decode(old.value())?);
            }
        }
    }
    queue_in(&tx, &notices(&replaced))?;
    tx.commit()?;
    Ok(replaced)
}

fn redb_context(
    db: &Database,
    id: &ApiInvokerId,
    aef: &AefId,
) -> Result<Option<SecurityContext>, StoreError> {
    let tx = db.begin_read()?;
    let t = tx.open_table(CONTEXTS)?;
    t.get(ctx_key(id, aef).as_str())?
        .map(|v| decode(v.value()))
        .transpose()
}

fn redb_context_lookup(
    db: &Database,
    id: &ApiInvokerId,
    aef: &AefId,
) -> Result<ContextLookup, StoreError> {
    let tx = db.begin_read()?;
    if tx.open_table(INVOKERS)?.get(id.as_str())?.is_none() {
        return Ok(ContextLookup::NoInvoker);
    }
    let t = tx.open_table(CONTEXTS)?;
    if let Some(v) = t.get(ctx_key(id, aef).as_str())? {
        return Ok(ContextLookup::Found(decode(v.value())?));
    }
    let (lo, hi) = ctx_range(id);
    Ok(if t.range(lo.as_str()..hi.as_str())?.next().is_some() {
        ContextLookup::OtherAefsOnly
    } else {
        ContextLookup::NoContext
    })
}

fn redb_contexts_of(db: &Database, id: &ApiInvokerId) -> Result<Vec<SecurityContext>, StoreError> {
    let tx = db.begin_read()?;
    let t = tx.open_table(CONTEXTS)?;
    let (lo, hi) = ctx_range(id);
    t.range(lo.as_str()..hi.as_str())?
        .map(|r| {
            r.map_err(StoreError::from)
                .and_then(|(_, v)| decode(v.value()))
        })
        .collect()
}

fn redb_remove_contexts_queueing(
    db: &Database,
    id: &ApiInvokerId,
    aef: Option<&AefId>,
    notices: impl FnOnce(&[SecurityContext]) -> Vec<RevocationNotice>,
) -> Result<Vec<SecurityContext>, StoreError> {
    let tx = db.begin_write()?;
    let removed = remove_in(&tx, id, aef)?;
    queue_in(&tx, &notices(&removed))?;
    tx.commit()?;
    Ok(removed)
}

fn redb_revoke_foreign(
    db: &Database,
    home: &CcfId,
    invoker: &ApiInvokerId,
    aefs: &[AefId],
    until_ms: u64,
) -> Result<(), StoreError> {
    let tx = db.begin_write()?;
    {
        let mut t = tx.open_table(FOREIGN_REVOCATIONS)?;
        for aef in aefs {
            let key = foreign_key(home, invoker, aef);
            let held = t.get(key.as_str())?.map(|v| v.value()).unwrap_or(0);
            t.insert(key.as_str(), held.max(until_ms))?;
        }
    }
    tx.commit()?;
    Ok(())
}

fn redb_revocation_outbox(db: &Database) -> Result<Vec<QueuedNotice>, StoreError> {
    let tx = db.begin_read()?;
    let t = tx.open_table(REVOCATION_OUTBOX)?;
    let mut out = Vec::new();
    for r in t.iter()? {
        let (k, v) = r?;
        out.push(QueuedNotice::decode(k.value(), v.value())?);
    }
    Ok(out)
}

fn redb_revocation_done(db: &Database, notice_id: &str) -> Result<(), StoreError> {
    let tx = db.begin_write()?;
    tx.open_table(REVOCATION_OUTBOX)?.remove(notice_id)?;
    tx.commit()?;
    Ok(())
}

fn redb_revocation_reschedule(db: &Database, q: &QueuedNotice) -> Result<(), StoreError> {
    let mut tx = db.begin_write()?;
    tx.set_durability(redb::Durability::None)?;
    {
        let mut t = tx.open_table(REVOCATION_OUTBOX)?;
        let key = q.notice.notice_id.as_str();
        if t.get(key)?.is_some() {
            t.insert(key, q.encode().as_slice())?;
        }
    }
    tx.commit()?;
    Ok(())
}

fn redb_foreign_revoked_until(
    db: &Database,
    home: &CcfId,
    invoker: &ApiInvokerId,
    aef: &AefId,
    now_ms: u64,
) -> Result<Option<u64>, StoreError> {
    let tx = db.begin_read()?;
    let t = tx.open_table(FOREIGN_REVOCATIONS)?;
    Ok(t.get(foreign_key(home, invoker, aef).as_str())?
        .map(|v| v.value())
        .filter(|until| *until > now_ms))
}

fn redb_purge_expired(db: &Database, cutoff_ms: u64) -> Result<u64, StoreError> {
    // Only the expiry is read, so no AEFPSK is decoded into memory to decide.
    #[derive(Deserialize)]
    struct Expiry {
        expires_at_ms: u64,
    }
    let tx = db.begin_write()?;
    let mut purged = 0u64;
    let mut unreadable = Vec::new();
    {
        let mut t = tx.open_table(CONTEXTS)?;
        t.retain(|key, value| match serde_json::from_slice::<Expiry>(value) {
            Ok(e) if e.expires_at_ms <= cutoff_ms => {
                purged += 1;
                false
            }
            Ok(_) => true,
            // Its expiry is unknown, so it might be live: keep it. The lookup that reads it
            // reports it as corrupt.
            Err(_) => {
                unreadable.push(key.to_string());
                true
            }
        })?;
    }
    // Refusals of foreign invokers that ended are deleted in the same transaction.
    tx.open_table(FOREIGN_REVOCATIONS)?
        .retain(|_, until| until > cutoff_ms)?;
    tx.commit()?;
    if !unreadable.is_empty() {
        // Keys are "<apiInvokerId>/<aefId>": ids, not secrets.
        tracing::warn!(
            records = ?unreadable,
            "security contexts without a readable expiry were kept by the purge"
        );
    }
    Ok(purged)
}

#[cfg(test)]
mod tests {
    //! The operations' tests run against both backends in `tests/store.rs`; this one is about
    //! the redb file alone.
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn store_file_is_created_owner_only_and_an_exposed_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        drop(Store::open(&path).unwrap());
        assert_eq!(mode(&path), 0o600);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        match Store::open(&path) {
            Err(StoreError::Exposed { path: p, mode: m }) => {
                assert_eq!((p.as_path(), m), (path.as_path(), 0o640));
            }
            other => panic!("expected Exposed, got {:?}", other.map(|_| ())),
        }
        assert_eq!(mode(&path), 0o640, "refused, not silently fixed");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Store::open(&path).expect("opens again once fixed");
    }
}
