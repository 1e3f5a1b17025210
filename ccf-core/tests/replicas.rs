//! A client of a service that runs as several replicas (`tls::connect_replicas`): requests are
//! spread over the replicas; once one is killed (its process gone: every connection closed at
//! once, as the kernel does for a killed process) every request started afterwards is served by
//! the others; a replica that comes back on its address is used again. Each replica is a real
//! mutual-TLS gRPC server on loopback, in a runtime of its own so that stopping it drops its
//! listener and every connection together.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use capif_proto::v1::demo_api_client::DemoApiClient;
use capif_proto::v1::demo_api_server::{DemoApi, DemoApiServer};
use capif_proto::v1::{InvokeRequest, InvokeResponse};
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::CcfId;
use ccf_core::limits::ConnGate;
use ccf_core::pki::DomainCa;
use ccf_core::telemetry::TracedChannel;
use ccf_core::tls::{ClientAuth, ExpectedPeer, certs_from_pem, client_config, server_config};
use tonic::{Request, Response, Status};

/// Answers with its own name and counts what it served.
#[derive(Clone)]
struct Named(&'static str, Arc<AtomicU64>);

#[tonic::async_trait]
impl DemoApi for Named {
    async fn invoke(&self, _: Request<InvokeRequest>) -> Result<Response<InvokeResponse>, Status> {
        self.1.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(InvokeResponse {
            aef_id: self.0.into(),
            ..Default::default()
        }))
    }
}

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let id = CcfId::new("operator-a.test").unwrap();
    let ca = DomainCa::generate(&id).unwrap();
    let s = ca
        .issue_with_new_key(
            &PeerIdentity::new(id.clone(), Role::Ccf),
            &["localhost".into()],
            1,
        )
        .unwrap();
    let c = ca
        .issue_with_new_key(&PeerIdentity::new(id, Role::Gateway), &[], 1)
        .unwrap();
    Pki {
        ca_pem: ca.cert_pem().to_string(),
        server: (s.cert_pem, s.key_pem.to_string()),
        client: (c.cert_pem, c.key_pem.to_string()),
    }
}

/// A replica on `addr` (a port of its own), until [`Replica::kill`].
struct Replica {
    served: Arc<AtomicU64>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Replica {
    fn start(name: &'static str, addr: std::net::SocketAddr, pki: &Pki) -> Self {
        let served = Arc::new(AtomicU64::new(0));
        let roots = certs_from_pem("CA", &pki.ca_pem).unwrap();
        let tls =
            server_config(&pki.server.0, &pki.server.1, ClientAuth::Required(&roots)).unwrap();
        let api = Named(name, served.clone());
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
                let routes = tonic::service::Routes::new(DemoApiServer::new(api));
                ccf_core::grpc::spawn_server(
                    listener,
                    tls,
                    false,
                    routes,
                    ConnGate::new("replica", Default::default()),
                    std::future::pending(),
                );
                ready_tx.send(()).unwrap();
            });
            let _ = stopped.recv();
            // Like a killed process: every task, the listener and every connection, at once.
            rt.shutdown_background();
        });
        ready.recv().unwrap();
        Self {
            served,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    fn kill(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn call(client: &mut DemoApiClient<TracedChannel>) -> Result<String, Status> {
    let mut r = Request::new(InvokeRequest {
        api_name: "x".into(),
        payload: String::new(),
    });
    r.set_timeout(Duration::from_secs(5));
    client.invoke(r).await.map(|r| r.into_inner().aef_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_fail_over_and_come_back() {
    let pki = pki();
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let mut a = Replica::start("a", a_addr, &pki);
    let b = Replica::start("b", b_addr, &pki);
    let cfg = client_config(
        &pki.ca_pem,
        Some((&pki.client.0, &pki.client.1)),
        ExpectedPeer::Exactly(PeerIdentity::new(
            CcfId::new("operator-a.test").unwrap(),
            Role::Ccf,
        )),
    )
    .unwrap();
    let addrs = vec![a_addr.to_string(), b_addr.to_string()];
    let channel =
        ccf_core::tls::connect_replicas(&addrs, "localhost", cfg, Duration::from_secs(1)).unwrap();
    let mut client = DemoApiClient::new(TracedChannel::new(channel, "replicas"));

    // Concurrent requests are spread: each replica takes a share.
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move { call(&mut c).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert!(
        a.served() > 0 && b.served() > 0,
        "not spread: a {} b {}",
        a.served(),
        b.served()
    );

    // a is killed: every request started after it is served, by b. The client learns of the
    // kill when its connection task reads the connection's end, a moment after the kernel
    // closed it; a request sent in that very moment meets the closing connection like one in
    // flight (and may fail with UNAVAILABLE), so "after" starts 500 ms later (room for a loaded
    // CI machine; without the replicas' readiness, requests fail however long one waits).
    a.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = b.served();
    for i in 0..100 {
        let who = call(&mut client)
            .await
            .unwrap_or_else(|e| panic!("request {i} after the kill failed: {e:?}"));
        assert_eq!(who, "b");
    }
    assert_eq!(b.served() - before, 100);

    // a comes back on its address: it is used again (probed within its backoff, at most 2 s).
    let a2 = Replica::start("a", a_addr, &pki);
    let start = Instant::now();
    while a2.served() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the replica that came back was never used again"
        );
        call(&mut client).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(b);
}

#[test]
fn no_address_is_a_clear_error() {
    let pki = pki();
    let cfg = client_config(&pki.ca_pem, None, ExpectedPeer::AnyCcf).unwrap();
    let e =
        ccf_core::tls::connect_replicas(&[], "localhost", cfg, Duration::from_secs(1)).unwrap_err();
    assert_eq!(e.to_string(), "no address to connect to");
}

#[test]
fn a_link_names_one_address_or_its_replicas() {
    use ccf_core::tls::replica_addresses;
    let two = vec!["10.0.0.1:8443".to_string(), "10.0.0.2:8443".to_string()];
    assert_eq!(
        replica_addresses("ccf:8443", &[]).unwrap(),
        vec!["ccf:8443".to_string()]
    );
    assert_eq!(replica_addresses("", &two).unwrap(), two);
    assert_eq!(
        replica_addresses("ccf:8443", &two).unwrap_err().to_string(),
        "give `address` (one server) or `addresses` (its replicas), not both"
    );
    assert_eq!(
        replica_addresses("", &[]).unwrap_err().to_string(),
        "no address to connect to"
    );
}
