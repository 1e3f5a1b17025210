//! Case (i) of `capif bench`: replicas and the store (issue 17). Three two-domain testbeds from
//! the launcher, each brought up, measured and brought down in turn: redb with one replica per
//! role (the default), PostgreSQL with one, and PostgreSQL with two CCF and two gateway replicas
//! in both domains. Each is measured as case (b) then case (a) measure the main testbed: the
//! client plays CCF-A (for two replicas, balanced over both of A's gateway replicas with
//! `ccf_core::tls::connect_replicas`, as CCF-A's own client is), first misses with unique keys
//! (A → B → CCF-B, each writing B's fetch record in B's store), then hits on one key. The table
//! and the ratio lines answer the issue: PostgreSQL vs redb on the miss path, two replicas vs
//! one. A control separates what two replicas add from what two client connections add: on the
//! one-replica PostgreSQL testbed, hits again through the balancer over two connections to the
//! one gateway. Each gateway replica's counters say how the load was spread.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow};
use capif_proto::v1::{self as pb, gateway_admin_client::GatewayAdminClient};
use ccf_core::identity::Role;
use ccf_core::ids::CcfId;
use ccf_core::telemetry::TracedChannel;
use ccf_core::tls::{ExpectedPeer, client_config, connect_replicas};

use super::{BenchOpts, Measured, WARM_UP, closed_loop, credential, onboard_invokers, query};
use crate::scenario::Scenario;
use crate::testbed::{DomainPlan, Testbed};

/// One testbed of the case: its label, store and replicas per role (both domains alike).
struct Setup {
    label: &'static str,
    store: &'static str,
    replicas: u32,
    /// Also measure hits with the two-replica client's machinery (the p2c balancer over two
    /// connections) aimed twice at the one gateway: what two replicas gain beyond two
    /// connections.
    control: bool,
}

const SETUPS: [Setup; 3] = [
    Setup {
        label: "redb, 1 replica",
        store: "redb",
        replicas: 1,
        control: false,
    },
    Setup {
        label: "PostgreSQL, 1 replica",
        store: "postgres",
        replicas: 1,
        control: true,
    },
    Setup {
        label: "PostgreSQL, 2 replicas",
        store: "postgres",
        replicas: 2,
        control: false,
    },
];

/// The testbed of one row: case (b)'s fetch budget at A (the miss path, not the defence), B home
/// of the invokers.
const SCENARIO: &str = r#"
name = "bench-replicas"
[[domain]]
id = "operator-a.test"
store = "STORE"
replicas = REPLICAS
gateway_fetch_rate_per_sec = 1000000
gateway_fetch_burst = 1000000
[[domain.aef]]
id = "aef-weather"
apis = ["weather-v1"]
[[domain]]
id = "operator-b.test"
store = "STORE"
replicas = REPLICAS
[[invoker]]
name = "bench"
home = "operator-b.test"
count = COUNT
"#;

/// One row of the table.
pub struct Row {
    /// Which testbed.
    pub label: String,
    /// Misses with unique keys.
    pub miss: Measured,
    /// Hits on one key.
    pub hit: Measured,
    /// Hits on one key over two balanced connections to the one gateway (the control).
    pub hit_two_connections: Option<Measured>,
    /// Requests served per gateway replica of A (hits, misses and coalesced), then of B
    /// (partner requests), replica 1 first.
    pub spread: (Vec<u64>, Vec<u64>),
}

/// Runs the three testbeds in turn under `run_dir/i-<n>`; returns their rows (errors are
/// counted in the rows, the caller fails on them after the report).
pub async fn case_i(
    opts: &BenchOpts,
    run_dir: &Path,
    bin_dir: &Path,
    say: &mut impl FnMut(String),
) -> Result<Vec<Row>> {
    say(String::new());
    say(format!(
        "(i) replicas and store: cross-domain miss ({} unique keys) then hit (one key, {:.1} s), client as CCF-A, on {} cores shared by every process",
        opts.replicas_keys,
        opts.replicas_duration.as_secs_f64(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    ));
    let mut rows = Vec::new();
    for (n, setup) in SETUPS.iter().enumerate() {
        let text = SCENARIO
            .replace("STORE", setup.store)
            .replace("REPLICAS", &setup.replicas.to_string())
            .replace("COUNT", &(opts.replicas_keys + 1).to_string());
        let s = Scenario::parse(&text, "bench replicas scenario")?;
        let dir = run_dir.join(format!("i-{}", n + 1));
        let mut tb = Testbed::up(&s, &dir, bin_dir, true).await?;
        let row = measure(opts, &tb, &dir, setup, say).await;
        tb.down().await;
        let row = row?;
        say(row.miss.line(&format!("  miss, {}", row.label)));
        say(row.hit.line(&format!("  hit,  {}", row.label)));
        if let Some(c) = &row.hit_two_connections {
            say(c.line("  hit,  same, 2 connections"));
        }
        say(format!(
            "    requests served per gateway replica: A {:?}, B {:?}",
            row.spread.0, row.spread.1
        ));
        for m in [&row.miss, &row.hit]
            .into_iter()
            .chain(&row.hit_two_connections)
        {
            if let Some(e) = &m.first_error {
                say(format!("    errors: {} (first: {e})", m.errors));
            }
        }
        rows.push(row);
    }
    say(table(&rows).trim_end().to_string());
    for line in ratios(&rows) {
        say(line);
    }
    Ok(rows)
}

/// Onboards the invokers, then misses over all but one of them and hits on the last.
async fn measure(
    opts: &BenchOpts,
    tb: &Testbed,
    dir: &Path,
    setup: &Setup,
    say: &mut impl FnMut(String),
) -> Result<Row> {
    let a = &tb.domains["operator-a.test"];
    let b = &tb.domains["operator-b.test"];
    let (_, mut ids) = onboard_invokers(opts.replicas_keys + 1, b, dir, say).await?;
    let hot = Arc::new(vec![
        ids.pop().ok_or_else(|| anyhow!("no invoker onboarded"))?,
    ]);
    let misses = Arc::new(ids);
    let cred = credential(tb, &a.id, Role::Ccf)?;
    let a_id = CcfId::new(&a.id)?;
    let addrs: Vec<String> = a
        .replicas()
        .iter()
        .map(|r| format!("127.0.0.1:{}", r.gw6_port))
        .collect();
    let tls = client_config(
        &cred.0,
        Some((&cred.1, &cred.2)),
        ExpectedPeer::gateway(&a_id),
    )?;
    // CCF-A's own client: one channel for one address, the p2c balancer for several.
    let client = |addrs: &[String]| -> Result<TracedChannel> {
        Ok(TracedChannel::new(
            connect_replicas(addrs, "localhost", tls.clone(), Duration::from_secs(5))?,
            "gateway-A",
        )
        .without_propagation())
    };
    let ch = client(&addrs)?;
    let before = (served(tb, a, false).await?, served(tb, b, true).await?);
    // Connections to every replica and A's links to B, before anything is measured.
    closed_loop(
        opts.concurrency,
        WARM_UP,
        None,
        lookup(ch.clone(), hot.clone()),
    )
    .await;
    let miss = closed_loop(
        opts.concurrency,
        Duration::from_secs(3600),
        Some(misses.len() as u64),
        lookup(ch.clone(), misses),
    )
    .await;
    closed_loop(
        opts.concurrency,
        WARM_UP,
        None,
        lookup(ch.clone(), hot.clone()),
    )
    .await;
    let hit = closed_loop(
        opts.concurrency,
        opts.replicas_duration,
        None,
        lookup(ch, hot.clone()),
    )
    .await;
    let hit_two_connections = if setup.control {
        let twice = client(&[addrs[0].clone(), addrs[0].clone()])?;
        closed_loop(
            opts.concurrency,
            WARM_UP,
            None,
            lookup(twice.clone(), hot.clone()),
        )
        .await;
        Some(
            closed_loop(
                opts.concurrency,
                opts.replicas_duration,
                None,
                lookup(twice, hot),
            )
            .await,
        )
    } else {
        None
    };
    let after = (served(tb, a, false).await?, served(tb, b, true).await?);
    let delta = |x: Vec<u64>, y: Vec<u64>| x.iter().zip(y).map(|(x, y)| x - y).collect();
    Ok(Row {
        label: setup.label.to_string(),
        miss,
        hit,
        hit_two_connections,
        spread: (delta(after.0, before.0), delta(after.1, before.1)),
    })
}

/// One CAPIF-6 lookup per operation, cycling through `ids`.
fn lookup(ch: TracedChannel, ids: Arc<Vec<String>>) -> impl super::Op {
    move |i: u64| {
        let mut c = pb::gateway_client::GatewayClient::new(ch.clone());
        let id = ids[i as usize % ids.len()].clone();
        async move {
            c.fetch_security_information(query(&id))
                .await
                .map(|_| ())
                .map_err(|e| anyhow!("{e}"))
        }
    }
}

/// Requests served so far by each gateway replica of `d` (its operator's admin view): the
/// lookups it answered (`partner` false: hits, misses, coalesced) or the partner requests it
/// served (`partner` true).
async fn served(tb: &Testbed, d: &DomainPlan, partner: bool) -> Result<Vec<u64>> {
    let cred = credential(tb, &d.id, Role::Operator)?;
    let id = CcfId::new(&d.id)?;
    let mut out = Vec::new();
    for r in d.replicas() {
        let ch = super::channel(
            &format!("127.0.0.1:{}", r.gw6_port),
            &cred,
            ExpectedPeer::gateway(&id),
        )
        .await?;
        let s = GatewayAdminClient::new(ch)
            .get_status(pb::GetStatusRequest {})
            .await?
            .into_inner();
        out.push(if partner {
            s.partner_requests_served
        } else {
            s.cache_hits + s.cache_misses + s.coalesced
        });
    }
    Ok(out)
}

/// The table: per testbed the miss and hit throughput, p50 and p99.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "    | testbed | miss ops/s | miss p50 ms | miss p99 ms | hit ops/s | hit p50 ms | hit p99 ms |\n    |---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "    | {} | {:.0} | {:.3} | {:.3} | {:.0} | {:.3} | {:.3} |",
            r.label,
            r.miss.throughput(),
            r.miss.q(0.5),
            r.miss.q(0.99),
            r.hit.throughput(),
            r.hit.q(0.5),
            r.hit.q(0.99),
        );
        if let Some(c) = &r.hit_two_connections {
            let _ = writeln!(
                s,
                "    | {}, 2 connections (control) | — | — | — | {:.0} | {:.3} | {:.3} |",
                r.label,
                c.throughput(),
                c.q(0.5),
                c.q(0.99),
            );
        }
    }
    s
}

/// The ratios the issue asks for: PostgreSQL vs redb on the miss path (rows 2 and 1), and two
/// gateway replicas vs one on PostgreSQL (rows 3 and 2), miss and hit.
pub fn ratios(rows: &[Row]) -> Vec<String> {
    let [redb, pg1, pg2] = rows else {
        return Vec::new();
    };
    let vs = |x: &Measured, y: &Measured| {
        format!(
            "throughput {:.2}x, p50 {:.2}x, p99 {:.2}x",
            x.throughput() / y.throughput(),
            x.q(0.5) / y.q(0.5),
            x.q(0.99) / y.q(0.99)
        )
    };
    let mut out = vec![
        format!(
            "    PostgreSQL vs redb, miss path (1 replica): {}",
            vs(&pg1.miss, &redb.miss)
        ),
        format!(
            "    2 vs 1 gateway replicas (PostgreSQL), miss: {}",
            vs(&pg2.miss, &pg1.miss)
        ),
        format!(
            "    2 vs 1 gateway replicas (PostgreSQL), hit:  {}",
            vs(&pg2.hit, &pg1.hit)
        ),
    ];
    if let Some(c) = &pg1.hit_two_connections {
        out.push(format!(
            "    2 replicas vs 1 over 2 connections (control), hit: {}",
            vs(&pg2.hit, c)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(us: u64, ops: u64) -> Measured {
        let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        hist.record(us).unwrap();
        Measured {
            hist,
            ops,
            errors: 0,
            first_error: None,
            elapsed: Duration::from_secs(1),
        }
    }

    fn row(label: &str, miss: (u64, u64), hit: (u64, u64)) -> Row {
        Row {
            label: label.into(),
            miss: m(miss.0, miss.1),
            hit: m(hit.0, hit.1),
            hit_two_connections: None,
            spread: (vec![], vec![]),
        }
    }

    #[test]
    fn the_table_and_ratios_compare_store_and_replicas() {
        let mut rows = [
            row("redb, 1 replica", (1000, 5000), (500, 20000)),
            row("PostgreSQL, 1 replica", (2000, 2500), (500, 20000)),
            row("PostgreSQL, 2 replicas", (2000, 2000), (1000, 10000)),
        ];
        rows[1].hit_two_connections = Some(m(250, 40000));
        let t = table(&rows);
        assert!(
            t.contains("| PostgreSQL, 1 replica | 2500 | 2.000 | 2.000 | 20000 | 0.500 | 0.500 |"),
            "{t}"
        );
        assert!(
            t.contains("| PostgreSQL, 1 replica, 2 connections (control) | — | — | — | 40000 | 0.250 | 0.250 |"),
            "{t}"
        );
        let r = ratios(&rows);
        assert_eq!(r.len(), 4);
        assert!(
            r[0].ends_with("miss path (1 replica): throughput 0.50x, p50 2.00x, p99 2.00x"),
            "{r:?}"
        );
        assert!(
            r[1].ends_with("miss: throughput 0.80x, p50 1.00x, p99 1.00x"),
            "{r:?}"
        );
        assert!(
            r[2].ends_with("hit:  throughput 0.50x, p50 2.00x, p99 2.00x"),
            "{r:?}"
        );
        assert!(
            r[3].ends_with("(control), hit: throughput 0.25x, p50 4.00x, p99 4.00x"),
            "{r:?}"
        );
        assert!(ratios(&rows[..2]).is_empty(), "no ratios without every row");
    }
}
