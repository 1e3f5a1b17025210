//! The shared PostgreSQL building block of the stores that can live in a database (the CCF's
//! today, the gateway's later): the `[store]` configuration section, a bounded connection pool
//! and versioned schema migrations applied at start.
//!
//! Why `tokio-postgres` with `deadpool-postgres` rather than `sqlx`: they are small (no macros,
//! no compile-time database, no second runtime abstraction), async on tokio like the rest of the
//! workspace, and the pool bounds the connections each replica opens (`pool_size`), so a
//! database's `max_connections` can be budgeted per replica. Queries are plain SQL strings.
//!
//! Connections use `NoTls`: the database is expected on loopback or inside the cluster's own
//! network. TLS to the database (rustls, with the domain's trust anchors) is a later step.
//!
//! The URL carries the database password, so it is a [`DatabaseUrl`]: its `Debug` shows the
//! URL with the password replaced, and every [`PgError`] message is scrubbed of it.

use std::time::Duration;

use serde::Deserialize;
use zeroize::Zeroizing;

pub use deadpool_postgres::Pool;

/// A secret query parameter (an AEFPSK, a private key). tokio-postgres logs every statement's
/// parameters with their `Debug` at debug level ("executing statement ... with parameters"),
/// which an operator's `RUST_LOG=debug` would turn into key bytes in the logs; wrapped, the
/// value goes to the database as it is and prints as `<redacted>`.
pub struct Secret<T>(pub T);

impl<T> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<T: tokio_postgres::types::ToSql> tokio_postgres::types::ToSql for Secret<T> {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.0.to_sql(ty, out)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        T::accepts(ty)
    }

    tokio_postgres::types::to_sql_checked!();
}

/// Which engine holds a component's durable state.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// The embedded default: one redb file in the state directory, nothing to install.
    #[default]
    Redb,
    /// A PostgreSQL database (`url`), which several replicas may share.
    Postgres,
}

/// A `postgres://user:password@host:port/db` URL. Never printed with its password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(Zeroizing<String>);

impl DatabaseUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(Zeroizing::new(url.into()))
    }

    /// The URL text, password included. Callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The password part of the URL, if it has one.
    fn password(&self) -> Option<&str> {
        let rest = self.0.split_once("://")?.1;
        let userinfo = rest.split_once('@')?.0;
        userinfo
            .split_once(':')
            .map(|(_, p)| p)
            .filter(|p| !p.is_empty())
    }

    /// The URL with its password replaced by `***`: what logs and errors may show.
    pub fn redacted(&self) -> String {
        scrub(&self.0, self.password())
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl<'de> Deserialize<'de> for DatabaseUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::new)
    }
}

fn scrub(text: &str, password: Option<&str>) -> String {
    match password {
        Some(p) => text.replace(p, "***"),
        None => text.to_string(),
    }
}

/// `[store]`: where a component keeps its durable state.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `redb` (default: the file in the state directory) or `postgres`.
    pub backend: StoreBackend,
    /// The database (`postgres` only), e.g. `postgres://capif:secret@127.0.0.1:5432/ccf_a`.
    pub url: Option<DatabaseUrl>,
    /// Most connections this replica opens to the database. Default 8.
    pub pool_size: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Redb,
            url: None,
            pool_size: 8,
        }
    }
}

/// Why the database could not be reached or used. Messages never carry the URL's password.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The configuration cannot work.
    #[error("store configuration: {0}")]
    Config(String),
    /// The database refused or failed an operation.
    #[error("PostgreSQL: {0}")]
    Db(String),
}

impl PgError {
    /// A database error, its text scrubbed of `url`'s password. tokio-postgres does not put the
    /// password in its messages; this keeps it so if that ever changes.
    pub fn db(e: &dyn std::error::Error, url: Option<&DatabaseUrl>) -> Self {
        let mut text = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            // Wrappers often repeat their source's text: each part once.
            let part = s.to_string();
            if !text.contains(&part) {
                text = format!("{text}: {part}");
            }
            src = s.source();
        }
        PgError::Db(scrub(&text, url.and_then(DatabaseUrl::password)))
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgError::db(&e, None)
    }
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        PgError::db(&e, None)
    }
}

/// A pool of at most `pool_size` connections to `url`. Connects lazily: the first operation
/// (for the CCF, [`migrate`] at start) reports an unreachable database.
pub fn pool(url: &DatabaseUrl, pool_size: usize) -> Result<Pool, PgError> {
    if pool_size == 0 {
        return Err(PgError::Config("store.pool_size must be at least 1".into()));
    }
    let mut config: tokio_postgres::Config = url.expose().parse().map_err(|e| {
        PgError::Config(format!(
            "store.url {} is not a PostgreSQL URL: {}",
            url.redacted(),
            PgError::db(&e, Some(url))
        ))
    })?;
    config.connect_timeout(Duration::from_secs(5));
    config.application_name("capif");
    let manager = deadpool_postgres::Manager::from_config(
        config,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(pool_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        // Bounded waits: a saturated pool or a dead database fails the operation, not the CCF.
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(10)))
        .build()
        .map_err(|e| PgError::Config(format!("store pool: {e}")))
}

/// The advisory lock key of `component`'s migrations (FNV-1a of its name): a constant per
/// component, so replicas of one component serialise and different components do not.
fn lock_key(component: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"capif-migrations:".iter().chain(component.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_be_bytes(h.to_be_bytes())
}

/// Applies the migrations of `component` that the database lacks, in order: `migrations[i]` is
/// version `i + 1`. All of them run in ONE transaction that holds
/// `pg_advisory_xact_lock(<component's key>)`, so replicas starting together apply each exactly
/// once (the others wait, then find them applied), and a failed migration leaves nothing behind.
/// Returns how many were applied.
pub async fn migrate(pool: &Pool, component: &str, migrations: &[&str]) -> Result<usize, PgError> {
    let mut client = pool.get().await?;
    // The bookkeeping table itself, under a lock every component shares: concurrent
    // `CREATE TABLE IF NOT EXISTS` can otherwise collide in the catalog.
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key("")])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             component text NOT NULL,
             version int NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (component, version))",
    )
    .await?;
    tx.commit().await?;

    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(component)])
        .await?;
    let row = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM schema_migrations WHERE component = $1",
            &[&component],
        )
        .await?;
    let have: i32 = row.get(0);
    let have = usize::try_from(have).unwrap_or(0);
    if have > migrations.len() {
        return Err(PgError::Config(format!(
            "the database's {component} schema is at version {have}, newer than this build's {}: \
             run the newer build or restore a matching database",
            migrations.len()
        )));
    }
    for (i, sql) in migrations.iter().enumerate().skip(have) {
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.batch_execute(sql).await.map_err(|e| {
            PgError::Db(format!(
                "{component} migration {version} failed: {}",
                PgError::from(e)
            ))
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (component, version) VALUES ($1, $2)",
            &[&component, &version],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(migrations.len() - have)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_shows() {
        let url = DatabaseUrl::new("postgres://capif:s3cr3t-pw@127.0.0.1:5432/ccf");
        assert_eq!(url.redacted(), "postgres://capif:***@127.0.0.1:5432/ccf");
        assert!(!format!("{url:?}").contains("s3cr3t-pw"));
        let c: StoreConfig = toml::from_str(
            "backend = \"postgres\"\nurl = \"postgres://capif:s3cr3t-pw@127.0.0.1/ccf\"\n",
        )
        .unwrap();
        assert_eq!(c.backend, StoreBackend::Postgres);
        assert_eq!(c.pool_size, 8);
        assert!(!format!("{c:?}").contains("s3cr3t-pw"));
        assert_eq!(StoreConfig::default().backend, StoreBackend::Redb);
    }

    #[test]
    fn a_bad_url_is_refused_without_its_password() {
        let url = DatabaseUrl::new("postgres://capif:s3cr3t-pw@127.0.0.1:notaport/ccf");
        let e = pool(&url, 4).unwrap_err().to_string();
        assert!(e.contains("store.url") && !e.contains("s3cr3t-pw"), "{e}");
    }

    #[test]
    fn components_lock_apart() {
        assert_ne!(lock_key("ccf"), lock_key("gateway"));
        assert_eq!(lock_key("ccf"), lock_key("ccf"));
    }
}
