//! PostgreSQL for crate tests: [`shared`] starts one [`PgServer`] per test binary (initdb takes
//! seconds; a database per test costs milliseconds) and [`fresh_database`] gives each test its
//! own empty database on it. When PostgreSQL is missing they install it with
//! `scripts/install-postgres.sh`, and FAIL when that cannot be done, naming the script: a backend
//! that was not tested must not look green.
//!
//! The shared server lives in a static that is never dropped; it goes down with the test binary
//! (see `capif_scenarios::postgres`), and the data directory it leaves behind
//! (`$TMPDIR/capif-pg-<pid>`) is removed by the next binary that starts one once that pid is gone.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

pub use capif_scenarios::postgres::{PgServer, PgServerError, bin_dir};

const PREFIX: &str = "capif-pg-";

/// Removes the data directories of shared servers whose test binaries have exited.
fn reap_stale(tmp: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// This test binary's PostgreSQL server, started on first use (PostgreSQL installed first when
/// missing). Panics with the reason.
pub fn shared() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let tmp = std::env::temp_dir();
        reap_stale(&tmp);
        let dir = tmp.join(format!("{PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        capif_scenarios::postgres::install_if_missing().unwrap_or_else(|e| panic!("{e}"));
        PgServer::start(&dir).unwrap_or_else(|e| panic!("{e}"))
    })
}

/// The URL of a new, empty database on the [`shared`] server (password included).
pub fn fresh_database() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let server = shared();
    let name = format!("t{}", NEXT.fetch_add(1, Ordering::Relaxed));
    server
        .create_database(&name)
        .unwrap_or_else(|e| panic!("{e}"));
    server.database_url(&name)
}

/// The environment variable that chooses the store backend of the components the harnesses
/// start (`capif_testkit::ccf`, `capif_testkit::federation`): `postgres` puts each of them on a
/// fresh database of the [`shared`] server; unset or `redb`, the embedded default. It is how
/// the suite runs as a matrix over both backends without a copy of any test (`scripts/test.sh`).
pub const STORE_ENV: &str = "CAPIF_TEST_STORE";

/// Whether this run puts the harnesses' components on PostgreSQL ([`STORE_ENV`]). Any value
/// other than `redb`, `postgres` or nothing panics: a typo must not test the default instead.
pub fn on_postgres() -> bool {
    match std::env::var(STORE_ENV).as_deref() {
        Err(_) | Ok("") | Ok("redb") => false,
        Ok("postgres") => true,
        Ok(other) => panic!("{STORE_ENV}={other:?}: expected \"redb\" or \"postgres\""),
    }
}

/// The `[store]` table for the config file of the component whose state directory is
/// `state_dir`, as [`on_postgres`] chooses: empty for redb; else the database of that state
/// directory, created on first use, so a component started again from the same directory (a
/// restart) finds its state. A small pool: a test binary runs many components on one server.
pub fn store_section(state_dir: &std::path::Path) -> String {
    static BY_DIR: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());
    if !on_postgres() {
        return String::new();
    }
    let mut known = BY_DIR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let url = match known.iter().find(|(d, _)| d == state_dir) {
        Some((_, url)) => url.clone(),
        None => {
            let url = fresh_database();
            known.push((state_dir.to_path_buf(), url.clone()));
            url
        }
    };
    format!("\n[store]\nbackend = \"postgres\"\nurl = \"{url}\"\npool_size = 3\n")
}

/// The backend [`on_postgres`] asks for.
pub fn expected_backend() -> ccf_core::pg::StoreBackend {
    if on_postgres() {
        ccf_core::pg::StoreBackend::Postgres
    } else {
        ccf_core::pg::StoreBackend::Redb
    }
}

/// Panics unless `ccf` keeps its state where [`on_postgres`] says: the matrix must not pass by
/// quietly testing the default twice.
pub fn assert_backend(ccf: &capif_ccf::server::RunningCcf) {
    assert_eq!(
        ccf.state.store.backend(),
        expected_backend(),
        "the harness's CCF is on the wrong store"
    );
}
