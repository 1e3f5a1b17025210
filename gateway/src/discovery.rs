//! Where a partner's gateway is: a static address from config, or DNS SRV
//! `_capif-6e._tcp.<ccf-id>` (hickory-resolver; nameserver configurable so a testbed can use its
//! own DNS server), ordered by priority and, within a priority, by weighted random choice
//! (RFC 2782), each target resolved to its A/AAAA addresses. DNS only locates: who may answer is
//! decided by the trust rules.

use std::net::SocketAddr;
use std::time::Duration;

use ccf_core::ids::CcfId;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use rand::Rng;

/// SRV service label of CAPIF-6e.
pub const SRV_PREFIX: &str = "_capif-6e._tcp.";

/// One address to try, with the name it came from (used as TLS SNI).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The SRV target or configured host.
    pub host: String,
    /// Where to connect.
    pub addr: SocketAddr,
}

/// Why discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The configured nameserver is not `ip:port`.
    #[error("DNS resolver: nameserver {0:?} is not ip:port")]
    BadNameserver(String),
    /// The resolver could not be built.
    #[error("DNS resolver: {0}")]
    Resolver(#[source] NetError),
    /// The SRV lookup failed.
    #[error("no SRV record {name}: {source}")]
    SrvLookup {
        /// The name asked.
        name: String,
        /// The resolver's error.
        #[source]
        source: NetError,
    },
    /// The SRV lookup answered, with no SRV record.
    #[error("no SRV record {name}: no SRV answers")]
    NoSrv {
        /// The name asked.
        name: String,
    },
    /// No target had an address.
    #[error("the SRV targets of {0} have no A/AAAA records")]
    NoAddress(String),
    /// A static address does not parse.
    #[error("static address {0:?} is not host:port")]
    BadStatic(String),
}

/// The partner locator.
#[derive(Clone)]
pub struct Discovery {
    resolver: TokioResolver,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Discovery")
    }
}

impl Discovery {
    /// A resolver asking `nameserver` (ip:port), or the system's resolvers when `None`.
    pub fn new(nameserver: Option<&str>, timeout: Duration) -> Result<Self, DiscoveryError> {
        let mut builder = match nameserver {
            Some(ns) => {
                let addr: SocketAddr = ns
                    .parse()
                    .map_err(|_| DiscoveryError::BadNameserver(ns.to_string()))?;
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for c in server.connections.iter_mut() {
                    c.port = addr.port();
                }
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], vec![server]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio().map_err(DiscoveryError::Resolver)?,
        };
        let opts = builder.options_mut();
        opts.timeout = timeout;
        opts.attempts = 1;
        // Records change while a testbed runs (a partner moves): do not cache them here.
        opts.cache_size = 0;
        let resolver = builder.build().map_err(DiscoveryError::Resolver)?;
        Ok(Self { resolver })
    }

    /// The ordered targets of a partner.
    pub async fn targets(
        &self,
        partner: &CcfId,
        static_address: Option<&str>,
    ) -> Result<Vec<Target>, DiscoveryError> {
        if let Some(a) = static_address {
            return self.static_targets(a).await;
        }
        let name = format!("{SRV_PREFIX}{partner}.");
        let lookup = self
            .resolver
            .srv_lookup(name.as_str())
            .await
            .map_err(|source| DiscoveryError::SrvLookup {
                name: name.clone(),
                source,
            })?;
        let srvs: Vec<(u16, u16, u16, String)> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some((s.priority, s.weight, s.port, s.target.to_ascii())),
                _ => None,
            })
            .collect();
        if srvs.is_empty() {
            return Err(DiscoveryError::NoSrv { name });
        }
        let ordered = order_srv(srvs, &mut rand::rng());
        let mut targets = Vec::new();
        for (_, _, port, host) in ordered {
            match self.resolver.lookup_ip(host.as_str()).await {
                Ok(ips) => targets.extend(ips.iter().map(|ip| Target {
                    host: host.trim_end_matches('.').to_string(),
                    addr: SocketAddr::new(ip, port),
                })),
                Err(e) => tracing::debug!(%host, error = %e, "SRV target has no address"),
            }
        }
        if targets.is_empty() {
            return Err(DiscoveryError::NoAddress(name));
        }
        Ok(targets)
    }

    async fn static_targets(&self, a: &str) -> Result<Vec<Target>, DiscoveryError> {
        if let Ok(addr) = a.parse::<SocketAddr>() {
            return Ok(vec![Target {
                host: addr.ip().to_string(),
                addr,
            }]);
        }
        let (host, port) = a
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| DiscoveryError::BadStatic(a.to_string()))?;
        let ips = self
            .resolver
            .lookup_ip(host)
            .await
            .map_err(|_| DiscoveryError::NoAddress(host.to_string()))?;
        Ok(ips
            .iter()
            .map(|ip| Target {
                host: host.to_string(),
                addr: SocketAddr::new(ip, port),
            })
            .collect())
    }
}

/// RFC 2782 ordering: ascending priority; within one priority, repeatedly pick a record with
/// probability proportional to its weight (weight 0 records have a small chance, and come last
/// when all weights are 0 in input order).
pub fn order_srv<T: Clone>(
    mut records: Vec<(u16, u16, u16, T)>,
    rng: &mut impl Rng,
) -> Vec<(u16, u16, u16, T)> {
    records.sort_by_key(|r| r.0);
    let mut out = Vec::with_capacity(records.len());
    let mut i = 0;
    while i < records.len() {
        let prio = records[i].0;
        let mut group: Vec<_> = records[i..]
            .iter()
            .take_while(|r| r.0 == prio)
            .cloned()
            .collect();
        i += group.len();
        // Zero-weight records first, as RFC 2782 suggests, so they keep a tiny chance.
        group.sort_by_key(|r| r.1 != 0);
        while !group.is_empty() {
            let total: u32 = group.iter().map(|r| u32::from(r.1)).sum();
            let pick = if total == 0 {
                0
            } else {
                let mut x = rng.random_range(0..=total);
                group
                    .iter()
                    .position(|r| {
                        if x <= u32::from(r.1) {
                            true
                        } else {
                            x -= u32::from(r.1);
                            false
                        }
                    })
                    .unwrap_or(group.len() - 1)
            };
            out.push(group.remove(pick));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_orders_groups() {
        let recs = vec![(20, 1, 1, "c"), (10, 1, 1, "a"), (10, 1, 1, "b")];
        let out = order_srv(recs, &mut rand::rng());
        assert_eq!(out[2].3, "c");
    }

    #[test]
    fn weight_biases_the_first_choice() {
        let mut heavy_first = 0;
        let mut rng = rand::rng();
        for _ in 0..2000 {
            let out = order_srv(vec![(1, 90, 1, "heavy"), (1, 10, 1, "light")], &mut rng);
            if out[0].3 == "heavy" {
                heavy_first += 1;
            }
        }
        // Expected about 1800 of 2000; a wide margin keeps this from flaking.
        assert!((1600..=1960).contains(&heavy_first), "{heavy_first}");
    }
}
