//! `capif-gateway-cache-memory`: the gateway's measurement of its own cache, case (f) of
//! `capif bench` (docs/BENCHMARKS.md): fills a `KeyCache` with N entries in a fresh process and
//! prints the RSS growth per entry, and the overhead beyond the entry's own bytes.

use anyhow::{Result, anyhow};
use capif_gateway::cache::{CacheKey, KeyCache};
use capif_gateway::config::CacheConfig;
use ccf_core::ids::{AefId, ApiInvokerId, CcfId};
use tonic::Status;

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 4096
}

/// Fills a gateway cache with `n` entries in this (fresh) process; reports the RSS growth.
async fn memory_case(n: usize) -> Result<String> {
    let cache = KeyCache::new(&CacheConfig {
        max_weight: u64::MAX / 2,
        ..Default::default()
    });
    let home = CcfId::new("operator-b.test")?;
    let aef = AefId::new("aef-weather")?;
    let sample = capif_proto::example_security_information();
    let payload = {
        let k = "inv-0123456789abcdef".len() + home.as_str().len() + aef.as_str().len();
        let v = sample.api_invoker_id.len()
            + sample.home_ccf_id.len()
            + sample.aef_id.len()
            + 32
            + sample.key_id.len()
            + sample.interface_canonical.len()
            + sample
                .allowed_api_names
                .iter()
                .map(String::len)
                .sum::<usize>()
            + 8
            + 4;
        k + v
    };
    let before = rss_bytes();
    for i in 0..n {
        let key = CacheKey {
            home: home.clone(),
            invoker: ApiInvokerId::new(format!("inv-{i:016x}"))?,
            aef: aef.clone(),
        };
        let mut ans = sample.clone();
        ans.api_invoker_id = key.invoker.to_string();
        cache
            .get_or_fetch(key, "", 0, async move { Ok::<_, Status>(ans) })
            .await
            .map_err(|e| anyhow!("{e}"))?;
    }
    cache.sync().await;
    let after = rss_bytes();
    let per = (after.saturating_sub(before)) as f64 / n as f64;
    let over = per - payload as f64;
    Ok(format!(
        "  {n:>8} entries: RSS +{:.1} MiB, {per:.0} bytes/entry; key+value themselves {payload} bytes; overhead {over:.0} bytes/entry (target <= 300: {})",
        (after.saturating_sub(before)) as f64 / 1048576.0,
        if over <= 300.0 { "met" } else { "NOT met" }
    ))
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = match (args.next().as_deref(), args.next()) {
        (Some("--entries"), Some(n)) => n.parse().map_err(|e| anyhow!("--entries {n}: {e}"))?,
        _ => return Err(anyhow!("usage: capif-gateway-cache-memory --entries N")),
    };
    let rt = tokio::runtime::Runtime::new()?;
    println!("{}", rt.block_on(memory_case(n))?);
    Ok(())
}
