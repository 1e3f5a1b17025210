//! A real, throwaway PostgreSQL server for tests (and later the testbed): the CCF store's
//! PostgreSQL backend is tested against the engine operators run, not a mock.
//!
//! [`PgServer::start`] runs Debian's `initdb` into a data directory (password authentication,
//! scram-sha-256, the random password in a 0600 file) and starts `postgres` on a free loopback
//! port with its unix socket inside that directory. `fsync` stays on, so a commit is as durable
//! as in production. [`PgServer::stop`] (also on drop) asks for a fast shutdown (SIGINT) and
//! waits. The server is started through `setpriv --pdeathsig INT` from a thread that lives as
//! long as the [`PgServer`], so a test binary that exits without dropping it (a shared static)
//! still takes its server down with it.
//!
//! PostgreSQL refuses to run as root. When this process is root (CI, the project machine), the
//! data directory is handed to the `postgres` user the Debian package creates and the server
//! runs as that user (`setpriv --reuid`); the directory's parents must let that user through.
//! `scripts/install-postgres.sh` installs the server when it is missing.

use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

/// The superuser the test cluster is created with.
const USER: &str = "capif";
/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a server could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum PgServerError {
    /// No PostgreSQL server binaries are installed.
    #[error(
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): \
         run scripts/install-postgres.sh"
    )]
    NotInstalled,
    /// A step failed.
    #[error("PostgreSQL test server: {0}")]
    Failed(String),
}

fn failed(what: impl std::fmt::Display) -> PgServerError {
    PgServerError::Failed(what.to_string())
}

/// The newest `/usr/lib/postgresql/<major>/bin` holding `initdb` and `postgres`.
pub fn bin_dir() -> Result<PathBuf, PgServerError> {
    bin_dir_in(Path::new("/usr/lib/postgresql"))
}

fn bin_dir_in(root: &Path) -> Result<PathBuf, PgServerError> {
    let entries = std::fs::read_dir(root).map_err(|_| PgServerError::NotInstalled)?;
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("postgres").is_file()).then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin)
        .ok_or(PgServerError::NotInstalled)
}

/// Installs Debian's PostgreSQL with the project's own script when it is missing, the way the
/// tests get grpcurl: `scripts/install-postgres.sh` of the working directory (the repository
/// root) or of the source tree this crate was built from. Used by the testbed launcher (a domain
/// with `store = "postgres"`) and by the tests' shared server.
pub fn install_if_missing() -> Result<(), PgServerError> {
    if bin_dir().is_ok() {
        return Ok(());
    }
    let script = [
        PathBuf::from("scripts/install-postgres.sh"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-postgres.sh"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .ok_or(PgServerError::NotInstalled)?;
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|e| failed(format!("cannot run {}: {e}", script.display())))?;
    if !out.status.success() {
        return Err(failed(format!(
            "{} could not install PostgreSQL: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    bin_dir().map(|_| ())
}

/// A running PostgreSQL server on 127.0.0.1.
pub struct PgServer {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    password: Zeroizing<String>,
    stop: Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl std::fmt::Debug for PgServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgServer")
            .field("data", &self.data)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// The `postgres` user's uid and gid, when this process is root and must run the server as it.
fn run_as() -> Result<Option<(u32, u32)>, PgServerError> {
    if !is_root() {
        return Ok(None);
    }
    let out = Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .map_err(failed)?;
    let gid = Command::new("id")
        .args(["-g", "postgres"])
        .output()
        .map_err(failed)?;
    let parse = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).trim().parse().ok();
    match (out.status.success(), parse(&out), parse(&gid)) {
        (true, Some(u), Some(g)) => Ok(Some((u, g))),
        _ => Err(failed(
            "running as root, and there is no `postgres` user to run the server as \
             (scripts/install-postgres.sh installs the package that creates it)",
        )),
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// A command that runs `program` as `who` (when set), dying with its parent thread.
fn command(program: &Path, who: Option<(u32, u32)>) -> Command {
    let mut c = Command::new("setpriv");
    if let Some((uid, gid)) = who {
        c.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups");
    }
    c.args(["--pdeathsig", "INT"]).arg(program);
    c
}

fn chown(path: &Path, who: Option<(u32, u32)>) -> Result<(), PgServerError> {
    if let Some((uid, gid)) = who {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| failed(format!("chown {}: {e}", path.display())))?;
    }
    Ok(())
}

fn free_port() -> Result<u16, PgServerError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(failed)?;
    Ok(l.local_addr().map_err(failed)?.port())
}

fn tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl PgServer {
    /// Creates a cluster in `dir` (which must not hold one yet; it is created, mode 0711) and
    /// starts its server. Fails, naming `scripts/install-postgres.sh`, when PostgreSQL is not
    /// installed.
    pub fn start(dir: &Path) -> Result<Self, PgServerError> {
        let bin = bin_dir()?;
        let who = run_as()?;
        std::fs::create_dir_all(dir).map_err(failed)?;
        // The server runs in its data directory: a relative path (a run directory under `run/`)
        // would name the wrong place for its socket and lock files.
        let dir = &std::path::absolute(dir).map_err(failed)?;
        // The server's user must reach its data directory below this one.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(failed)?;
        let data = dir.join("data");
        std::fs::create_dir(&data).map_err(|e| failed(format!("{}: {e}", data.display())))?;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).map_err(failed)?;
        chown(&data, who)?;

        let password = Zeroizing::new(hex::encode(rand::random::<[u8; 16]>()));
        let pwfile = dir.join("pwfile");
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&pwfile)
                .map_err(failed)?;
            f.write_all(password.as_bytes()).map_err(failed)?;
        }
        chown(&pwfile, who)?;
        let out = command(&bin.join("initdb"), who)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                USER,
                "--auth=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .args(["--locale=C"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| failed(format!("initdb: {e}")))?;
        let _ = std::fs::remove_file(&pwfile);
        if !out.status.success() {
            return Err(failed(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }

        let port = free_port()?;
        let log = dir.join("postgres.log");
        let mut server = command(&bin.join("postgres"), who);
        server
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&data)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=200"])
            .args(["-c", "shared_buffers=16MB"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).map_err(failed)?)
            .stderr(
                std::fs::File::options()
                    .append(true)
                    .open(&log)
                    .map_err(failed)?,
            );

        // The server is spawned by, and dies with (pdeathsig), a thread that lives until stop.
        let (started_tx, started_rx) = mpsc::channel::<Result<u32, String>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let keeper = std::thread::Builder::new()
            .name(format!("postgres-{port}"))
            .spawn(move || {
                let mut child: Child = match server.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = started_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(child.id()));
                // Either an explicit stop or the PgServer dropped (sender gone).
                let _ = stop_rx.recv();
                signal_int(child.id());
                let _ = child.wait();
            })
            .map_err(failed)?;
        let pid = started_rx
            .recv()
            .map_err(failed)?
            .map_err(|e| failed(format!("cannot run postgres: {e}")))?;
        let me = Self {
            bin,
            data,
            port,
            password,
            stop: Some((stop_tx, keeper)),
        };
        me.wait_ready(pid, &log)?;
        Ok(me)
    }

    /// Polls `pg_isready` until the server accepts connections (bounded).
    fn wait_ready(&self, pid: u32, log: &Path) -> Result<(), PgServerError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-U", USER, "-d", "postgres"])
                .arg("-p")
                .arg(self.port.to_string())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            let alive = Path::new(&format!("/proc/{pid}")).exists();
            if !alive || Instant::now() >= deadline {
                return Err(failed(format!(
                    "the server on port {} {}; the end of its log:\n{}",
                    self.port,
                    if alive {
                        "did not accept connections in time"
                    } else {
                        "exited"
                    },
                    tail(log)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of the `postgres` database (password included: not for logs).
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// The URL of database `name` (password included: not for logs).
    pub fn database_url(&self, name: &str) -> String {
        format!(
            "postgres://{USER}:{}@127.0.0.1:{}/{name}",
            self.password.as_str(),
            self.port
        )
    }

    /// Creates an empty database `name` (letters, digits and `_` only).
    pub fn create_database(&self, name: &str) -> Result<(), PgServerError> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(failed(format!("{name:?} is not a plain database name")));
        }
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                USER,
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-d", "postgres", "-c"])
            .arg(format!("CREATE DATABASE {name}"))
            .env("PGPASSWORD", self.password.as_str())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| failed(format!("psql: {e}")))?;
        if !out.status.success() {
            return Err(failed(format!(
                "CREATE DATABASE {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Fast shutdown (SIGINT), waiting until the server has exited.
    pub fn stop(&mut self) {
        if let Some((tx, keeper)) = self.stop.take() {
            let _ = tx.send(());
            let _ = keeper.join();
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal_int(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: a plain signal to our own child, which has not been waited for yet (so its pid
    // cannot have been reused).
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_postgresql_names_the_install_script() {
        let empty = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(empty.path().join("15/bin")).unwrap();
        let e = bin_dir_in(empty.path()).unwrap_err().to_string();
        assert!(e.contains("scripts/install-postgres.sh"), "{e}");
        let e = bin_dir_in(&empty.path().join("absent")).unwrap_err();
        assert!(matches!(e, PgServerError::NotInstalled));
    }

    #[test]
    fn a_server_serves_until_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let mut pg = PgServer::start(dir.path()).unwrap();
        pg.create_database("capif_t").unwrap();
        assert!(
            pg.database_url("capif_t")
                .ends_with(&format!(":{}/capif_t", pg.port()))
        );
        assert!(
            !format!("{pg:?}").contains(pg.password.as_str()),
            "Debug shows no password"
        );
        assert!(pg.create_database("no; DROP").is_err());
        let port = pg.port();
        pg.stop();
        // stop() returns once the server exited, so its port is closed now.
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
