//! The CCF store's PostgreSQL backend: the same operations as the redb file, on real tables
//! (`invokers`, `used_onboarding_credentials`, `security_contexts`, `foreign_revocations`,
//! `revocation_outbox`) that several CCF replicas may share.
//!
//! Each operation is one transaction, committed (durably: the server's default
//! `synchronous_commit`) before it returns, like a redb write transaction. Across replicas:
//! a used onboarding credential is refused by the primary key of `used_onboarding_credentials`
//! (the second insert waits for the first and then conflicts; no read-then-write race), and every
//! operation that reads an invoker's contexts to change them first locks the invoker's row
//! (`SELECT ... FOR UPDATE`), so the contexts it replaces or removes, and the revocation notices
//! it queues for them, are exactly what was there. `revoke_foreign` keeps the longer refusal in
//! one `INSERT ... ON CONFLICT` statement.
//!
//! The token signing keys are rows of `token_signing_keys`: a rotation locks the table, so two
//! replicas rotating at once both take effect, one after the other. The registry has no dynamic
//! part: it is the `[[aef]]` list of the configuration, which replicas share.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capif_proto::v1::RevocationNotice;
use ccf_core::ids::{AefId, ApiInvokerId, ApiName, CcfId};
use ccf_core::kdf::AefPsk;
use ccf_core::pg::{DatabaseUrl, PgError, Pool, Secret};
use ccf_core::registry::SecurityMethod;
use ccf_core::token::{StoredKey, TokenKeys};
use deadpool_postgres::GenericClient;
use prost::Message;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use zeroize::Zeroizing;

use super::{ContextLookup, InvokerRecord, QueuedNotice, SecurityContext, StoreError, StoreSizes};

/// The component name of the CCF's schema in `schema_migrations`.
pub(super) const COMPONENT: &str = "ccf";

/// The CCF's schema, version by version (never edit one that shipped: add the next).
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: the state the redb file holds.
    "CREATE TABLE invokers (
         api_invoker_id text PRIMARY KEY,
         certificate_pem text NOT NULL,
         public_key_pem text NOT NULL,
         onboarded_at_ms bigint NOT NULL,
         information text NOT NULL,
         notification_destination text NOT NULL);
     CREATE TABLE used_onboarding_credentials (
         credential_digest text PRIMARY KEY,
         api_invoker_id text NOT NULL);
     CREATE TABLE security_contexts (
         api_invoker_id text NOT NULL REFERENCES invokers (api_invoker_id),
         aef_id text NOT NULL,
         aef_ccf_id text NOT NULL,
         method text NOT NULL,
         aef_psk bytea,
         key_id text NOT NULL,
         interface_canonical text NOT NULL,
         allowed_apis text[] NOT NULL,
         created_at_ms bigint NOT NULL,
         expires_at_ms bigint NOT NULL,
         PRIMARY KEY (api_invoker_id, aef_id));
     CREATE INDEX security_contexts_expiry ON security_contexts (expires_at_ms);
     CREATE TABLE foreign_revocations (
         home_ccf_id text NOT NULL,
         api_invoker_id text NOT NULL,
         aef_id text NOT NULL,
         until_ms bigint NOT NULL,
         PRIMARY KEY (home_ccf_id, api_invoker_id, aef_id));
     CREATE TABLE revocation_outbox (
         notice_id text PRIMARY KEY,
         attempts integer NOT NULL,
         next_attempt_at_ms bigint NOT NULL,
         notice bytea NOT NULL);",
    // 2: the token signing keys, shared by every replica (oldest first by `position`; the
    // current key is the one never retired).
    "CREATE TABLE token_signing_keys (
         kid text PRIMARY KEY,
         pkcs8_pem text NOT NULL,
         created_unix_ms bigint NOT NULL,
         retired_unix_ms bigint,
         position bigserial NOT NULL);",
];

const INVOKER_COLS: &str = "api_invoker_id, certificate_pem, public_key_pem, onboarded_at_ms, \
                            information, notification_destination";
const CTX_COLS: &str = "api_invoker_id, aef_id, aef_ccf_id, method, aef_psk, key_id, \
                        interface_canonical, allowed_apis, created_at_ms, expires_at_ms";

/// Unix ms as PostgreSQL's bigint (saturating: no clock reaches 2^63 ms).
fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn ums(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn method_text(m: SecurityMethod) -> &'static str {
    match m {
        SecurityMethod::Psk => "PSK",
        SecurityMethod::Pki => "PKI",
        SecurityMethod::Oauth => "OAUTH",
    }
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::CorruptRow(what.to_string())
}

fn invoker_from(row: &Row) -> Result<InvokerRecord, StoreError> {
    Ok(InvokerRecord {
        api_invoker_id: ApiInvokerId::new(row.try_get::<_, String>(0)?).map_err(corrupt)?,
        certificate_pem: row.try_get(1)?,
        public_key_pem: row.try_get(2)?,
        onboarded_at_ms: ums(row.try_get(3)?),
        information: row.try_get(4)?,
        notification_destination: row.try_get(5)?,
    })
}

/// The context in `row`'s columns `at..at + 10` (in [`CTX_COLS`] order).
fn context_from(row: &Row, at: usize) -> Result<SecurityContext, StoreError> {
    let method: String = row.try_get(at + 3)?;
    let method = match method.as_str() {
        "PSK" => SecurityMethod::Psk,
        "PKI" => SecurityMethod::Pki,
        "OAUTH" => SecurityMethod::Oauth,
        other => return Err(corrupt(format!("unknown security method {other:?}"))),
    };
    let psk: Option<Vec<u8>> = row.try_get(at + 4)?;
    let aef_psk = match psk.map(Zeroizing::new) {
        None => None,
        Some(b) => Some(AefPsk::from_slice(&b).ok_or_else(|| corrupt("AEFPSK of wrong length"))?),
    };
    let apis: Vec<String> = row.try_get(at + 7)?;
    Ok(SecurityContext {
        api_invoker_id: ApiInvokerId::new(row.try_get::<_, String>(at)?).map_err(corrupt)?,
        aef_id: AefId::new(row.try_get::<_, String>(at + 1)?).map_err(corrupt)?,
        aef_ccf_id: CcfId::new(row.try_get::<_, String>(at + 2)?).map_err(corrupt)?,
        method,
        aef_psk,
        key_id: row.try_get(at + 5)?,
        interface_canonical: row.try_get(at + 6)?,
        allowed_apis: apis
            .into_iter()
            .map(ApiName::new)
            .collect::<Result<_, _>>()
            .map_err(corrupt)?,
        created_at_ms: ums(row.try_get(at + 8)?),
        expires_at_ms: ums(row.try_get(at + 9)?),
    })
}

fn contexts_from(rows: &[Row]) -> Result<Vec<SecurityContext>, StoreError> {
    let mut out = rows
        .iter()
        .map(|r| context_from(r, 0))
        .collect::<Result<Vec<_>, _>>()?;
    // The redb file's key order, so both backends answer alike.
    out.sort_by(|a, b| a.aef_id.as_str().cmp(b.aef_id.as_str()));
    Ok(out)
}

/// The PostgreSQL store: a pool of connections to one database.
pub(super) struct PgStore {
    pool: Pool,
    sizes: Arc<Mutex<SizesCache>>,
}

/// The last sizes read for `/metrics`, and when they were last asked for.
#[derive(Default)]
struct SizesCache {
    value: Option<StoreSizes>,
    asked: Option<Instant>,
}

fn lock(m: &Mutex<SizesCache>) -> std::sync::MutexGuard<'_, SizesCache> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn query_sizes(pool: &Pool) -> Result<StoreSizes, StoreError> {
    let c = pool.get().await.map_err(PgError::from)?;
    let row = c
        .query_one(
            "SELECT (SELECT count(*) FROM invokers), (SELECT count(*) FROM security_contexts), \
             (SELECT count(*) FROM revocation_outbox)",
            &[],
        )
        .await?;
    Ok(StoreSizes {
        invokers: ums(row.try_get(0)?),
        contexts: ums(row.try_get(1)?),
        revocations_pending: ums(row.try_get(2)?),
    })
}

impl PgStore {
    /// Connects (at most `pool_size` connections) and brings the schema up to date.
    pub(super) async fn connect(url: &DatabaseUrl, pool_size: usize) -> Result<Self, StoreError> {
        let pool = ccf_core::pg::pool(url, pool_size)?;
        ccf_core::pg::migrate(&pool, COMPONENT, MIGRATIONS)
            .await
            .map_err(|e| match e {
                PgError::Db(m) => PgError::Db(format!("{m} (store.url {})", url.redacted())),
                e => e,
            })?;
        Ok(Self {
            pool,
            sizes: Arc::default(),
        })
    }

    /// The cached sizes; asks for fresh ones in the background when they are a second old.
    pub(super) fn sizes(&self) -> Option<StoreSizes> {
        let mut cache = lock(&self.sizes);
        let stale = cache
            .asked
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if stale && let Ok(rt) = tokio::runtime::Handle::try_current() {
            cache.asked = Some(Instant::now());
            let (pool, cell) = (self.pool.clone(), self.sizes.clone());
            rt.spawn(async move {
                let fresh = query_sizes(&pool).await.ok();
                lock(&cell).value = fresh;
            });
        }
        cache.value
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await.map_err(PgError::from)?)
    }

    pub(super) async fn onboard(
        &self,
        credential_digest: &str,
        rec: &InvokerRecord,
    ) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // The primary key decides, also between replicas: a concurrent insert of the same
        // digest waits for this transaction and then conflicts.
        match tx
            .execute(
                "INSERT INTO used_onboarding_credentials (credential_digest, api_invoker_id) \
                 VALUES ($1, $2)",
                &[&Secret(credential_digest), &rec.api_invoker_id.as_str()],
            )
            .await
        {
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                return Err(StoreError::CredentialUsed);
            }
            r => r?,
        };
        tx.execute(
            &format!(
                "INSERT INTO invokers ({INVOKER_COLS}) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (api_invoker_id) DO UPDATE SET \
                 certificate_pem = EXCLUDED.certificate_pem, \
                 public_key_pem = EXCLUDED.public_key_pem, \
                 onboarded_at_ms = EXCLUDED.onboarded_at_ms, \
                 information = EXCLUDED.information, \
                 notification_destination = EXCLUDED.notification_destination"
            ),
            &[
                &rec.api_invoker_id.as_str(),
                &rec.certificate_pem,
                &rec.public_key_pem,
                &ms(rec.onboarded_at_ms),
                &rec.information,
                &rec.notification_destination,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn credential_used(
        &self,
        credential_digest: &str,
    ) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM used_onboarding_credentials \
                 WHERE credential_digest = $1)",
                &[&Secret(credential_digest)],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    pub(super) async fn invoker(
        &self,
        id: &ApiInvokerId,
    ) -> Result<Option<InvokerRecord>, StoreError> {
        let c = self.client().await?;
        let stmt = c
            .prepare_cached(&format!(
                "SELECT {INVOKER_COLS} FROM invokers WHERE api_invoker_id = $1"
            ))
            .await?;
        let row = c.query_opt(&stmt, &[&id.as_str()]).await?;
        row.as_ref().map(invoker_from).transpose()
    }

    pub(super) async fn count(&self, table: Counted) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let sql = match table {
            Counted::Invokers => "SELECT count(*) FROM invokers",
            Counted::Contexts => "SELECT count(*) FROM security_contexts",
        };
        let n: i64 = c.query_one(sql, &[]).await?.try_get(0)?;
        Ok(ums(n))
    }

    pub(super) async fn offboard_queueing(
        &self,
        id: &ApiInvokerId,
        notices: impl FnOnce(&[SecurityContext]) -> Vec<RevocationNotice> + Send,
    ) -> Result<Vec<SecurityContext>, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        if !lock_invoker(&tx, id).await? {
            return Err(StoreError::InvokerGone);
        }
        let rows = tx
            .query(
                &format!(
                    "DELETE FROM security_contexts WHERE api_invoker_id = $1 RETURNING {CTX_COLS}"
                ),
                &[&id.as_str()],
            )
            .await?;
        let removed = contexts_from(&rows)?;
        tx.execute(
            "DELETE FROM invokers WHERE api_invoker_id = $1",
            &[&id.as_str()],
        )
        .await?;
        queue_in(&tx, &notices(&removed)).await?;
        tx.commit().await?;
        Ok(removed)
    }

    pub(super) async fn put_contexts_queueing(
        &self,
        id: &ApiInvokerId,
        contexts: &[SecurityContext],
        notices: impl FnOnce(&[SecurityContext]) -> Vec<RevocationNotice> + Send,
    ) -> Result<Vec<SecurityContext>, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        if !lock_invoker(&tx, id).await? {
            return Err(StoreError::InvokerGone);
        }
        let mut replaced = Vec::new();
        for ctx in contexts {
            // The invoker's row lock serialises writers of its contexts, so what is read here
            // is what the upsert replaces.
            let old = tx
                .query_opt(
                    &format!(
                        "SELECT {CTX_COLS} FROM security_contexts \
                         WHERE api_invoker_id = $1 AND aef_id = $2"
                    ),
                    &[&id.as_str(), &ctx.aef_id.as_str()],
                )
                .await?;
            if let Some(row) = old {
                replaced.push(context_from(&row, 0)?);
            }
            let apis: Vec<&str> = ctx.allowed_apis.iter().map(|a| a.as_str()).collect();
            let psk = Secret(ctx.aef_psk.as_ref().map(|p| p.expose().as_slice()));
            tx.execute(
                &format!(
                    "INSERT INTO security_contexts ({CTX_COLS}) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                     ON CONFLICT (api_invoker_id, aef_id) DO UPDATE SET \
                     aef_ccf_id = EXCLUDED.aef_ccf_id, method = EXCLUDED.method, \
                     aef_psk = EXCLUDED.aef_psk, key_id = EXCLUDED.key_id, \
                     interface_canonical = EXCLUDED.interface_canonical, \
                     allowed_apis = EXCLUDED.allowed_apis, \
                     created_at_ms = EXCLUDED.created_at_ms, \
                     expires_at_ms = EXCLUDED.expires_at_ms"
                ),
                &[
                    &id.as_str(),
                    &ctx.aef_id.as_str(),
                    &ctx.aef_ccf_id.as_str(),
                    &method_text(ctx.method),
                    &psk,
                    &ctx.key_id,
                    &ctx.interface_canonical,
                    &apis,
                    &ms(ctx.created_at_ms),
                    &ms(ctx.expires_at_ms),
                ],
            )
            .await?;
        }
        queue_in(&tx, &notices(&replaced)).await?;
        tx.commit().await?;
        Ok(replaced)
    }

    pub(super) async fn context(
        &self,
        id: &ApiInvokerId,
        aef: &AefId,
    ) -> Result<Option<SecurityContext>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                &format!(
                    "SELECT {CTX_COLS} FROM security_contexts \
                     WHERE api_invoker_id = $1 AND aef_id = $2"
                ),
                &[&id.as_str(), &aef.as_str()],
            )
            .await?;
        row.map(|r| context_from(&r, 0)).transpose()
    }

    pub(super) async fn context_lookup(
        &self,
        id: &ApiInvokerId,
        aef: &AefId,
    ) -> Result<ContextLookup, StoreError> {
        let c = self.client().await?;
        // One statement, so one snapshot, as the redb read transaction. Prepared once per
        // connection: this is the AEFs' request path, and a prepare is a round trip.
        let stmt = c
            .prepare_cached(&format!(
                "SELECT EXISTS (SELECT 1 FROM invokers WHERE api_invoker_id = $1), \
                 EXISTS (SELECT 1 FROM security_contexts WHERE api_invoker_id = $1), \
                 c.* FROM (SELECT 1) AS one LEFT JOIN \
                 (SELECT {CTX_COLS} FROM security_contexts \
                  WHERE api_invoker_id = $1 AND aef_id = $2) AS c ON true"
            ))
            .await?;
        let row = c.query_one(&stmt, &[&id.as_str(), &aef.as_str()]).await?;
        let invoker: bool = row.try_get(0)?;
        let any: bool = row.try_get(1)?;
        let found: Option<String> = row.try_get(2)?;
        Ok(if !invoker {
            ContextLookup::NoInvoker
        } else if found.is_some() {
            ContextLookup::Found(context_from(&row, 2)?)
        } else if any {
            ContextLookup::OtherAefsOnly
        } else {
            ContextLookup::NoContext
        })
    }

    pub(super) async fn contexts_of(
        &self,
        id: &ApiInvokerId,
    ) -> Result<Vec<SecurityContext>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!("SELECT {CTX_COLS} FROM security_contexts WHERE api_invoker_id = $1"),
                &[&id.as_str()],
            )
            .await?;
        contexts_from(&rows)
    }

    pub(super) async fn remove_contexts_queueing(
        &self,
        id: &ApiInvokerId,
        aef: Option<&AefId>,
        notices: impl FnOnce(&[SecurityContext]) -> Vec<RevocationNotice> + Send,
    ) -> Result<Vec<SecurityContext>, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // Without an invoker row there are no contexts (foreign key): nothing to lock then.
        lock_invoker(&tx, id).await?;
        let rows = match aef {
            Some(a) => {
                tx.query(
                    &format!(
                        "DELETE FROM security_contexts WHERE api_invoker_id = $1 AND aef_id = $2 \
                         RETURNING {CTX_COLS}"
                    ),
                    &[&id.as_str(), &a.as_str()],
                )
                .await?
            }
            None => {
                tx.query(
                    &format!(
                        "DELETE FROM security_contexts WHERE api_invoker_id = $1 \
                         RETURNING {CTX_COLS}"
                    ),
                    &[&id.as_str()],
                )
                .await?
            }
        };
        let removed = contexts_from(&rows)?;
        queue_in(&tx, &notices(&removed)).await?;
        tx.commit().await?;
        Ok(removed)
    }

    pub(super) async fn revoke_foreign(
        &self,
        home: &CcfId,
        invoker: &ApiInvokerId,
        aefs: &[AefId],
        until_ms: u64,
    ) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        for aef in aefs {
            tx.execute(
                "INSERT INTO foreign_revocations (home_ccf_id, api_invoker_id, aef_id, until_ms) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (home_ccf_id, api_invoker_id, aef_id) DO UPDATE SET \
                 until_ms = GREATEST(foreign_revocations.until_ms, EXCLUDED.until_ms)",
                &[
                    &home.as_str(),
                    &invoker.as_str(),
                    &aef.as_str(),
                    &ms(until_ms),
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn revocation_outbox(&self) -> Result<Vec<QueuedNotice>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT notice_id, attempts, next_attempt_at_ms, notice FROM revocation_outbox \
                 ORDER BY notice_id COLLATE \"C\"",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get(0)?;
                let attempts: i32 = r.try_get(1)?;
                let notice: Vec<u8> = r.try_get(3)?;
                Ok(QueuedNotice {
                    attempts: u32::try_from(attempts).unwrap_or(0),
                    next_attempt_at_ms: ums(r.try_get(2)?),
                    notice: RevocationNotice::decode(notice.as_slice())
                        .map_err(|_| StoreError::CorruptNotice(id))?,
                })
            })
            .collect()
    }

    pub(super) async fn revocation_done(&self, notice_id: &str) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "DELETE FROM revocation_outbox WHERE notice_id = $1",
            &[&notice_id],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn revocation_reschedule(&self, q: &QueuedNotice) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // Not durable on its own, as with redb: after a crash the notice is tried again at once.
        tx.batch_execute("SET LOCAL synchronous_commit = off")
            .await?;
        tx.execute(
            "UPDATE revocation_outbox SET attempts = $2, next_attempt_at_ms = $3 \
             WHERE notice_id = $1",
            &[
                &q.notice.notice_id.as_str(),
                &i32::try_from(q.attempts).unwrap_or(i32::MAX),
                &ms(q.next_attempt_at_ms),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn foreign_revoked_until(
        &self,
        home: &CcfId,
        invoker: &ApiInvokerId,
        aef: &AefId,
        now_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        let c = self.client().await?;
        let stmt = c
            .prepare_cached(
                "SELECT until_ms FROM foreign_revocations \
                 WHERE home_ccf_id = $1 AND api_invoker_id = $2 AND aef_id = $3 AND until_ms > $4",
            )
            .await?;
        let row = c
            .query_opt(
                &stmt,
                &[
                    &home.as_str(),
                    &invoker.as_str(),
                    &aef.as_str(),
                    &ms(now_ms),
                ],
            )
            .await?;
        Ok(row.map(|r| r.try_get::<_, i64>(0)).transpose()?.map(ums))
    }

    pub(super) async fn purge_expired(&self, cutoff_ms: u64) -> Result<u64, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let purged = tx
            .execute(
                "DELETE FROM security_contexts WHERE expires_at_ms <= $1",
                &[&ms(cutoff_ms)],
            )
            .await?;
        tx.execute(
            "DELETE FROM foreign_revocations WHERE until_ms <= $1",
            &[&ms(cutoff_ms)],
        )
        .await?;
        tx.commit().await?;
        Ok(purged)
    }
}

const KEY_COLS: &str = "kid, pkcs8_pem, created_unix_ms, retired_unix_ms";

fn stored_key_from(row: &Row) -> Result<StoredKey, StoreError> {
    Ok(StoredKey {
        kid: row.try_get(0)?,
        pkcs8_pem: Zeroizing::new(row.try_get(1)?),
        created_unix_ms: ums(row.try_get(2)?),
        retired_unix_ms: row.try_get::<_, Option<i64>>(3)?.map(ums),
    })
}

async fn read_token_keys(c: &impl GenericClient) -> Result<Vec<StoredKey>, StoreError> {
    c.query(
        &format!("SELECT {KEY_COLS} FROM token_signing_keys ORDER BY position"),
        &[],
    )
    .await?
    .iter()
    .map(stored_key_from)
    .collect()
}

async fn insert_token_key(c: &impl GenericClient, k: &StoredKey) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO token_signing_keys (kid, pkcs8_pem, created_unix_ms, retired_unix_ms) \
         VALUES ($1, $2, $3, $4)",
        &[
            &k.kid,
            &Secret(k.pkcs8_pem.as_str()),
            &ms(k.created_unix_ms),
            &k.retired_unix_ms.map(ms),
        ],
    )
    .await?;
    Ok(())
}

impl PgStore {
    /// The stored keys; when there are none, a first one is generated and stored under the
    /// table's lock, so replicas starting together agree on it.
    pub(super) async fn token_keys_or_first(
        &self,
        now_ms: u64,
    ) -> Result<Vec<StoredKey>, StoreError> {
        let held = self.token_keys().await?;
        if !held.is_empty() {
            return Ok(held);
        }
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.batch_execute("LOCK TABLE token_signing_keys IN EXCLUSIVE MODE")
            .await?;
        let mut keys = read_token_keys(&tx).await?;
        if keys.is_empty() {
            let first = TokenKeys::generate_key(now_ms)?;
            insert_token_key(&tx, &first).await?;
            keys.push(first);
        }
        tx.commit().await?;
        Ok(keys)
    }

    /// The stored keys, oldest first.
    pub(super) async fn token_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        let c = self.client().await?;
        read_token_keys(&c).await
    }

    /// Rotates the shared set to `fresh` in one transaction under the table's lock, and
    /// returns the set as committed.
    pub(super) async fn rotate_token_key(
        &self,
        fresh: StoredKey,
        now_ms: u64,
        retention_ms: u64,
    ) -> Result<Vec<StoredKey>, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.batch_execute("LOCK TABLE token_signing_keys IN EXCLUSIVE MODE")
            .await?;
        let next =
            ccf_core::token::rotated(read_token_keys(&tx).await?, fresh, now_ms, retention_ms);
        let kept: Vec<&str> = next.iter().map(|k| k.kid.as_str()).collect();
        tx.execute(
            "DELETE FROM token_signing_keys WHERE NOT (kid = ANY($1))",
            &[&kept],
        )
        .await?;
        for k in &next {
            if k.retired_unix_ms.is_none() {
                insert_token_key(&tx, k).await?;
            } else {
                tx.execute(
                    "UPDATE token_signing_keys SET retired_unix_ms = $2 WHERE kid = $1",
                    &[&k.kid, &k.retired_unix_ms.map(ms)],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(next)
    }
}

/// Which table [`PgStore::count`] counts.
pub(super) enum Counted {
    Invokers,
    Contexts,
}

/// Locks the invoker's row until the transaction ends; false when it is not onboarded.
async fn lock_invoker(
    tx: &deadpool_postgres::Transaction<'_>,
    id: &ApiInvokerId,
) -> Result<bool, StoreError> {
    Ok(tx
        .query_opt(
            "SELECT 1 FROM invokers WHERE api_invoker_id = $1 FOR UPDATE",
            &[&id.as_str()],
        )
        .await?
        .is_some())
}

/// Puts `notices` into the revocation outbox in `tx`.
async fn queue_in(
    tx: &deadpool_postgres::Transaction<'_>,
    notices: &[RevocationNotice],
) -> Result<(), StoreError> {
    for n in notices {
        tx.execute(
            "INSERT INTO revocation_outbox (notice_id, attempts, next_attempt_at_ms, notice) \
             VALUES ($1, 0, 0, $2) ON CONFLICT (notice_id) DO UPDATE SET \
             attempts = 0, next_attempt_at_ms = 0, notice = EXCLUDED.notice",
            &[&n.notice_id.as_str(), &n.encode_to_vec()],
        )
        .await?;
    }
    Ok(())
}
