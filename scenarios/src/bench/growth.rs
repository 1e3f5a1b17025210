//! Case (h) of `capif bench`: how the gateway's cost grows with the number of partners and
//! with the number of cached entries. A gateway of operator-a (the real `capif-gateway` binary,
//! a process of its own) is configured with 1, 8 and 32 partners, each a bare partner answerer
//! (`capif bench-partner`: `Interconnect.FetchSecurityInformation` echoing the ids asked for
//! into an answer of the usual size) with its own CA, at a static address; then, with one
//! partner, the cache is filled from 1k to 1M entries through ordinary misses. Each row
//! measures the miss path (unique keys) and the hit path (keys already cached); the table gives
//! each row's growth factor against the first.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow};
use capif_proto::v1::{self as pb, gateway_client::GatewayClient};
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::CcfId;
use ccf_core::pki::DomainCa;
use ccf_core::tls::ExpectedPeer;
use tokio::process::Child;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::{BenchOpts, Measured, closed_loop, not_a_floor_rpc};
use crate::testbed::{DomainPlan, spawn_ready};

/// A bare partner: answers every `Interconnect.FetchSecurityInformation` with the example
/// answer about the invoker, home and AEF asked for (the gateway checks that an answer is about
/// what it asked). No store, no checks: its cost is the floor's.
#[derive(Clone)]
pub struct PartnerAnswerer {
    answer: pb::InvokerSecurityInformation,
}

#[tonic::async_trait]
impl pb::interconnect_server::Interconnect for PartnerAnswerer {
    async fn fetch_security_information(
        &self,
        request: Request<pb::SecurityInformationQuery>,
    ) -> Result<Response<pb::InvokerSecurityInformation>, Status> {
        let q = request.into_inner();
        let mut a = self.answer.clone();
        a.api_invoker_id = q.api_invoker_id;
        a.home_ccf_id = q.home_ccf_id;
        a.aef_id = q.aef_id;
        Ok(Response::new(a))
    }
    async fn notify_revocation(
        &self,
        _: Request<pb::RevocationNotice>,
    ) -> Result<Response<pb::RevocationAck>, Status> {
        Err(not_a_floor_rpc())
    }
    async fn get_token_key_set(
        &self,
        _: Request<pb::TokenKeySetRequest>,
    ) -> Result<Response<pb::TokenKeySet>, Status> {
        Err(not_a_floor_rpc())
    }
}

/// Serves one partner answerer until killed (`capif bench-partner`): its own certificate and
/// key (a partner gateway's, under the partner's CA) and the CA its callers' certificates must
/// chain to. Prints a ready line with the address.
pub async fn serve_partner(cert: &Path, key: &Path, client_ca: &Path, listen: &str) -> Result<()> {
    let (cert, key, client_ca) = (
        std::fs::read_to_string(cert)?,
        std::fs::read_to_string(key)?,
        std::fs::read_to_string(client_ca)?,
    );
    let routes = tonic::service::Routes::new(pb::interconnect_server::InterconnectServer::new(
        PartnerAnswerer {
            answer: capif_proto::example_security_information(),
        },
    ));
    super::serve_bare("bench-partner", listen, (&cert, &key, &client_ca), routes).await
}

/// The id of the `i`-th growth partner.
fn partner_id(i: usize) -> String {
    format!("partner-{i}.test")
}

/// An invoker id unique to (`tag`, `k`), in the syntax the gateway accepts.
fn invoker_id(tag: u32, k: u64) -> String {
    format!("inv-{tag:04x}{k:012x}")
}

/// One running partner answerer.
struct Partner {
    id: String,
    ca_pem: PathBuf,
    addr: String,
    _child: Child,
}

/// Generates partner `i`'s own CA and gateway certificate and starts its answerer.
async fn start_partner(
    i: usize,
    dir: &Path,
    capif_bin: &Path,
    client_ca: &Path,
) -> Result<Partner> {
    let id = partner_id(i);
    let pdir = dir.join(&id);
    std::fs::create_dir_all(&pdir)?;
    let ccf = CcfId::new(&id)?;
    let ca = DomainCa::load_or_generate(&ccf, &pdir.join("ca"), None, None)?;
    let c = ca.issue_with_new_key(
        &PeerIdentity::new(ccf, Role::Gateway),
        &["localhost".into()],
        1,
    )?;
    let (ca_pem, cert, key) = (
        pdir.join("ca.pem"),
        pdir.join("gateway.pem"),
        pdir.join("gateway.key"),
    );
    std::fs::write(&ca_pem, ca.cert_pem())?;
    std::fs::write(&cert, format!("{}{}", c.cert_pem, ca.cert_pem()))?;
    std::fs::write(&key, c.key_pem.as_str())?;
    let args: Vec<String> = vec![
        "bench-partner".into(),
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        key.display().to_string(),
        "--client-ca".into(),
        client_ca.display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    let (child, line) = spawn_ready(capif_bin, &args, &dir.join(format!("logs/{id}.log"))).await?;
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .ok_or_else(|| anyhow!("partner answerer printed no address: {line}"))?
        .to_string();
    Ok(Partner {
        id,
        ca_pem,
        addr,
        _child: child,
    })
}

/// A free loopback port below the ephemeral range (see the testbed's own `free_port`).
fn port() -> Result<u16> {
    for _ in 0..500 {
        let p = 20000 + rand::random::<u16>() % 12000;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return Ok(p);
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The configuration of the growth gateway: operator-a's certificates, the given partners at
/// their static addresses, budgets and cache sized so neither the outbound budget nor eviction
/// nor expiry is what is measured.
fn gateway_conf(
    a: &DomainPlan,
    state: &Path,
    ports: (u16, u16),
    partners: &[(&str, &Path, &str)],
) -> String {
    let d = a.dir.display();
    let mut c = format!(
        r#"ccf_id = "{id}"
state_dir = "{state}"

[listen]
capif6 = "127.0.0.1:{p6}"
capif6e = "127.0.0.1:{p6e}"

[tls]
ca_cert = "{d}/ca.pem"
cert = "{d}/gateway.pem"
key = "{d}/gateway.key"
interconnect_cert = "{d}/gateway-interconnect.pem"
interconnect_key = "{d}/gateway-interconnect.key"

[ccf]
address = "127.0.0.1:{ccf}"

[outbound]
fetch_rate_per_sec = 100000000
fetch_burst = 100000000

[cache]
max_ttl_secs = 86400
max_weight = 17179869184
"#,
        id = a.id,
        state = state.display(),
        p6 = ports.0,
        p6e = ports.1,
        ccf = a.capif_port,
    );
    for (id, ca_pem, addr) in partners {
        let _ = write!(
            c,
            "\n[[partner]]\nccf_id = \"{id}\"\nca_cert = \"{}\"\naddress = \"{addr}\"\n",
            ca_pem.display(),
        );
    }
    c
}

/// The growth gateway: a `capif-gateway` process with `partners`; its CAPIF-6 channel as
/// operator-a's CCF.
async fn start_gateway(
    a: &DomainPlan,
    dir: &Path,
    bin_dir: &Path,
    partners: &[Partner],
    ccf_cred: &(String, String, String),
) -> Result<(Channel, Child)> {
    let gdir = dir.join(format!("gateway-{}", partners.len()));
    std::fs::create_dir_all(&gdir)?;
    let ports = (port()?, port()?);
    let conf = gdir.join("gateway.toml");
    let entries: Vec<(&str, &Path, &str)> = partners
        .iter()
        .map(|p| (p.id.as_str(), p.ca_pem.as_path(), p.addr.as_str()))
        .collect();
    std::fs::write(&conf, gateway_conf(a, &gdir.join("state"), ports, &entries))?;
    let (child, _) = spawn_ready(
        &bin_dir.join("capif-gateway"),
        &["--config".into(), conf.display().to_string()],
        &dir.join(format!("logs/gateway-{}.log", partners.len())),
    )
    .await?;
    let ch = super::channel(
        &format!("127.0.0.1:{}", ports.0),
        ccf_cred,
        ExpectedPeer::gateway(&CcfId::new(&a.id)?),
    )
    .await?;
    Ok((ch, child))
}

/// Lookups of (home, invoker) keys at the growth gateway, cycling through `keys`.
fn lookup(ch: Channel, keys: Arc<Vec<(String, String)>>) -> impl super::Op {
    move |i: u64| {
        let mut c = GatewayClient::new(ch.clone());
        let (home, invoker) = keys[i as usize % keys.len()].clone();
        async move {
            c.fetch_security_information(pb::SecurityInformationQuery {
                api_invoker_id: invoker,
                home_ccf_id: home,
                aef_id: "aef-weather".into(),
                presented_key_id: String::new(),
                security_method: 0,
            })
            .await
            .map(|_| ())
            .map_err(|e| anyhow!("{e}"))
        }
    }
}

/// `n` keys never asked before (tagged `tag`), spread over the first `partners` partners.
fn fresh_keys(tag: u32, from: u64, n: u64, partners: usize) -> Vec<(String, String)> {
    (from..from + n)
        .map(|k| (partner_id(k as usize % partners + 1), invoker_id(tag, k)))
        .collect()
}

/// One row of the growth table.
pub struct Row {
    pub label: String,
    pub miss: Measured,
    pub hit: Measured,
}

/// Misses over `miss_keys` (each once), then hits cycling through `hit_keys` for the run's
/// duration.
async fn measure(
    opts: &BenchOpts,
    ch: &Channel,
    label: String,
    miss_keys: Vec<(String, String)>,
    hit_keys: Vec<(String, String)>,
) -> Row {
    let n = miss_keys.len() as u64;
    let miss = closed_loop(
        opts.concurrency,
        Duration::from_secs(3600),
        Some(n),
        lookup(ch.clone(), Arc::new(miss_keys)),
    )
    .await;
    let hit_keys = Arc::new(hit_keys);
    closed_loop(
        opts.concurrency,
        super::WARM_UP,
        None,
        lookup(ch.clone(), hit_keys.clone()),
    )
    .await;
    let hit = closed_loop(
        opts.concurrency,
        opts.duration,
        None,
        lookup(ch.clone(), hit_keys),
    )
    .await;
    Row { label, miss, hit }
}

/// The growth table: per row the miss and hit p50 and throughput, and each one's factor
/// against the first row (p50: row / first; throughput: row / first).
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "    | row | miss p50 ms | miss ops/s | hit p50 ms | hit ops/s | growth: miss p50 | miss tput | hit p50 | hit tput |\n    |---|---|---|---|---|---|---|---|---|\n",
    );
    let Some(first) = rows.first() else {
        return s;
    };
    for r in rows {
        let _ = writeln!(
            s,
            "    | {} | {:.3} | {:.0} | {:.3} | {:.0} | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
            r.label,
            r.miss.q(0.5),
            r.miss.throughput(),
            r.hit.q(0.5),
            r.hit.throughput(),
            r.miss.q(0.5) / first.miss.q(0.5),
            r.miss.throughput() / first.miss.throughput(),
            r.hit.q(0.5) / first.hit.q(0.5),
            r.hit.throughput() / first.hit.throughput(),
        );
    }
    s
}

/// (h): partners 1, 8, 32 (`opts.growth_partners`) at `opts.growth_entries[0]` cached entries,
/// then with one partner the cache grown to `opts.growth_entries[1]`. Returns the rows (for the
/// run's error check).
pub async fn case_h(
    opts: &BenchOpts,
    a: &DomainPlan,
    ccf_cred: &(String, String, String),
    run_dir: &Path,
    capif_bin: &Path,
    bin_dir: &Path,
    say: &mut impl FnMut(String),
) -> Result<Vec<Row>> {
    let dir = run_dir.join("growth");
    let max = opts.growth_partners.iter().copied().max().unwrap_or(1);
    let (small, large) = (
        opts.growth_entries.first().copied().unwrap_or(1000) as u64,
        opts.growth_entries.last().copied().unwrap_or(1000) as u64,
    );
    let mut partners = Vec::new();
    for i in 1..=max {
        partners.push(start_partner(i, &dir, capif_bin, &a.ca_pem()).await?);
    }
    let mut rows = Vec::new();
    for (tag, &n) in opts.growth_partners.iter().enumerate() {
        let (ch, mut gw) = start_gateway(a, &dir, bin_dir, &partners[..n], ccf_cred).await?;
        // One fetch per partner first: the links' handshakes are not what the rows compare.
        let warm = fresh_keys(0xfffd, tag as u64 * 1000, n as u64, n);
        closed_loop(
            n,
            Duration::from_secs(3600),
            Some(n as u64),
            lookup(ch.clone(), Arc::new(warm)),
        )
        .await;
        let keys = fresh_keys(tag as u32, 0, small, n);
        let row = measure(
            opts,
            &ch,
            format!(
                "{n} partner{}, {small} entries",
                if n == 1 { "" } else { "s" }
            ),
            keys.clone(),
            keys,
        )
        .await;
        rows.push(row);
        if n == 1 && large > small {
            // Grow the same cache to `large` entries through ordinary misses, then measure
            // misses of new keys and hits spread over the whole cache.
            let fill_tag = 0xffff;
            closed_loop(
                opts.concurrency.max(64),
                Duration::from_secs(3600),
                Some(large - small),
                lookup(
                    ch.clone(),
                    Arc::new(fresh_keys(fill_tag, 0, large - small, 1)),
                ),
            )
            .await;
            let spread = (0..small)
                .map(|k| {
                    // Every (large/small)-th key of the fill: hits all over the table.
                    (
                        partner_id(1),
                        invoker_id(fill_tag, k * ((large - small) / small).max(1)),
                    )
                })
                .collect();
            let row = measure(
                opts,
                &ch,
                format!("1 partner, {large} entries"),
                fresh_keys(0xfffe, 0, small, 1),
                spread,
            )
            .await;
            rows.push(row);
        }
        let _ = gw.kill().await;
    }
    say(String::new());
    say(format!(
        "(h) how cost grows: a gateway of operator-a with 1..{max} bare partners (each its own CA), {small} vs {large} cached entries; misses of {small} unique keys, hits for {:?}",
        opts.duration
    ));
    for r in &rows {
        say(r.miss.line(&format!("  miss, {}", r.label)));
        say(r.hit.line(&format!("  hit,  {}", r.label)));
        for m in [&r.miss, &r.hit] {
            if let Some(e) = &m.first_error {
                say(format!("    errors: {} (first: {e})", m.errors));
            }
        }
    }
    say(table(&rows).trim_end().to_string());
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invoker_ids_are_valid_and_distinct_per_tag() {
        let a = invoker_id(1, 7);
        assert_eq!(a, "inv-0001000000000007");
        ccf_core::ids::ApiInvokerId::new(&a).unwrap();
        ccf_core::ids::ApiInvokerId::new(invoker_id(0xffff, 999_999)).unwrap();
        assert_ne!(invoker_id(1, 7), invoker_id(2, 7));
        let keys = fresh_keys(3, 0, 16, 8);
        assert_eq!(
            keys.iter()
                .map(|k| &k.0)
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            8,
            "keys spread over every partner"
        );
        assert!(
            keys.iter().all(|k| k.0 != partner_id(0)),
            "partners count from 1"
        );
    }

    #[test]
    fn table_gives_each_rows_growth_against_the_first() {
        let m = |us: u64, ops: u64| {
            let mut hist =
                hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            hist.record(us).unwrap();
            Measured {
                hist,
                ops,
                errors: 0,
                first_error: None,
                elapsed: Duration::from_secs(1),
            }
        };
        let rows = [
            Row {
                label: "1 partner".into(),
                miss: m(1000, 100),
                hit: m(500, 1000),
            },
            Row {
                label: "32 partners".into(),
                miss: m(2000, 50),
                hit: m(500, 1000),
            },
        ];
        let t = table(&rows);
        assert!(
            t.contains(
                "| 1 partner | 1.000 | 100 | 0.500 | 1000 | 1.00x | 1.00x | 1.00x | 1.00x |"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "| 32 partners | 2.000 | 50 | 0.500 | 1000 | 2.00x | 0.50x | 1.00x | 1.00x |"
            ),
            "{t}"
        );
    }
}
