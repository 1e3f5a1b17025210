//! `SSLKEYLOGFILE`: the TLS secrets of CAPIF-1e sessions in the NSS key log format (the one curl,
//! browsers and Wireshark use), for interop debugging. Written only when the variable is set, to
//! a file opened owner-only (0600 when created, refused when others may read it) in append mode.
//!
//! Both CAPIF-1e ends use it: the CCF's CAPIF-1e listener and the invoker's CAPIF-1e connections,
//! through rustls's `KeyLog` in the `tls13-exporter` profile ([`rustls_server`], [`rustls_client`])
//! and OpenSSL's key log callback in `tls12-annex-a` ([`openssl`]). With `tls12-annex-a`, the
//! `CLIENT_RANDOM` line carries the master secret that is the KDF's key (docs/PROTOCOL.md 4.6).

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// The environment variable naming the key log file.
pub const ENV: &str = "SSLKEYLOGFILE";

/// Why a key log file was not used.
#[derive(Debug, thiserror::Error)]
pub enum KeyLogError {
    /// The file cannot be opened or inspected.
    #[error("cannot open the key log file {}: {source}", .path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file exists and users other than its owner may read or write it.
    #[error(
        "the key log file {} has mode {mode:04o}, so other users could read the TLS secrets \
         written to it: fix with `chmod 600 {}` or name a new file",
        .path.display(),
        .path.display()
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// An open key log file. Every line is written whole, so that two connections logging at once
/// (or two processes appending to one file) do not interleave inside a line.
#[derive(Debug)]
pub struct KeyLogFile {
    path: PathBuf,
    file: Mutex<File>,
}

impl KeyLogFile {
    /// Opens `path` for appending, creating it with mode 0600; refuses an existing file that
    /// others may read or write.
    pub fn open(path: &Path) -> Result<Self, KeyLogError> {
        let err = |source| KeyLogError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        let mode = file.metadata().map_err(err)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyLogError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    /// Where the lines go.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line (a newline is added). A failed write is reported once in the log and
    /// otherwise ignored: key logging must never fail a handshake.
    pub fn write_line(&self, line: &str) {
        static REPORTED: OnceLock<()> = OnceLock::new();
        let mut text = String::with_capacity(line.len() + 1);
        text.push_str(line);
        text.push('\n');
        // A poisoned lock only means another writer panicked; the file is still usable.
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(text.as_bytes()) {
            REPORTED.get_or_init(|| {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot write to the key log file");
            });
        }
    }
}

/// NSS format: `<label> <client random hex> <secret hex>`.
impl rustls::KeyLog for KeyLogFile {
    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        self.write_line(&format!(
            "{label} {} {}",
            hex::encode(client_random),
            hex::encode(secret)
        ));
    }
}

/// The key log file `SSLKEYLOGFILE` names, opened at the first call; `None` when the variable is
/// unset or empty, or when the file cannot be used (said once, as a warning). Setting it is
/// announced once, as a warning too: the file holds every CAPIF-1e session's secrets.
pub fn from_env() -> Option<Arc<KeyLogFile>> {
    static FILE: OnceLock<Option<Arc<KeyLogFile>>> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = std::env::var_os(ENV).filter(|p| !p.is_empty())?;
        match KeyLogFile::open(Path::new(&path)) {
            Ok(f) => {
                tracing::warn!(
                    path = %f.path().display(),
                    "SSLKEYLOGFILE is set: the TLS secrets of CAPIF-1e sessions are written to it \
                     (for debugging only)"
                );
                Some(Arc::new(f))
            }
            Err(e) => {
                tracing::warn!(error = %e, "SSLKEYLOGFILE is set but not used");
                None
            }
        }
    })
    .clone()
}

/// `config` with `SSLKEYLOGFILE` key logging when the variable is set, else unchanged.
pub fn rustls_server(config: Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    match from_env() {
        Some(log) => {
            let mut c = (*config).clone();
            c.key_log = log;
            Arc::new(c)
        }
        None => config,
    }
}

/// `config` with `SSLKEYLOGFILE` key logging when the variable is set, else unchanged.
pub fn rustls_client(config: Arc<rustls::ClientConfig>) -> Arc<rustls::ClientConfig> {
    match from_env() {
        Some(log) => {
            let mut c = (*config).clone();
            c.key_log = log;
            Arc::new(c)
        }
        None => config,
    }
}

/// Installs `SSLKEYLOGFILE` key logging on an OpenSSL context when the variable is set. OpenSSL
/// formats the lines itself (for TLS 1.2: `CLIENT_RANDOM <client random> <master secret>`).
pub fn openssl(builder: &mut openssl::ssl::SslContextBuilder) {
    if let Some(log) = from_env() {
        builder.set_keylog_callback(move |_, line| log.write_line(line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::KeyLog;

    #[test]
    fn lines_are_appended_in_nss_format_to_an_owner_only_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.log");
        let log = KeyLogFile::open(&path).unwrap();
        log.log("CLIENT_RANDOM", &[0xAB; 4], &[0x01, 0x02]);
        drop(log);
        // Opened again: appended, not truncated.
        KeyLogFile::open(&path).unwrap().write_line("SECOND x y");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "CLIENT_RANDOM abababab 0102\nSECOND x y\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_file_others_may_read_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.log");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = KeyLogFile::open(&path).unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
    }
}
