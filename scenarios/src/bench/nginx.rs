//! Case (g) of `capif bench`: what operators would deploy instead of a federation gateway, a
//! chain of general gRPC proxies of the same length as case (b): client → nginx A → nginx B →
//! a bare answerer (a floor hop), mutual TLS 1.3 on every hop with the same certificates as the
//! floor. Debian's nginx (scripts/install-nginx.sh) runs as its own master process per proxy,
//! `-p <dir> -c <conf>` with `daemon off;`, on loopback ports, and is stopped at the end. When
//! nginx cannot be had the case is skipped with one line, never failed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::process::{Child, Command};

/// Where the certificates of a proxy come from: the floor's own (A's CA, A's gateway
/// certificate and key), so the TLS work per hop is the same as the floor's.
pub struct ProxyTls<'a> {
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// How long an nginx master may take to listen, or to stop.
const NGINX_TIMEOUT: Duration = Duration::from_secs(10);

/// The nginx binary: `CAPIF_NGINX`, else `nginx` on PATH or in /usr/sbin; when `install` and
/// none is found, scripts/install-nginx.sh (relative to the working directory, the repository
/// root in docs/BENCHMARKS.md's command) installs Debian's and prints its path. `Err` says why
/// there is none, in one sentence.
pub async fn find_nginx(install: bool) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CAPIF_NGINX") {
        return Ok(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file());
    if let Some(p) = on_path {
        return Ok(p);
    }
    if !install {
        bail!(
            "nginx is not installed (the smoke run does not install it; scripts/install-nginx.sh does)"
        );
    }
    let script = Path::new("scripts/install-nginx.sh");
    if !script.is_file() {
        bail!(
            "nginx is not installed and {} is not here (run the bench from the repository root)",
            script.display()
        );
    }
    let out = Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .await
        .context("cannot run scripts/install-nginx.sh")?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || path.is_empty() {
        bail!(
            "scripts/install-nginx.sh could not install nginx: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("no output")
        );
    }
    Ok(PathBuf::from(path))
}

/// The configuration of one proxy: listens on `listen` (mutual TLS, HTTP/2) and passes every
/// gRPC call to `upstream` over mutual TLS, verifying it against the same CA. Upstream
/// connections are kept alive, as an operator would configure a busy border proxy.
pub fn proxy_conf(dir: &Path, listen: u16, upstream: &str, tls: &ProxyTls<'_>) -> String {
    let (d, ca, cert, key) = (
        dir.display(),
        tls.ca.display(),
        tls.cert.display(),
        tls.key.display(),
    );
    format!(
        r#"# nginx gRPC proxy of case (g) of `capif bench` (generated).
daemon off;
master_process on;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    upstream next {{
        server {upstream};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{listen} ssl http2;
        ssl_protocols TLSv1.3;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        keepalive_requests 1000000;
        location / {{
            grpc_pass grpcs://next;
            grpc_ssl_protocols TLSv1.3;
            grpc_ssl_certificate {cert};
            grpc_ssl_certificate_key {key};
            grpc_ssl_trusted_certificate {ca};
            grpc_ssl_verify on;
            grpc_ssl_name localhost;
            grpc_ssl_server_name on;
        }}
    }}
}}
"#
    )
}

/// One running nginx master; [`Nginx::stop`] ends it and its workers.
pub struct Nginx {
    bin: PathBuf,
    dir: PathBuf,
    child: Child,
    /// Its listening address, `127.0.0.1:<port>`.
    pub addr: String,
}

impl Nginx {
    /// Starts a proxy in `dir` (its prefix: config, pid, error log, temp files) in front of
    /// `upstream`, and waits until it accepts connections.
    pub async fn start(bin: &Path, dir: &Path, upstream: &str, tls: &ProxyTls<'_>) -> Result<Self> {
        // nginx reads relative paths against its prefix, not our working directory: a run
        // directory given as `run/...` must reach its config as absolute paths.
        let dir = &std::path::absolute(dir)?;
        let (ca, cert, key) = (
            std::path::absolute(tls.ca)?,
            std::path::absolute(tls.cert)?,
            std::path::absolute(tls.key)?,
        );
        let tls = &ProxyTls {
            ca: &ca,
            cert: &cert,
            key: &key,
        };
        std::fs::create_dir_all(dir.join("tmp"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, proxy_conf(dir, port, upstream, tls))?;
        let mut cmd = Command::new(bin);
        cmd.arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGTERM the nginx
        // master (which then stops its workers) when this process dies.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut me = Self {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            child,
            addr: format!("127.0.0.1:{port}"),
        };
        let start = Instant::now();
        loop {
            if let Some(status) = me.child.try_wait()? {
                bail!(
                    "nginx exited ({status}) before it listened: {}",
                    me.error_log_tail()
                );
            }
            if tokio::net::TcpStream::connect(&me.addr).await.is_ok() {
                return Ok(me);
            }
            if start.elapsed() > NGINX_TIMEOUT {
                me.stop().await;
                bail!(
                    "nginx did not listen on {} within {NGINX_TIMEOUT:?}",
                    me.addr
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The master's pid (tracked for the report and the stop).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn error_log_tail(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log"))
            .ok()
            .and_then(|l| l.lines().last().map(str::to_string))
            .unwrap_or_else(|| "no error log".into())
    }

    /// Fast shutdown through nginx's own signal (`-s stop` reads the pid file), then waits for
    /// the master; kills it if it does not end in time.
    pub async fn stop(&mut self) {
        let _ = Command::new(&self.bin)
            .arg("-p")
            .arg(&self.dir)
            .arg("-c")
            .arg(self.dir.join("nginx.conf"))
            .arg("-e")
            .arg(self.dir.join("error.log"))
            .args(["-s", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if tokio::time::timeout(NGINX_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// The chain nginx A → nginx B → `answerer`; returns the two proxies, first hop first.
pub async fn chain(
    bin: &Path,
    run_dir: &Path,
    answerer: &str,
    tls: &ProxyTls<'_>,
) -> Result<[Nginx; 2]> {
    let mut b = Nginx::start(bin, &run_dir.join("nginx-b"), answerer, tls)
        .await
        .map_err(|e| anyhow!("nginx B: {e:#}"))?;
    match Nginx::start(bin, &run_dir.join("nginx-a"), &b.addr, tls).await {
        Ok(a) => Ok([a, b]),
        Err(e) => {
            b.stop().await;
            Err(anyhow!("nginx A: {e:#}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_proxies_grpc_with_mutual_tls_on_both_sides() {
        let tls = ProxyTls {
            ca: Path::new("/x/ca.pem"),
            cert: Path::new("/x/gw.pem"),
            key: Path::new("/x/gw.key"),
        };
        let c = proxy_conf(Path::new("/run/n"), 4711, "127.0.0.1:4712", &tls);
        for line in [
            "daemon off;",
            "listen 127.0.0.1:4711 ssl http2;",
            "ssl_verify_client on;",
            "ssl_client_certificate /x/ca.pem;",
            "server 127.0.0.1:4712;",
            "grpc_pass grpcs://next;",
            "grpc_ssl_certificate /x/gw.pem;",
            "grpc_ssl_certificate_key /x/gw.key;",
            "grpc_ssl_trusted_certificate /x/ca.pem;",
            "grpc_ssl_verify on;",
            "pid /run/n/nginx.pid;",
        ] {
            assert!(c.contains(line), "{line} missing:\n{c}");
        }
        // Braces balance: the format string escaped every one.
        assert_eq!(c.matches('{').count(), c.matches('}').count());
    }
}
