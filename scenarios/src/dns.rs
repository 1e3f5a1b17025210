//! The testbed's DNS server: hickory-server on loopback, one zone per domain with the SRV record
//! `_capif-6e._tcp.<domain>` naming `gw.<domain>` and its A record, so gateways discover each
//! other the way they would between operators. A domain with gateway replicas gets one SRV
//! record per replica, of equal priority and weight (same target, each replica's port).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow};
use hickory_proto::rr::{LowerName, Name};
use hickory_proto::serialize::txt::Parser;
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

/// A running DNS server; stops when dropped.
pub struct DnsServer {
    /// Where it answers (UDP and TCP).
    pub addr: SocketAddr,
    _server: hickory_server::Server<Catalog>,
}

/// The zone text of one domain whose gateway replicas listen on 127.0.0.1:`ports`.
pub fn zone_text(domain: &str, ports: &[u16]) -> String {
    let mut t = format!("@ 60 IN SOA ns.{domain}. admin.{domain}. 1 60 60 60 60\n");
    for port in ports {
        t += &format!("_capif-6e._tcp 5 IN SRV 10 10 {port} gw.{domain}.\n");
    }
    t + "gw 5 IN A 127.0.0.1\n"
}

impl DnsServer {
    /// Serves `(domain, gateway CAPIF-6e port)` zones on a free loopback port.
    pub async fn start(domains: &[(String, u16)]) -> Result<Self> {
        let zones: Vec<(String, Vec<u16>)> =
            domains.iter().map(|(d, p)| (d.clone(), vec![*p])).collect();
        Self::start_replicas(&zones).await
    }

    /// Serves `(domain, its gateway replicas' CAPIF-6e ports)` zones on a free loopback port.
    pub async fn start_replicas(domains: &[(String, Vec<u16>)]) -> Result<Self> {
        let mut catalog = Catalog::new();
        for (d, ports) in domains {
            let origin = Name::from_ascii(format!("{d}.")).map_err(|e| anyhow!("zone {d}: {e}"))?;
            let (origin, records) = Parser::new(zone_text(d, ports), None, Some(origin))
                .parse()
                .map_err(|e| anyhow!("zone {d}: {e}"))?;
            let handler =
                InMemoryZoneHandler::<hickory_resolver::net::runtime::TokioRuntimeProvider>::new(
                    origin.clone(),
                    records,
                    ZoneType::Primary,
                    AxfrPolicy::Deny,
                )
                .map_err(|e| anyhow!("zone {d}: {e}"))?;
            catalog.upsert(LowerName::new(&origin), vec![Arc::new(handler)]);
        }
        // UDP and TCP on one port: the free UDP port the kernel picks may be taken for TCP (by
        // another process's connection, say); then try another, a bounded number of times.
        let mut tries = 0;
        let (udp, addr, tcp) = loop {
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
            let addr = udp.local_addr()?;
            match tokio::net::TcpListener::bind(addr).await {
                Ok(tcp) => break (udp, addr, tcp),
                Err(_) if tries < 50 => tries += 1,
                Err(e) => return Err(anyhow!("no loopback port free for both UDP and TCP: {e}")),
            }
        };
        let mut server = hickory_server::Server::new(catalog);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64);
        Ok(Self {
            addr,
            _server: server,
        })
    }
}
