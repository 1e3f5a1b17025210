//! Property tests of the gateway's edges, where partner and CCF data turns into domain types:
//! the query ids of `FetchSecurityInformation` (CAPIF-6 and CAPIF-6e, [`super::query_ids`]),
//! the `aef_ids` of revocation notices ([`super::notice_aef_ids`]), a partner's answer
//! ([`super::gateway::answer_matches`] / [`super::gateway::check_answer`]) and the
//! configuration file ([`crate::config::GatewayConfig::parse`]).
//!
//! Arbitrary messages get the domain types or the refusal the rules predict, with its code,
//! reason and field; never a panic. Cases: `CAPIF_PROPTEST_CASES` (`ccf_core::testing`).

use capif_proto::v1::{
    ErrorReason, InvokerSecurityInformation, SecurityInformationQuery, SecurityMethod,
};
use ccf_core::grpc::reason_of;
use ccf_core::ids::{AefId, ApiInvokerId, CcfId, KeyId};
use ccf_core::testing::{ccf_id_text, config, field_text, key_id_text, token_id_text, toml_string};
use proptest::prelude::*;
use tonic::{Code, Status};

use super::Refused;
use super::gateway::{AnswerMismatch, answer_matches, check_answer};
use crate::config::GatewayConfig;

/// The status must be `INVALID_ARGUMENT` / `INVALID_FIELD` naming `field` first.
fn assert_invalid_field(s: &Status, field: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(s.code(), Code::InvalidArgument);
    prop_assert_eq!(reason_of(s), Some(ErrorReason::InvalidField));
    prop_assert!(
        s.message().starts_with(&format!("{field}: ")),
        "{}",
        s.message()
    );
    Ok(())
}

fn query() -> impl Strategy<Value = SecurityInformationQuery> {
    (field_text(), field_text(), field_text(), field_text()).prop_map(|(i, h, a, k)| {
        SecurityInformationQuery {
            api_invoker_id: i,
            home_ccf_id: h,
            aef_id: a,
            presented_key_id: k,
            ..Default::default()
        }
    })
}

fn method() -> impl Strategy<Value = i32> {
    prop_oneof![
        Just(SecurityMethod::Psk as i32),
        Just(SecurityMethod::Pki as i32),
        Just(SecurityMethod::Oauth as i32),
        Just(SecurityMethod::Unspecified as i32),
        any::<i32>(),
    ]
}

/// What was asked, and an answer that is either about it (with a good or bad key) or differs
/// in some field.
fn asked_and_answer()
-> impl Strategy<Value = ((String, String, String), InvokerSecurityInformation)> {
    let asked = (token_id_text(), ccf_id_text(), token_id_text());
    (
        asked,
        (field_text(), field_text(), field_text()),
        [any::<bool>(), any::<bool>(), any::<bool>()],
        method(),
        prop_oneof![key_id_text(), field_text()],
        prop_oneof![Just(32usize), 0..64usize],
    )
        .prop_map(|(asked, other, same, m, key_id, psk_len)| {
            let pick = |same: bool, a: &String, o: String| if same { a.clone() } else { o };
            let info = InvokerSecurityInformation {
                api_invoker_id: pick(same[0], &asked.0, other.0),
                home_ccf_id: pick(same[1], &asked.1, other.1),
                aef_id: pick(same[2], &asked.2, other.2),
                sel_security_method: m,
                key_id,
                aef_psk: vec![7; psk_len],
                ..Default::default()
            };
            (asked, info)
        })
}

proptest! {
    #![proptest_config(config())]

    /// A query's ids are the domain types when every field is valid (the key id may be empty),
    /// and otherwise `INVALID_FIELD` naming the first bad field in order.
    #[test]
    fn props_gateway_query_ids(q in query()) {
        let checks: [(&str, bool); 4] = [
            ("api_invoker_id", ApiInvokerId::new(q.api_invoker_id.clone()).is_ok()),
            ("home_ccf_id", CcfId::new(q.home_ccf_id.clone()).is_ok()),
            ("aef_id", AefId::new(q.aef_id.clone()).is_ok()),
            ("presented_key_id", q.presented_key_id.is_empty() || KeyId::new(q.presented_key_id.clone()).is_ok()),
        ];
        match (super::query_ids(&q), checks.iter().find(|(_, ok)| !ok)) {
            (Ok((i, h, a)), None) => {
                prop_assert_eq!(i.as_str(), q.api_invoker_id.as_str());
                prop_assert_eq!(h.as_str(), q.home_ccf_id.as_str());
                prop_assert_eq!(a.as_str(), q.aef_id.as_str());
            }
            (Err(s), Some((field, _))) => assert_invalid_field(&s, field)?,
            (got, bad) => prop_assert!(false, "{:?}: got {:?}, first bad field {:?}", q, got, bad),
        }
    }

    /// A notice's AEF list is all AEF ids, in order, or refused naming `aef_ids`.
    #[test]
    fn props_gateway_notice_aef_ids(list in prop::collection::vec(field_text(), 0..5)) {
        let all_ok = list.iter().all(|a| AefId::new(a.clone()).is_ok());
        match super::notice_aef_ids(&list) {
            Ok(ids) => {
                prop_assert!(all_ok);
                prop_assert_eq!(ids.iter().map(|a| a.to_string()).collect::<Vec<_>>(), list);
            }
            Err(s) => {
                prop_assert!(!all_ok);
                assert_invalid_field(&s, "aef_ids")?;
            }
        }
    }

    /// A partner's answer may be cached only when it is about the invoker, home and AEF asked
    /// for and, for PSK, carries a key id and a 32-byte key; otherwise the first difference is
    /// named, and at the edge it is `PERMISSION_DENIED` / `IDENTITY_MISMATCH`. A PKI answer
    /// from a domain that is not a partner is `CA_NOT_FEDERATED`.
    #[test]
    fn props_gateway_partner_answer((asked, info) in asked_and_answer()) {
        let invoker = ApiInvokerId::new(asked.0.clone()).unwrap();
        let home = CcfId::new(asked.1.clone()).unwrap();
        let aef = AefId::new(asked.2.clone()).unwrap();
        let psk = info.sel_security_method == SecurityMethod::Psk as i32;
        let got = answer_matches(&info, &invoker, &home, &aef);
        let ok = match &got {
            Err(AnswerMismatch::Invoker(x)) => {
                prop_assert!(info.api_invoker_id != asked.0 && *x == info.api_invoker_id);
                false
            }
            Err(AnswerMismatch::Home(x)) => {
                prop_assert!(info.api_invoker_id == asked.0 && info.home_ccf_id != asked.1);
                prop_assert_eq!(x, &info.home_ccf_id);
                false
            }
            Err(AnswerMismatch::Aef(x)) => {
                prop_assert!(info.api_invoker_id == asked.0 && info.home_ccf_id == asked.1);
                prop_assert!(info.aef_id != asked.2 && *x == info.aef_id);
                false
            }
            Err(AnswerMismatch::KeyId(e)) => {
                prop_assert!(psk && (&info.api_invoker_id, &info.home_ccf_id, &info.aef_id) == (&asked.0, &asked.1, &asked.2));
                prop_assert_eq!(Err(e.clone()), KeyId::new(info.key_id.clone()).map(|_| ()));
                false
            }
            Err(AnswerMismatch::PskLength) => {
                prop_assert!(psk && KeyId::new(info.key_id.clone()).is_ok() && info.aef_psk.len() != 32);
                false
            }
            Ok(()) => {
                prop_assert_eq!((&info.api_invoker_id, &info.home_ccf_id, &info.aef_id), (&asked.0, &asked.1, &asked.2));
                prop_assert!(!psk || (KeyId::new(info.key_id.clone()).is_ok() && info.aef_psk.len() == 32));
                true
            }
        };
        let pki = info.sel_security_method == SecurityMethod::Pki as i32;
        match check_answer(&info, &invoker, &home, &aef, None) {
            Ok(()) => prop_assert!(ok && !pki),
            Err(r @ Refused::AnswerMismatch { .. }) => {
                prop_assert!(!ok);
                let s = Status::from(r);
                prop_assert_eq!(s.code(), Code::PermissionDenied);
                prop_assert_eq!(reason_of(&s), Some(ErrorReason::IdentityMismatch));
            }
            Err(r @ Refused::CaNotFederated(_)) => {
                prop_assert!(ok && pki);
                prop_assert_eq!(reason_of(&Status::from(r)), Some(ErrorReason::CaNotFederated));
            }
            Err(other) => prop_assert!(false, "unexpected {:?}", other),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The configuration file.

#[derive(Clone, Debug)]
struct Partner {
    ccf_id: String,
    ca_cert: String,
    address: Option<String>,
}

#[derive(Clone, Debug)]
struct Values {
    ccf_id: String,
    state_dir: Option<String>,
    ccf_address: String,
    max_ttl_secs: Option<u64>,
    refresh_interval_ms: Option<u64>,
    fetch_rate_per_sec: Option<u32>,
    retry_budget_ratio: Option<f64>,
    partners: Vec<Partner>,
}

fn toml_u64() -> impl Strategy<Value = u64> {
    0..=i64::MAX as u64
}

fn values() -> impl Strategy<Value = Values> {
    let partner =
        (ccf_id_text(), ".{1,20}", proptest::option::of(".{0,20}")).prop_map(|(c, ca, a)| {
            Partner {
                ccf_id: c,
                ca_cert: ca,
                address: a,
            }
        });
    (
        (".{0,20}", proptest::option::of(".{1,20}"), ".{0,20}"),
        (
            proptest::option::of(toml_u64()),
            proptest::option::of(toml_u64()),
            proptest::option::of(any::<u32>()),
            proptest::option::of(0.0..10.0f64),
        ),
        prop::collection::vec(partner, 0..4),
    )
        .prop_map(
            |((ccf_id, state_dir, ccf_address), (ttl, refresh, rate, ratio), partners)| Values {
                ccf_id,
                state_dir,
                ccf_address,
                max_ttl_secs: ttl,
                refresh_interval_ms: refresh,
                fetch_rate_per_sec: rate,
                retry_budget_ratio: ratio,
                partners,
            },
        )
}

fn render(v: &Values) -> String {
    let q = |s: &str| toml_string(s);
    let mut t = format!("ccf_id = {}\n", q(&v.ccf_id));
    if let Some(d) = &v.state_dir {
        t += &format!("state_dir = {}\n", q(d));
    }
    t += "[tls]\nca_cert = \"ca.pem\"\ncert = \"gw.pem\"\nkey = \"gw.key\"\n";
    t += &format!("[ccf]\naddress = {}\n", q(&v.ccf_address));
    t += "[cache]\n";
    if let Some(x) = v.max_ttl_secs {
        t += &format!("max_ttl_secs = {x}\n");
    }
    if let Some(x) = v.refresh_interval_ms {
        t += &format!("refresh_interval_ms = {x}\n");
    }
    t += "[outbound]\n";
    if let Some(x) = v.fetch_rate_per_sec {
        t += &format!("fetch_rate_per_sec = {x}\n");
    }
    if let Some(x) = v.retry_budget_ratio {
        t += &format!("retry_budget_ratio = {x:?}\n");
    }
    for p in &v.partners {
        t += &format!(
            "[[partner]]\nccf_id = {}\nca_cert = {}\n",
            q(&p.ccf_id),
            q(&p.ca_cert)
        );
        if let Some(a) = &p.address {
            t += &format!("address = {}\n", q(a));
        }
    }
    t
}

proptest! {
    #![proptest_config(config())]

    /// A generated config parses and keeps every value written; what it leaves out has the
    /// documented default.
    #[test]
    fn props_gateway_config_keeps_its_values(v in values()) {
        let c = GatewayConfig::parse(&render(&v), "gen.toml").unwrap();
        let d = GatewayConfig::parse(&render(&Values { partners: vec![], max_ttl_secs: None, refresh_interval_ms: None, fetch_rate_per_sec: None, retry_budget_ratio: None, ..v.clone() }), "gen.toml").unwrap();
        prop_assert_eq!(&c.ccf_id, &v.ccf_id);
        prop_assert_eq!(c.state_dir.as_ref().and_then(|p| p.to_str()), v.state_dir.as_deref());
        prop_assert_eq!(&c.ccf.address, &v.ccf_address);
        prop_assert_eq!(c.cache.max_ttl_secs, v.max_ttl_secs.unwrap_or(d.cache.max_ttl_secs));
        prop_assert_eq!(c.cache.refresh_interval_ms, v.refresh_interval_ms.unwrap_or(d.cache.refresh_interval_ms));
        prop_assert_eq!(c.outbound.fetch_rate_per_sec, v.fetch_rate_per_sec.unwrap_or(d.outbound.fetch_rate_per_sec));
        prop_assert_eq!(c.outbound.retry_budget_ratio, v.retry_budget_ratio.unwrap_or(d.outbound.retry_budget_ratio));
        prop_assert_eq!(&d.cache, &crate::config::CacheConfig::default());
        prop_assert_eq!(&d.outbound, &crate::config::OutboundConfig::default());
        prop_assert_eq!(c.partners.len(), v.partners.len());
        for (got, want) in c.partners.iter().zip(&v.partners) {
            prop_assert_eq!(&got.ccf_id, &want.ccf_id);
            prop_assert_eq!(got.ca_cert.to_str(), Some(want.ca_cert.as_str()));
            prop_assert_eq!(&got.address, &want.address);
            prop_assert_eq!(&got.invoker_ca_cert, &None);
        }
    }

    /// Arbitrary text, and a generated file with a line dropped, duplicated or cut short, is
    /// parsed or refused with a message that starts with the file's name.
    #[test]
    fn props_gateway_config_arbitrary_text(
        v in values(),
        junk in any::<String>(),
        at in any::<prop::sample::Index>(),
        op in 0..3u8,
    ) {
        let broken = ccf_core::testing::break_a_line(&render(&v), at, op);
        for text in [broken, junk] {
            if let Err(e) = GatewayConfig::parse(&text, "any.toml") {
                prop_assert!(e.to_string().starts_with("any.toml: "), "{}", e);
            }
        }
    }
}
