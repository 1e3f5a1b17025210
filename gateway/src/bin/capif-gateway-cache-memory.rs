//! `capif-gateway-cache-memory`: the gateway's measurement of its own cache, case (f) of
//! `capif bench` (docs/BENCHMARKS.md): fills a `KeyCache` with N entries in a fresh process and
//! prints the RSS growth per entry, and the overhead beyond the entry's own bytes.

use anyhow::{Result, anyhow};
use capif_gateway::cache::KeyCache;
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
        let key = cache.key(&home, ApiInvokerId::new(format!("inv-{i:016x}"))?, &aef);
        let mut ans = sample.clone();
        ans.api_invoker_id = key.invoker().to_string();
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

/// The floor under any moka-based cache: `n` entries of a 20-byte key and a 24-byte value with
/// the same policy the gateway's cache has (weigher, capacity, per-entry expiry). What is left
/// of the gateway's overhead above this is ours.
async fn moka_floor(n: usize) -> Result<String> {
    struct Ttl;
    impl moka::Expiry<std::sync::Arc<str>, (u64, u64, u64)> for Ttl {
        fn expire_after_create(
            &self,
            _: &std::sync::Arc<str>,
            _: &(u64, u64, u64),
            _: std::time::Instant,
        ) -> Option<std::time::Duration> {
            Some(std::time::Duration::from_secs(600))
        }
    }
    let cache: moka::future::Cache<std::sync::Arc<str>, (u64, u64, u64)> =
        moka::future::Cache::builder()
            .max_capacity(u64::MAX / 2)
            .weigher(|k: &std::sync::Arc<str>, _| k.len() as u32 + 24)
            .expire_after(Ttl)
            .build();
    let before = rss_bytes();
    for i in 0..n {
        let k: std::sync::Arc<str> = std::sync::Arc::from(format!("inv-{i:016x}"));
        cache.insert(k, (i as u64, 0, 0)).await;
    }
    cache.run_pending_tasks().await;
    let after = rss_bytes();
    let per = (after.saturating_sub(before)) as f64 / n as f64;
    Ok(format!(
        "  {n:>8} entries of moka alone (20-byte key, 24-byte value, same policy): {per:.0} bytes/entry; overhead {:.0} bytes/entry",
        per - 44.0
    ))
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (floor, n) = match (args.next().as_deref(), args.next(), args.next()) {
        (Some("--entries"), Some(n), None) => (false, n),
        (Some("--entries"), Some(n), Some(f)) if f == "--moka-floor" => (true, n),
        _ => {
            return Err(anyhow!(
                "usage: capif-gateway-cache-memory --entries N [--moka-floor]"
            ));
        }
    };
    let n: usize = n.parse().map_err(|e| anyhow!("--entries {n}: {e}"))?;
    let rt = tokio::runtime::Runtime::new()?;
    let line = if floor {
        rt.block_on(moka_floor(n))?
    } else {
        rt.block_on(memory_case(n))?
    };
    println!("{line}");
    Ok(())
}
