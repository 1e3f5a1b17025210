//! The steady load that `capif soak` and `capif chaos` drive through a running [`Testbed`]:
//! invokers of every domain run flows against AEFs of every domain (local and cross-domain),
//! with the three methods mixed, a bounded number at a time, each under a deadline. Every flow's
//! outcome is sent to the caller as a [`Flow`], with what the invoker used (key id and its
//! expiry) and what the AEF answered, so a checker can judge it.
//!
//! Flows of one invoker never overlap (a lock per invoker): its stored key for an AEF is then
//! always the last one it negotiated, which is what the chaos checker's ledger assumes.
//! A pair negotiates again only after [`RENEGOTIATE_AFTER`].

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow};
use capif_2e::psk::TlsProfile;
use capif_proto::v1::{self as pb, invoker_management_client::InvokerManagementClient};
use ccf_core::clock::now_ms;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::invoker::{self, Profile};
use crate::runner::classify;
use crate::scenario::Scenario;
use crate::testbed::Testbed;

/// The domains of a generated load testbed, in order (`operator-a.test` ...).
pub fn domain_ids(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("operator-{}.test", (b'a' + (i % 26) as u8) as char))
        .collect()
}

/// A scenario with `domains` domains, one AEF each (`aef-a` ...), `invokers` invokers per domain
/// (`inv-a-1` ...), a full mesh; `short_validity` gives the last domain that AEFPSK validity.
pub fn scenario(domains: usize, invokers: u32, short_validity: Option<u64>) -> Result<Scenario> {
    let ids = domain_ids(domains.max(1));
    let mut t = String::from("name = \"generated load\"\n");
    for (i, d) in ids.iter().enumerate() {
        let letter = &d["operator-".len().."operator-".len() + 1];
        t += &format!("\n[[domain]]\nid = \"{d}\"\n");
        if let (Some(v), true) = (short_validity, i + 1 == ids.len() && ids.len() > 1) {
            t += &format!("aef_psk_validity_secs = {v}\n");
        }
        t += &format!("[[domain.aef]]\nid = \"aef-{letter}\"\napis = [\"api-{letter}\"]\n");
    }
    for d in &ids {
        let letter = &d["operator-".len().."operator-".len() + 1];
        t += &format!(
            "\n[[invoker]]\nname = \"inv-{letter}\"\nhome = \"{d}\"\ncount = {}\n",
            invokers.max(1)
        );
    }
    Scenario::parse(&t, "generated load")
}

/// One invoker of the load.
#[derive(Debug)]
pub struct Member {
    /// Its name in the scenario.
    pub name: String,
    /// Its home domain.
    pub home: String,
    /// Its profile directory.
    pub dir: PathBuf,
    /// Held by whoever runs a flow of this invoker.
    pub lock: tokio::sync::Mutex<()>,
}

/// Where an AEF is, as the load needs it.
#[derive(Clone, Debug)]
pub struct AefInfo {
    /// Its id.
    pub id: String,
    /// Its domain.
    pub domain: String,
    /// The API the load calls.
    pub api: String,
    /// host:port of its security listener.
    pub security: String,
    /// host:port of its PSK endpoint.
    pub psk: String,
    /// Its domain's CA, PEM.
    pub ca_pem: String,
    /// Its PSK TLS profile.
    pub psk_tls: TlsProfile,
}

/// How a flow used the invoker's credentials.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FlowKind {
    /// Negotiate at the home CCF, Authentication Initiation, call.
    Fresh,
    /// Authentication Initiation and call with the key stored earlier (PSK).
    Reuse,
    /// A call with a stored key past its expiry, straight to the PSK endpoint: must be refused.
    Expired,
    /// A call with a stored key, straight to the PSK endpoint, after a revocation or an
    /// offboarding: must be refused once the revocation had time to arrive.
    Probe,
}

/// What the AEF answered.
#[derive(Clone, Debug, Serialize)]
pub struct Answer {
    /// The AEF that answered.
    pub aef_id: String,
    /// The invoker it authenticated.
    pub api_invoker_id: String,
    /// That invoker's home.
    pub home_ccf_id: String,
    /// The key id it used (PSK).
    pub key_id: String,
}

/// One flow's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Flow {
    /// The invoker's name.
    pub invoker: String,
    /// Its apiInvokerId (empty when its profile could not be read).
    pub invoker_id: String,
    /// Its home.
    pub home: String,
    /// The AEF.
    pub aef: String,
    /// The AEF's domain.
    pub aef_domain: String,
    /// psk, pki or oauth.
    pub method: String,
    /// How the credentials were used.
    pub kind: FlowKind,
    /// Start, Unix ms.
    pub start_ms: u64,
    /// End, Unix ms.
    pub end_ms: u64,
    /// The PSK key id used (empty for other methods).
    pub key_id: String,
    /// Its expiry as the invoker computed it, Unix ms (0: no key).
    pub key_expires_at_ms: u64,
    /// Whether the AEF answered the call.
    pub ok: bool,
    /// The failure's gRPC code (or HANDSHAKE_REFUSED, UNAVAILABLE ...), empty on success.
    pub code: String,
    /// The failure's reason, if it carried one.
    pub reason: String,
    /// The failure, in words.
    pub detail: String,
    /// The answer, on success.
    pub answer: Option<Answer>,
    /// The flow did not end by its deadline.
    pub hung: bool,
}

impl Flow {
    /// Whether this flow involved `domain` (the invoker's home or the AEF's domain).
    pub fn touches(&self, domain: &str) -> bool {
        self.home == domain || self.aef_domain == domain
    }
}

/// The method names the load uses, in the order `pick` draws them.
const METHODS: [pb::SecurityMethod; 3] = [
    pb::SecurityMethod::Psk,
    pb::SecurityMethod::Pki,
    pb::SecurityMethod::Oauth,
];

fn method_name(m: pb::SecurityMethod) -> &'static str {
    match m {
        pb::SecurityMethod::Pki => "pki",
        pb::SecurityMethod::Oauth => "oauth",
        _ => "psk",
    }
}

/// The load over one testbed.
pub struct Load {
    /// Every invoker.
    pub members: Vec<Arc<Member>>,
    /// Every AEF.
    pub aefs: Vec<AefInfo>,
    /// Invokers the load no longer picks (revoked or offboarded by the chaos run).
    pub excluded: Mutex<BTreeSet<String>>,
    /// Flows at once.
    pub concurrency: usize,
    /// A flow's deadline.
    pub deadline: Duration,
    /// Seed of the pairs' methods.
    pub seed: u64,
    /// When each (invoker, AEF) last negotiated a method.
    negotiated: Mutex<std::collections::HashMap<(String, String), std::time::Instant>>,
}

/// A pair negotiates again only after this long: a new key id makes the AEF and the gateway
/// refresh their copy at most once per `refresh_interval_ms` (1 s by default), and a key
/// replaced sooner is refused until then, which is their rule, not a fault.
pub const RENEGOTIATE_AFTER: Duration = Duration::from_secs(3);

impl Load {
    /// The load for `s` on `tb`.
    pub fn new(
        tb: &Testbed,
        s: &Scenario,
        concurrency: usize,
        deadline: Duration,
        seed: u64,
    ) -> Result<Self> {
        let members = s
            .invoker_members()
            .into_values()
            .flatten()
            .map(|(name, home)| {
                Arc::new(Member {
                    dir: tb.run_dir.join("invokers").join(&name),
                    name,
                    home,
                    lock: tokio::sync::Mutex::new(()),
                })
            })
            .collect();
        let mut aefs = Vec::new();
        for a in tb.aefs.values() {
            aefs.push(AefInfo {
                id: a.id.clone(),
                domain: a.domain.clone(),
                api: a.apis.first().cloned().unwrap_or_default(),
                security: format!("127.0.0.1:{}", a.security_port),
                psk: format!("127.0.0.1:{}", a.psk_port),
                ca_pem: std::fs::read_to_string(tb.domains[&a.domain].ca_pem())?,
                psk_tls: a.psk_tls.parse().unwrap_or_default(),
            });
        }
        Ok(Self {
            members,
            aefs,
            excluded: Mutex::new(BTreeSet::new()),
            concurrency: concurrency.max(1),
            deadline,
            seed,
            negotiated: Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// Onboards every invoker at its home CCF (16 at a time).
    pub async fn onboard_all(&self, tb: &Testbed) -> Result<()> {
        let sem = Arc::new(Semaphore::new(16));
        let mut set = tokio::task::JoinSet::new();
        for m in &self.members {
            let d = &tb.domains[&m.home];
            let (onboarding, capif) = (
                format!("127.0.0.1:{}", d.onboarding_port),
                format!("127.0.0.1:{}", d.capif_port),
            );
            let ca = std::fs::read_to_string(d.ca_pem())?;
            let cred = d.credentials.get(&m.name).cloned().unwrap_or_default();
            let (dir, sem) = (m.dir.clone(), sem.clone());
            set.spawn(async move {
                let _p = sem.acquire_owned().await;
                invoker::onboard(&onboarding, &capif, &ca, "localhost", &cred, &dir).await
            });
        }
        while let Some(r) = set.join_next().await {
            r.map_err(|e| anyhow!("onboarding task failed: {e}"))??;
        }
        Ok(())
    }

    /// Whether the load still picks `name`.
    pub fn is_excluded(&self, name: &str) -> bool {
        self.excluded
            .lock()
            .map(|x| x.contains(name))
            .unwrap_or(true)
    }

    /// Stops picking `name`.
    pub fn exclude(&self, name: &str) {
        if let Ok(mut x) = self.excluded.lock() {
            x.insert(name.to_string());
        }
    }

    /// Runs flows, `concurrency` at a time, until `stop` turns true; every outcome goes to `tx`.
    /// `seed` makes the choice of invoker, AEF, method and kind replayable.
    pub async fn run(
        self: Arc<Self>,
        seed: u64,
        stop: watch::Receiver<bool>,
        tx: mpsc::UnboundedSender<Flow>,
    ) {
        let mut set = tokio::task::JoinSet::new();
        for w in 0..self.concurrency {
            let (load, mut stop, tx) = (self.clone(), stop.clone(), tx.clone());
            set.spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed ^ ((w as u64 + 1) << 32));
                while !*stop.borrow() {
                    let Some(f) = load.pick_and_run(&mut rng).await else {
                        // Every invoker was busy or excluded: wait a little (or for the end).
                        let _ =
                            tokio::time::timeout(Duration::from_millis(50), stop.changed()).await;
                        continue;
                    };
                    if tx.send(f).is_err() {
                        break;
                    }
                }
            });
        }
        while set.join_next().await.is_some() {}
    }

    async fn pick_and_run(&self, rng: &mut StdRng) -> Option<Flow> {
        if self.members.is_empty() || self.aefs.is_empty() {
            return None;
        }
        let m = &self.members[rng.random_range(0..self.members.len())];
        if self.is_excluded(&m.name) {
            return None;
        }
        let _held = m.lock.try_lock().ok()?;
        // The invoker may have been excluded while we took its lock.
        if self.is_excluded(&m.name) {
            return None;
        }
        let a = &self.aefs[rng.random_range(0..self.aefs.len())];
        let mut method = self.method_of(&m.name, &a.id);
        let recent = self
            .negotiated
            .lock()
            .ok()?
            .get(&(m.name.clone(), a.id.clone()))
            .is_some_and(|t| t.elapsed() < RENEGOTIATE_AFTER);
        let stored = Profile::load(&m.dir).and_then(|p| p.key(&a.id)).ok();
        let mut kind = FlowKind::Fresh;
        if let Some(k) = &stored {
            let expired = now_ms() > k.expires_at_ms + 1000;
            if expired && rng.random_bool(0.7) {
                (method, kind) = (pb::SecurityMethod::Psk, FlowKind::Expired);
            } else if !expired && (recent || rng.random_bool(0.95)) {
                // A PSK pair mostly reuses its key, so that short validities run out in use.
                (method, kind) = (pb::SecurityMethod::Psk, FlowKind::Reuse);
            }
        }
        if kind == FlowKind::Fresh {
            if recent {
                return None;
            }
            self.negotiated
                .lock()
                .ok()?
                .insert((m.name.clone(), a.id.clone()), std::time::Instant::now());
        }
        Some(self.flow(m, a, method, kind).await)
    }

    /// One flow of `m` at `a`, under the deadline. The caller holds `m.lock`.
    pub async fn flow(
        &self,
        m: &Member,
        a: &AefInfo,
        method: pb::SecurityMethod,
        kind: FlowKind,
    ) -> Flow {
        let start_ms = now_ms();
        let mut used: (String, u64) = (String::new(), 0);
        let r =
            tokio::time::timeout(self.deadline, self.attempt(m, a, method, kind, &mut used)).await;
        let mut f = Flow {
            invoker: m.name.clone(),
            invoker_id: Profile::load(&m.dir)
                .map(|p| p.id().to_string())
                .unwrap_or_default(),
            home: m.home.clone(),
            aef: a.id.clone(),
            aef_domain: a.domain.clone(),
            method: method_name(method).into(),
            kind,
            start_ms,
            end_ms: now_ms(),
            key_id: used.0,
            key_expires_at_ms: used.1,
            ok: false,
            code: String::new(),
            reason: String::new(),
            detail: String::new(),
            answer: None,
            hung: false,
        };
        match r {
            Ok(Ok(rsp)) => {
                f.ok = true;
                f.answer = Some(Answer {
                    aef_id: rsp.aef_id,
                    api_invoker_id: rsp.api_invoker_id,
                    home_ccf_id: rsp.home_ccf_id,
                    key_id: rsp.key_id,
                });
            }
            Ok(Err(e)) => {
                let o = classify(&e);
                (f.code, f.reason, f.detail) = (o.code, o.reason, o.detail);
            }
            Err(_) => {
                f.hung = true;
                f.code = "DEADLINE".into();
                f.detail = format!("no outcome within {} ms", self.deadline.as_millis());
            }
        }
        f
    }

    async fn attempt(
        &self,
        m: &Member,
        a: &AefInfo,
        method: pb::SecurityMethod,
        kind: FlowKind,
        used: &mut (String, u64),
    ) -> Result<pb::InvokeResponse> {
        let p = Profile::load(&m.dir)?;
        let expected = invoker::expected_aef(&a.domain, &a.id)?;
        match (method, kind) {
            (pb::SecurityMethod::Psk, FlowKind::Fresh | FlowKind::Reuse) => {
                let k = if kind == FlowKind::Fresh {
                    invoker::security(&p, &a.id, None).await?
                } else {
                    p.key(&a.id)?
                };
                *used = (k.key_id.clone(), k.expires_at_ms);
                let rsp =
                    invoker::auth(&p, Some(&k), &a.security, &a.ca_pem, "localhost", &expected)
                        .await?;
                invoker::call(&p, &k, &rsp.tls_endpoint, &a.api, a.psk_tls).await
            }
            (_, FlowKind::Expired | FlowKind::Probe) => {
                let k = p.key(&a.id)?;
                *used = (k.key_id.clone(), k.expires_at_ms);
                invoker::call(&p, &k, &a.psk, &a.api, a.psk_tls).await
            }
            _ => {
                // Negotiating another method for this AEF replaces the PSK context at the home
                // CCF: the stored key is dead from here on, and the invoker knows it.
                let _ = std::fs::remove_file(p.dir.join("keys").join(format!("{}.toml", a.id)));
                let t = invoker::AefTarget {
                    addr: &a.security,
                    ca_pem: &a.ca_pem,
                    server_name: "localhost",
                };
                invoker::run_flow(&p, method, &a.id, &a.api, &t, a.psk_tls).await
            }
        }
    }

    /// The AEFs `m` holds a stored key for, with the key's expiry (Unix ms).
    pub fn stored_keys(&self, m: &Member) -> Vec<(AefInfo, u64)> {
        let Ok(p) = Profile::load(&m.dir) else {
            return Vec::new();
        };
        self.aefs
            .iter()
            .filter_map(|a| p.key(&a.id).ok().map(|k| (a.clone(), k.expires_at_ms)))
            .collect()
    }

    /// The method an (invoker, AEF) pair uses throughout the run: all three are mixed over the
    /// pairs, and a pair that keeps its method keeps its key until it expires.
    pub fn method_of(&self, invoker: &str, aef: &str) -> pb::SecurityMethod {
        let h = invoker.bytes().chain(aef.bytes()).fold(self.seed, |h, b| {
            h.wrapping_mul(31).wrapping_add(u64::from(b))
        });
        METHODS[(h % METHODS.len() as u64) as usize]
    }

    /// The member named `name`.
    pub fn member(&self, name: &str) -> Option<Arc<Member>> {
        self.members.iter().find(|m| m.name == name).cloned()
    }
}

/// The invoker offboards itself (CAPIF-1e, its own certificate).
pub async fn offboard(m: &Member) -> Result<()> {
    let p = Profile::load(&m.dir)?;
    InvokerManagementClient::new(p.capif1e_channel().await?)
        .offboard(pb::OffboardRequest {
            api_invoker_id: p.id().to_string(),
        })
        .await
        .map_err(invoker::status_error)?;
    Ok(())
}

/// The home domain's operator revokes the invoker's authorization at every AEF.
pub async fn revoke(tb: &Testbed, m: &Member) -> Result<()> {
    use capif_proto::v1::security_client::SecurityClient;
    use ccf_core::tls::{client_config, connect};
    let p = Profile::load(&m.dir)?;
    let d = tb
        .domains
        .get(&m.home)
        .ok_or_else(|| anyhow!("unknown domain {}", m.home))?;
    let (cert, key) = d.operator();
    let ca = std::fs::read_to_string(d.ca_pem())?;
    let (cert, key) = (
        std::fs::read_to_string(cert)?,
        zeroize::Zeroizing::new(std::fs::read_to_string(key)?),
    );
    let (ch, _) = connect(
        &format!("127.0.0.1:{}", d.capif_port),
        "localhost",
        client_config(&ca, Some((&cert, &key)), p.home_ccf()?)?,
        Duration::from_secs(5),
    )
    .await?;
    SecurityClient::new(ch)
        .revoke_authorization(pb::RevokeAuthorizationRequest {
            revoke_info: Some(pb::SecurityNotification {
                api_invoker_id: p.id().to_string(),
                aef_id: String::new(),
                cause: pb::Cause::AuthorizationIssue as i32,
                ..Default::default()
            }),
        })
        .await
        .map_err(invoker::status_error)?;
    Ok(())
}

/// Parses a duration: seconds, or a number with `s`, `m` or `h`.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow!("{s:?} is not a duration: use seconds or 30s, 10m, 1h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => {
            return Err(anyhow!(
                "{s:?} is not a duration: use seconds or 30s, 10m, 1h"
            ));
        }
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("ten").is_err() && parse_duration("5d").is_err());
    }

    #[test]
    fn generated_scenario_has_every_domain_and_the_short_validity_last() {
        let s = scenario(3, 2, Some(8)).unwrap();
        assert_eq!(s.domains.len(), 3);
        assert_eq!(s.domains[2].aef_psk_validity_secs, Some(8));
        assert_eq!(s.domains[0].aef_psk_validity_secs, None);
        let members: usize = s.invoker_members().values().map(Vec::len).sum();
        assert_eq!(members, 6);
    }
}
