//! What a running testbed does to its federation, the way an operator would: rewrite a
//! gateway's partner list or break its file on purpose, reload the gateway through
//! `GatewayAdmin.Reload` (operator certificate of its domain), and rotate the CA partners trust
//! for a domain's gateway with an overlap (docs/OPERATIONS.md, "Rotating a partner's CA").

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use capif_proto::v1::{self as pb, gateway_admin_client::GatewayAdminClient};
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::CcfId;
use ccf_core::pki::{DomainCa, write_private_file};
use ccf_core::tls::{ExpectedPeer, client_config, connect};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

use crate::invoker;
use crate::testbed::{INTERCONNECT_STEM, Testbed, gateway_hosts};

/// How a `reload` step breaks a gateway's configuration before reloading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Breakage {
    /// The TOML file does not parse.
    Toml,
    /// A partner's CA bundle is not PEM.
    PartnerCa,
}

impl std::str::FromStr for Breakage {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "toml" => Ok(Self::Toml),
            "partner_ca" => Ok(Self::PartnerCa),
            other => bail!("unknown breakage {other:?} (use \"toml\" or \"partner_ca\")"),
        }
    }
}

/// SHA-256 of a PEM certificate's DER, hex; what `GatewayAdmin.GetStatus` shows of trust anchors.
pub fn fingerprint(cert_pem: &str) -> Result<String> {
    let der = ccf_core::tls::certs_from_pem("certificate", cert_pem)?;
    let first = der.first().ok_or_else(|| anyhow!("no certificate"))?;
    Ok(hex::encode(Sha256::digest(first.as_ref())))
}

impl Testbed {
    /// `GatewayAdmin` of a domain's gateway (replica 1), as its operator.
    pub async fn gateway_admin(&self, domain: &str) -> Result<GatewayAdminClient<Channel>> {
        self.gateway_admin_at(domain, 1).await
    }

    /// `GatewayAdmin` of replica `n` of a domain's gateway, as its operator.
    pub async fn gateway_admin_at(
        &self,
        domain: &str,
        n: u32,
    ) -> Result<GatewayAdminClient<Channel>> {
        let d = self
            .domains
            .get(domain)
            .ok_or_else(|| anyhow!("unknown domain {domain}"))?;
        let port = d
            .replica(n)
            .ok_or_else(|| anyhow!("{domain} has no gateway replica {n}"))?
            .gw6_port;
        let (cert, key) = d.operator();
        let ca = std::fs::read_to_string(d.ca_pem())?;
        let cfg = client_config(
            &ca,
            Some((
                &std::fs::read_to_string(cert)?,
                &zeroize::Zeroizing::new(std::fs::read_to_string(key)?),
            )),
            ExpectedPeer::gateway(&CcfId::new(domain)?),
        )?;
        let (ch, _) = connect(
            &format!("127.0.0.1:{port}"),
            "localhost",
            cfg,
            Duration::from_secs(5),
        )
        .await?;
        Ok(GatewayAdminClient::new(ch))
    }

    /// Asks every replica of a domain's gateway to reload its configuration, in order; replica
    /// 1's answer, or the first refusal as a `StatusError` (CONFIG_REFUSED when the files do not
    /// validate), which stops there. Replicas share the partner list, so one that did not reload
    /// would federate differently from the others.
    pub async fn reload_gateway(&self, domain: &str) -> Result<pb::ReloadResponse> {
        let count = self
            .domains
            .get(domain)
            .ok_or_else(|| anyhow!("unknown domain {domain}"))?
            .replica_count();
        let mut first = None;
        for n in 1..=count {
            let answer = self.reload_replica(domain, n).await?;
            first.get_or_insert(answer);
        }
        first.ok_or_else(|| anyhow!("{domain} runs no gateway"))
    }

    async fn reload_replica(&self, domain: &str, n: u32) -> Result<pb::ReloadResponse> {
        let mut admin = self.gateway_admin_at(domain, n).await?;
        Ok(admin
            .reload(pb::ReloadRequest {})
            .await
            .map_err(invoker::status_error)?
            .into_inner())
    }

    /// Sets a domain's partner list and rewrites its gateway's file (a new partner's bundle is
    /// its domain CA). Takes effect at the gateway's next reload.
    pub fn set_partners(&mut self, domain: &str, partners: &[String]) -> Result<()> {
        for p in partners {
            if p == domain || !self.domains.contains_key(p) {
                bail!("{domain} cannot federate with {p:?}");
            }
        }
        let d = self
            .domains
            .get_mut(domain)
            .ok_or_else(|| anyhow!("unknown domain {domain}"))?;
        if d.partners.is_empty() {
            bail!("{domain} runs no gateway; give it a partner in [federation] from the start");
        }
        d.partners = partners.to_vec();
        let d = d.clone();
        for p in partners {
            if !d.partner_ca(p).exists() {
                let pd = &self.domains[p];
                let ca = std::fs::read_to_string(pd.ca_pem())?;
                write_file(&d.partner_ca(p), &ca)?;
            }
        }
        for n in 1..=d.replica_count() {
            self.write_gateway_config(&d, n)?;
        }
        Ok(())
    }

    /// Breaks a domain's gateway configuration, reloads (which must refuse it), and puts the
    /// good files back. Returns the refusal.
    pub async fn reload_broken(&self, domain: &str, how: Breakage) -> Result<pb::ReloadResponse> {
        let d = self
            .domains
            .get(domain)
            .ok_or_else(|| anyhow!("unknown domain {domain}"))?;
        let file = match how {
            Breakage::Toml => d.dir.join("gateway.toml"),
            Breakage::PartnerCa => {
                let p = d
                    .partners
                    .first()
                    .ok_or_else(|| anyhow!("{domain} has no partner"))?;
                d.partner_ca(p)
            }
        };
        let good = std::fs::read_to_string(&file)?;
        let broken = match how {
            Breakage::Toml => format!("{good}\n[[partner]\nccf_id = \"half a table\n"),
            Breakage::PartnerCa => {
                "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
                    .into()
            }
        };
        write_file(&file, &broken)?;
        // Replica 1 reads `gateway.toml`, the file broken here.
        let r = self.reload_replica(domain, 1).await;
        write_file(&file, &good)?;
        r
    }

    /// Rotates the CA that `domain`'s partners trust for its gateway, with an overlap:
    /// 1. a new CA is issued; every partner's bundle for `domain` becomes old + new, and each
    ///    partner's gateway reloads;
    /// 2. `domain`'s gateway gets a certificate of the new CA for its partners and reloads;
    /// 3. after `overlap`, every partner's bundle becomes the new CA alone, and each reloads.
    ///
    /// Returns the new CA's fingerprint. A reload that is refused stops the rotation there.
    pub async fn rotate_partner_ca(&mut self, domain: &str, overlap: Duration) -> Result<String> {
        let d = self
            .domains
            .get(domain)
            .ok_or_else(|| anyhow!("unknown domain {domain}"))?
            .clone();
        let id = CcfId::new(domain)?;
        let generation = self.rotations.entry(domain.to_string()).or_insert(0);
        *generation += 1;
        let new_ca = DomainCa::generate_named(
            &id,
            &format!("CAPIF interconnect CA {domain} #{generation}"),
        )?;
        let holders: Vec<String> = self
            .domains
            .values()
            .filter(|p| p.partners.iter().any(|x| x == domain))
            .map(|p| p.id.clone())
            .collect();
        // 1. Overlap: partners trust both.
        for h in &holders {
            let path = self.domains[h].partner_ca(domain);
            let old = std::fs::read_to_string(&path)?;
            write_file(&path, &format!("{}\n{}", old.trim_end(), new_ca.cert_pem()))?;
            self.reload_gateway(h).await?;
        }
        // 2. The domain's gateway presents a certificate of the new CA.
        let hosts = gateway_hosts(domain);
        let issued =
            new_ca.issue_with_new_key(&PeerIdentity::new(id, Role::Gateway), &hosts, 30)?;
        write_private_file(
            &d.dir.join(format!("{INTERCONNECT_STEM}.key")),
            issued.key_pem.as_bytes(),
        )?;
        write_file(
            &d.dir.join(format!("{INTERCONNECT_STEM}.pem")),
            &issued.cert_pem,
        )?;
        let renewed = self.reload_gateway(domain).await?;
        if !renewed.own_certificate_renewed {
            bail!("{domain}'s gateway did not take its new certificate");
        }
        tokio::time::sleep(overlap).await;
        // 3. The old CA is no longer trusted.
        for h in &holders {
            write_file(&self.domains[h].partner_ca(domain), new_ca.cert_pem())?;
            self.reload_gateway(h).await?;
        }
        fingerprint(new_ca.cert_pem())
    }
}

fn write_file(path: &std::path::Path, text: &str) -> Result<()> {
    // Written whole, then renamed: a gateway polling its files never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| anyhow!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
}
