//! An AEF under connection pressure, over real sockets and real TLS: completed PSK connections
//! leave no file descriptor behind; pending handshakes hold one each and are freed by the
//! handshake timeout; idle TLS connections are closed by the idle timeout; a flood from one
//! source address does not keep another source from being served. Counts are bounded and every
//! address is loopback.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aef_stub::keys::{HeldKey, InvokerRef};
use aef_stub::server::RunningAef;
use capif_2e::identity::PskIdentity;
use capif_2e::psk::{TlsProfile, demo_channel};
use capif_proto::v1::{
    CheckAuthenticationReq, InvokeRequest, aef_security_client::AefSecurityClient,
    demo_api_client::DemoApiClient,
};
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::{AefId, ApiInvokerId, CcfId};
use ccf_core::kdf::AefPsk;
use ccf_core::pki::DomainCa;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

const HOME: &str = "operator-b.test";
const API: &str = "api-x";

/// The fd counts below are of the whole test process: one test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Raises the soft fd limit to the hard one; returns it.
fn raise_fd_limit() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    #[allow(unsafe_code)]
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
    }
    l.rlim_cur
}

/// `wanted` connections, or fewer when the fd limit cannot hold about three times as many
/// (both ends live in this process), but never fewer than `least`.
fn connections_within_fd_limit(wanted: usize, least: usize) -> usize {
    let limit = usize::try_from(raise_fd_limit()).unwrap_or(usize::MAX);
    if limit >= wanted * 5 / 2 {
        wanted
    } else {
        (limit / 3).max(least)
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

struct Aef {
    running: RunningAef,
    ca_pem: String,
    _dir: tempfile::TempDir,
}

async fn start_aef(limits: &str) -> Aef {
    let dir = tempfile::tempdir().unwrap();
    let own = CcfId::new("operator-a.test").unwrap();
    let ca = DomainCa::generate(&own).unwrap();
    let cred = ca
        .issue_with_new_key(
            &PeerIdentity::new(own.clone(), Role::Aef(AefId::new("aef-a1").unwrap())),
            &["localhost".to_string()],
            1,
        )
        .unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(p("aef.pem"), &cred.cert_pem).unwrap();
    std::fs::write(p("aef.key"), cred.key_pem.as_bytes()).unwrap();
    // The CCF is never asked in these tests: keys are put into the store directly.
    let text = format!(
        "aef_id = \"aef-a1\"\nccf_id = \"operator-a.test\"\napis = [\"{API}\"]\n\
         [tls]\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
         [ccf]\naddress = \"127.0.0.1:9\"\n\
         [listen]\nsecurity = \"127.0.0.1:0\"\npsk = \"127.0.0.1:0\"\n{limits}",
        p("ca.pem").display(),
        p("aef.pem").display(),
        p("aef.key").display(),
    );
    let cfg = aef_stub::config::AefConfig::parse(&text, "test").unwrap();
    Aef {
        running: aef_stub::server::start(cfg).await.unwrap(),
        ca_pem: ca.cert_pem().to_string(),
        _dir: dir,
    }
}

fn hold_key(aef: &Aef, invoker: &str, byte: u8) -> PskIdentity {
    let psk = AefPsk::from_slice(&[byte; 32]).unwrap();
    let who = InvokerRef::new(
        CcfId::new(HOME).unwrap(),
        ApiInvokerId::new(invoker).unwrap(),
    );
    let identity = PskIdentity {
        home_ccf_id: who.home.clone(),
        api_invoker_id: who.invoker.clone(),
        key_id: psk.key_id(),
    };
    assert!(aef.running.state.keys.put(
        who,
        HeldKey {
            key_id: psk.key_id(),
            psk,
            expires_at: Instant::now() + Duration::from_secs(600),
            fetched_at: Instant::now(),
            last_refresh: None,
            allowed_apis: vec![API.into()],
        },
    ));
    identity
}

async fn call_once(addr: &str, id: &PskIdentity, byte: u8) {
    let psk = AefPsk::from_slice(&[byte; 32]).unwrap();
    let ch = demo_channel(addr, id, &psk, TlsProfile::Tls13)
        .await
        .unwrap();
    let rsp = DemoApiClient::new(ch)
        .invoke(InvokeRequest {
            api_name: API.into(),
            payload: "x".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rsp.api_invoker_id, id.api_invoker_id.as_str());
}

async fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// 1000 completed TLS-PSK connections, each with a real API call,
/// leave the process's fd count where it started (±5), and the key store holds no connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_psk_connections_leave_no_fd_behind() {
    let _serial = SERIAL.lock().await;
    raise_fd_limit();
    let aef = start_aef("").await;
    let id = hold_key(&aef, "inv-1", 7);
    let addr = aef.running.psk_addr.to_string();
    call_once(&addr, &id, 7).await; // warm up (lazy statics, thread pools)
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = open_fds();
    for _ in 0..1000 {
        call_once(&addr, &id, 7).await;
    }
    let keys = aef.running.state.keys.clone();
    wait_for("PSK connections released", Duration::from_secs(10), || {
        keys.open_connections() == 0 && open_fds() <= before + 5
    })
    .await;
    let after = open_fds();
    println!("fds before {before}, after 1000 PSK connections {after}");
    // A revocation now finds nothing open to close.
    let who = InvokerRef::new(
        CcfId::new(HOME).unwrap(),
        ApiInvokerId::new("inv-1").unwrap(),
    );
    assert_eq!(
        keys.revoke(&who),
        0,
        "revocation counts only open connections"
    );
}

/// 2000 pending PSK handshakes cost at most one fd each at the AEF
/// and are freed by the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_handshakes_hold_one_fd_and_time_out() {
    let _serial = SERIAL.lock().await;
    let n = connections_within_fd_limit(2000, 100);
    let aef = start_aef(
        "[limits]\nhandshake_timeout_secs = 2\nmax_connections = 4096\nmax_connections_per_source = 4096\n",
    )
    .await;
    let addr = aef.running.psk_addr;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = open_fds();
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(TcpStream::connect(addr).await.unwrap());
    }
    // Every connection is accepted (the server side holds its fd) before the timeout ends.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = open_fds();
    let server_side = during.saturating_sub(before + n);
    println!("{n} pending handshakes: {server_side} fds at the AEF");
    assert!(
        server_side <= n + 5,
        "{server_side} fds for {n} pending handshakes"
    );
    assert!(server_side + 5 >= n, "the handshakes were not all pending");
    // The timeout closes them: every client sees the end.
    let start = Instant::now();
    for mut c in clients.drain(..) {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(10), c.read(&mut b)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "connection still open");
    }
    println!("all closed {:?} after the first check", start.elapsed());
    wait_for("server fds released", Duration::from_secs(5), || {
        open_fds() <= before + 5
    })
    .await;
}

fn tls_client(ca_pem: &str) -> tokio_rustls::TlsConnector {
    let roots =
        ccf_core::tls::roots(&ccf_core::tls::certs_from_pem("CA", ca_pem).unwrap()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(ccf_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut cfg = cfg;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

async fn tcp_from(src: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((src, 0)))?;
    s.connect(to).await
}

/// 2000 connections with completed TLS on the AEF's security port
/// (no client certificate needed) that send nothing are closed by the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_connections_are_closed() {
    let _serial = SERIAL.lock().await;
    let n = connections_within_fd_limit(2000, 100);
    let aef = start_aef(
        "[limits]\nidle_timeout_secs = 2\nmax_connections = 4096\nmax_connections_per_source = 4096\n",
    )
    .await;
    let addr = aef.running.security_addr;
    let tls = tls_client(&aef.ca_pem);
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (tls, gate) = (tls.clone(), gate.clone());
        tasks.spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut s = tls.connect(name, tcp).await.unwrap();
            drop(permit);
            let opened = Instant::now();
            let mut buf = [0u8; 256];
            // The server's h2 preface arrives first; then nothing until the close.
            loop {
                match tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return opened.elapsed(),
                    Ok(Ok(_)) => continue,
                    Err(_) => panic!("an idle connection stayed open 15 s"),
                }
            }
        });
    }
    let mut closed = 0;
    let mut shortest = Duration::MAX;
    while let Some(r) = tasks.join_next().await {
        shortest = shortest.min(r.unwrap());
        closed += 1;
    }
    println!("{closed} idle TLS connections closed; the earliest after {shortest:?}");
    assert_eq!(closed, n);
    assert!(
        shortest >= Duration::from_millis(1500),
        "closed before the idle timeout: {shortest:?}"
    );
}

/// while 3000 connections are attempted from 127.0.0.1 (per-source
/// cap 100), an invoker at 127.0.0.2 completes Authentication Initiation and a PSK call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_source_does_not_starve_another() {
    let _serial = SERIAL.lock().await;
    let n = connections_within_fd_limit(3000, 300);
    let aef =
        start_aef("[limits]\nmax_connections = 1000\nmax_connections_per_source = 100\n").await;
    let id = hold_key(&aef, "inv-9", 9);
    let addr = aef.running.security_addr;
    let mut flood = Vec::with_capacity(n);
    for _ in 0..n {
        if let Ok(s) = tcp_from([127, 0, 0, 1], addr).await {
            flood.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The other source is served, on the flooded listener.
    let tls = tls_client(&aef.ca_pem);
    let ch = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let tls = tls.clone();
            async move {
                let tcp = tcp_from([127, 0, 0, 2], addr).await?;
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let s = tls.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .unwrap();
    let rsp = AefSecurityClient::new(ch)
        .check_authentication(CheckAuthenticationReq {
            api_invoker_id: "inv-9".into(),
            home_ccf_id: HOME.into(),
            key_id: id.key_id.clone(),
            ..Default::default()
        })
        .await
        .expect("the other source is served")
        .into_inner();
    assert_eq!(rsp.psk_identity, id.to_string());
    call_once(&aef.running.psk_addr.to_string(), &id, 9).await;
    // Of the flood, at most the per-source cap is still held by the server.
    let mut open = 0;
    for s in &mut flood {
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(5), s.read(&mut b)).await {
            Err(_) => open += 1, // nothing to read yet: still open
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(_)) => open += 1,
        }
    }
    println!("{n} attempted from one source, {open} held open by the AEF");
    assert!(open <= 100, "{open} connections held from one source");
}
