//! Property tests of the CCF's edges, where proto messages from invokers, AEFs, operators and
//! the gateway turn into domain types: `GetSecurityInformationForPartner`'s query
//! ([`super::federation::partner_query`]), `RevokeAuthorization`'s target
//! ([`super::security::revoke_target`]), CAPIF-1e's service security, its entries' AEF, methods
//! and API ([`super::security::requested_service_security`], `resolve_aef`, `preferred_method`,
//! `allowed_apis`), the token endpoint's client credentials, and the configuration file.
//!
//! Each property compares the whole refusal (code, reason, message, so the field is named) with
//! the one the rules predict, in the order the rules are checked. Cases:
//! `CAPIF_PROPTEST_CASES` (`ccf_core::testing`).

use capif_proto::v1 as pb;
use ccf_core::grpc::{Refusal, invalid_field, reason_of};
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::{AefId, ApiInvokerId, ApiName, CcfId, KeyId};
use ccf_core::registry::{AefConfig, AefRegistry, Interface, SecurityMethod};
use ccf_core::testing::{ccf_id_text, config, field_text, token_id_text, toml_string};
use proptest::prelude::*;
use tonic::Status;

use super::Refused;
use super::federation::partner_query;
use super::security::{
    MAX_SECURITY_INFO, allowed_apis, check_client_credentials, preferred_method,
    requested_service_security, resolve_aef, revoke_target,
};
use crate::config::CcfConfig;

const OWN: &str = "operator-b.test";

fn own() -> CcfId {
    CcfId::new(OWN).unwrap()
}

/// `got` is the refusal `want`: same code, reason and message.
fn same(got: &Status, want: &Status) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.code(), want.code());
    prop_assert_eq!(reason_of(got), reason_of(want));
    prop_assert_eq!(got.message(), want.message());
    Ok(())
}

/// The refusal of `field` holding `value`, as the id type `T` refuses it.
fn bad_id<T>(field: &str, r: Result<T, ccf_core::ids::IdError>) -> Option<Status> {
    r.err().map(|e| invalid_field(field, e))
}

/// The first refusal of a list of checks, in order, if any.
fn first(checks: Vec<Option<Status>>) -> Option<Status> {
    checks.into_iter().flatten().next()
}

fn method() -> impl Strategy<Value = i32> {
    prop_oneof![
        4 => prop_oneof![
            Just(pb::SecurityMethod::Psk as i32),
            Just(pb::SecurityMethod::Pki as i32),
            Just(pb::SecurityMethod::Oauth as i32),
        ],
        1 => Just(pb::SecurityMethod::Unspecified as i32),
        1 => any::<i32>(),
    ]
}

fn domain_text() -> impl Strategy<Value = String> {
    prop_oneof![2 => Just(OWN.to_string()), 1 => Just(String::new()), 2 => field_text()]
}

fn peer() -> impl Strategy<Value = PeerIdentity> {
    let role = prop_oneof![
        Just(Role::Ccf),
        Just(Role::Gateway),
        Just(Role::Operator),
        prop_oneof![Just("aef-b1".to_string()), token_id_text()]
            .prop_map(|s| Role::Aef(AefId::new(s).unwrap())),
        token_id_text().prop_map(|s| Role::Invoker(ApiInvokerId::new(s).unwrap())),
    ];
    (
        prop_oneof![3 => Just(OWN.to_string()), 1 => ccf_id_text()],
        role,
    )
        .prop_map(|(d, r)| PeerIdentity::new(CcfId::new(d).unwrap(), r))
}

proptest! {
    #![proptest_config(config())]

    /// A partner's request gives (partner, invoker, AEF) when every field is right, and
    /// otherwise the first field's refusal: partner_ccf_id, query, its invoker, AEF, key id,
    /// then a home other than this domain.
    #[test]
    fn props_ccf_partner_query(
        partner in field_text(),
        q in proptest::option::of((field_text(), domain_text(), field_text(), field_text())),
    ) {
        let req = pb::PartnerSecurityInformationRequest {
            partner_ccf_id: partner.clone(),
            query: q.clone().map(|(i, h, a, k)| pb::SecurityInformationQuery {
                api_invoker_id: i,
                home_ccf_id: h,
                aef_id: a,
                presented_key_id: k,
                ..Default::default()
            }),
        };
        let got = partner_query(&own(), &req);
        let mut checks = vec![bad_id("partner_ccf_id", CcfId::new(partner.clone()))];
        match &q {
            None => checks.push(Some(invalid_field("query", "is required"))),
            Some((i, h, a, k)) => {
                checks.push(bad_id("query.api_invoker_id", ApiInvokerId::new(i.clone())));
                checks.push(bad_id("query.aef_id", AefId::new(a.clone())));
                checks.push(bad_id("query.presented_key_id", KeyId::optional(k)));
                if !h.is_empty() && h != OWN {
                    checks.push(Some(invalid_field(
                        "query.home_ccf_id",
                        format!("names {h}, not this domain {OWN}"),
                    )));
                }
            }
        }
        match (got, first(checks)) {
            (Ok((p, i, a)), None) => {
                let (qi, _, qa, _) = q.unwrap();
                prop_assert_eq!((p.as_str(), i.as_str(), a.as_str()), (partner.as_str(), qi.as_str(), qa.as_str()));
            }
            (Err(s), Some(want)) => same(&s, &want)?,
            (got, want) => prop_assert!(false, "got {:?}, expected {:?}", got, want),
        }
    }

    /// `RevokeAuthorization` names its target only for a caller of this domain; an operator
    /// revokes for any AEF or all, an AEF only for itself; ids are checked first; every other
    /// role is refused.
    #[test]
    fn props_ccf_revoke_target(
        who in peer(),
        invoker in field_text(),
        aef in prop_oneof![Just(String::new()), Just("aef-b1".to_string()), field_text()],
    ) {
        let info = pb::SecurityNotification {
            api_invoker_id: invoker.clone(),
            aef_id: aef.clone(),
            ..Default::default()
        };
        let got = revoke_target(&own(), &who, &info);
        let refusal = |r: Refused| Some(r.status());
        let mut checks = vec![];
        if who.ccf_id != own() {
            checks.push(refusal(Refused::OtherDomain { who: who.clone(), own: own() }));
        }
        checks.push(bad_id("revoke_info.api_invoker_id", ApiInvokerId::new(invoker.clone())));
        if !aef.is_empty() {
            checks.push(bad_id("revoke_info.aef_id", AefId::new(aef.clone())));
        }
        let named = AefId::new(aef.clone()).ok();
        let mut ok_aef = named.clone();
        match &who.role {
            Role::Operator => {}
            Role::Aef(a) if named.as_ref().is_none_or(|n| n == a) => ok_aef = Some(a.clone()),
            Role::Aef(_) => checks.push(refusal(Refused::RevokesForAnotherAef)),
            _ => checks.push(refusal(Refused::RoleNotAllowed { who: who.clone(), what: "revoke authorization" })),
        }
        match (got, first(checks)) {
            (Ok((i, a)), None) => {
                prop_assert_eq!(i.as_str(), invoker.as_str());
                prop_assert_eq!(a, ok_aef);
            }
            (Err(s), Some(want)) => same(&s, &want)?,
            (got, want) => prop_assert!(false, "got {:?}, expected {:?}", got, want),
        }
    }

    /// CAPIF-1e's request is the caller's own, with between 1 and the maximum entries.
    #[test]
    fn props_ccf_requested_service_security(
        id in prop_oneof![3 => Just("inv-1".to_string()), 1 => field_text()],
        entries in proptest::option::of(prop_oneof![0..=2usize, 0..=MAX_SECURITY_INFO + 2]),
    ) {
        let caller = ApiInvokerId::new("inv-1").unwrap();
        let req = pb::ObtainSecurityMethodRequest {
            api_invoker_id: id.clone(),
            service_security: entries.map(|n| pb::ServiceSecurity {
                security_info: vec![pb::SecurityInformation::default(); n],
                ..Default::default()
            }),
        };
        let want = if id != "inv-1" {
            Some(Refused::NotTheCaller { field: "api_invoker_id", caller: "inv-1".into() }.status())
        } else {
            match entries {
                None => Some(invalid_field("service_security", "is required")),
                Some(n) if n == 0 || n > MAX_SECURITY_INFO => Some(invalid_field(
                    "service_security.security_info",
                    format!("needs between 1 and {MAX_SECURITY_INFO} entries"),
                )),
                Some(_) => None,
            }
        };
        match (requested_service_security(&caller, req), want) {
            (Ok(ss), None) => prop_assert_eq!(Some(ss.security_info.len()), entries),
            (Err(s), Some(want)) => same(&s, &want)?,
            (got, want) => prop_assert!(false, "got {:?}, expected {:?}", got.map(|_| ()), want),
        }
    }

    /// An entry's preferred methods must all be known and at least one; the chosen method is
    /// the first preferred one the AEF supports, else `NoCommonMethod`.
    #[test]
    fn props_ccf_preferred_method(
        i in 0..MAX_SECURITY_INFO,
        pref in prop::collection::vec(method(), 0..4),
        supported in prop::sample::subsequence(vec![SecurityMethod::Psk, SecurityMethod::Pki, SecurityMethod::Oauth], 1..=3),
    ) {
        let info = pb::SecurityInformation { pref_security_methods: pref.clone(), ..Default::default() };
        let e = registry(&supported);
        let entry = e.get(&AefId::new("aef-b1").unwrap()).unwrap();
        let field = format!("service_security.security_info[{i}].pref_security_methods");
        let known: Option<Vec<SecurityMethod>> = pref.iter().map(|m| SecurityMethod::from_proto(*m)).collect();
        let want = match known {
            None => Err(invalid_field(&field, "holds an unspecified or unknown method")),
            Some(k) if k.is_empty() => Err(invalid_field(&field, "needs at least one method")),
            Some(k) => k.iter().copied().find(|m| supported.contains(m)).ok_or_else(|| {
                Refused::NoCommonMethod { aef: entry.aef_id.clone(), supported: supported.clone() }.status()
            }),
        };
        match (preferred_method(i, &info, entry), want) {
            (Ok(m), Ok(w)) => prop_assert_eq!(m, w),
            (Err(s), Err(w)) => same(&s, &w)?,
            (got, want) => prop_assert!(false, "got {:?}, expected {:?}", got, want),
        }
    }

    /// An entry's `api_id`: empty grants every API of the AEF, one it exposes grants that one,
    /// a malformed one is refused naming the field, an unknown one is `ApiNotExposed`.
    #[test]
    fn props_ccf_allowed_apis(
        i in 0..MAX_SECURITY_INFO,
        api in prop_oneof![Just(String::new()), Just("weather-v1".to_string()), Just("maps-v2".to_string()), field_text()],
    ) {
        let reg = registry(&[SecurityMethod::Psk]);
        let entry = reg.get(&AefId::new("aef-b1").unwrap()).unwrap();
        let info = pb::SecurityInformation { api_id: api.clone(), ..Default::default() };
        let want = if api.is_empty() {
            Ok(entry.apis.clone())
        } else {
            match ApiName::new(api.clone()) {
                Err(e) => Err(invalid_field(&format!("service_security.security_info[{i}].api_id"), e)),
                Ok(n) if entry.apis.contains(&n) => Ok(vec![n]),
                Ok(n) => Err(Refused::ApiNotExposed { aef: entry.aef_id.clone(), api: n }.status()),
            }
        };
        match (allowed_apis(i, &info, entry), want) {
            (Ok(a), Ok(w)) => prop_assert_eq!(a, w),
            (Err(s), Err(w)) => same(&s, &w)?,
            (got, want) => prop_assert!(false, "got {:?}, expected {:?}", got, want),
        }
    }

    /// An entry names its AEF by id (checked, then looked up) or else by interface (any
    /// spelling of the registered one finds it; a malformed one is refused naming
    /// `interface_details`), or is refused for naming none.
    #[test]
    fn props_ccf_resolve_aef(
        i in 0..MAX_SECURITY_INFO,
        aef in prop_oneof![Just(String::new()), Just("aef-b1".to_string()), Just("aef-a1".to_string()), field_text()],
        iface in proptest::option::of(prop_oneof![
            Just(("AEF-B1.Operator-B.test.".to_string(), 8443u32, "/api".to_string())),
            Just(("aef-b1.operator-b.test".to_string(), 8443u32, "/api".to_string())),
            (prop_oneof![Just("aef-b1.operator-b.test".to_string()), field_text()], any::<u32>(), prop_oneof![Just("/api".to_string()), ".{0,6}"]),
        ]),
    ) {
        let reg = registry(&[SecurityMethod::Psk]);
        let details = iface.clone().map(|(fqdn, port, api_prefix)| pb::InterfaceDescription {
            fqdn,
            port,
            api_prefix,
            ..Default::default()
        });
        let info = pb::SecurityInformation { aef_id: aef.clone(), interface_details: details.clone(), ..Default::default() };
        let field = format!("service_security.security_info[{i}]");
        let not_registered = || Refused::AefNotRegistered { field: field.clone(), own: own() }.status();
        let want: Result<&str, Status> = if !aef.is_empty() {
            match AefId::new(aef.clone()) {
                Err(e) => Err(invalid_field(&format!("{field}.aef_id"), e)),
                Ok(_) if aef == "aef-b1" || aef == "aef-a1" => Ok(aef.as_str()),
                Ok(_) => Err(not_registered()),
            }
        } else if let Some(d) = &details {
            match Interface::from_proto(d).canonical() {
                Err(e) => Err(invalid_field(&format!("{field}.interface_details"), e)),
                Ok(c) if c == "aef-b1.operator-b.test:8443/api" => Ok("aef-b1"),
                Ok(_) => Err(not_registered()),
            }
        } else {
            Err(invalid_field(&field, "names no AEF: set aef_id or interface_details"))
        };
        match (resolve_aef(&reg, &own(), i, &info), want) {
            (Ok(e), Ok(w)) => prop_assert_eq!(e.aef_id.as_str(), w),
            (Err(s), Err(w)) => same(&s, &w)?,
            (got, want) => prop_assert!(false, "got {:?}, expected {:?}", got.map(|e| &e.aef_id), want),
        }
    }

    /// The token endpoint takes only the client-credentials grant, for the caller itself.
    #[test]
    fn props_ccf_client_credentials(
        grant in prop_oneof![Just("client_credentials".to_string()), ".{0,20}"],
        client in prop_oneof![Just("inv-1".to_string()), field_text()],
    ) {
        let id = ApiInvokerId::new("inv-1").unwrap();
        let req = pb::AccessTokenReq { grant_type: grant.clone(), client_id: client.clone(), ..Default::default() };
        let want = if grant != "client_credentials" {
            Some(Refused::UnsupportedGrantType { grant_type: grant }.status())
        } else if client != "inv-1" {
            Some(Refused::ClientIdNotTheCaller { invoker: id.clone() }.status())
        } else {
            None
        };
        match (check_client_credentials(&id, &req), want) {
            (Ok(()), None) => {}
            (Err(s), Some(w)) => same(&s, &w)?,
            (got, want) => prop_assert!(false, "got {:?}, expected {:?}", got, want),
        }
    }
}

/// A registry of this domain with `aef-b1` (own, at `aef-b1.operator-b.test:8443/api`,
/// `weather-v1` and `maps-v1`, the given methods, at least one) and `aef-a1` (operator-a's).
fn registry(methods: &[SecurityMethod]) -> AefRegistry {
    let aef = |id: &str, domain: &str, host: &str| AefConfig {
        aef_id: id.into(),
        ccf_id: Some(domain.into()),
        interface: Interface {
            ipv4_addr: None,
            ipv6_addr: None,
            fqdn: Some(host.into()),
            port: 8443,
            api_prefix: "/api".into(),
        },
        security_methods: methods.to_vec(),
        apis: vec!["weather-v1".into(), "maps-v1".into()],
        security_endpoint: None,
        security_server_name: None,
    };
    AefRegistry::from_config(
        &own(),
        &[
            aef("aef-b1", OWN, "aef-b1.operator-b.test"),
            aef("aef-a1", "operator-a.test", "aef-a1.operator-a.test"),
        ],
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The configuration file.

#[derive(Clone, Debug)]
struct Values {
    ccf_id: String,
    state_dir: String,
    validity: Option<u64>,
    credentials: Vec<String>,
    gateway: Option<String>,
    aef_ids: Vec<String>,
}

fn values() -> impl Strategy<Value = Values> {
    (
        ".{0,20}",
        ".{1,20}",
        proptest::option::of(0..=i64::MAX as u64),
        prop::collection::vec(".{0,20}", 0..3),
        proptest::option::of(".{0,20}"),
        prop::collection::vec(".{0,12}", 0..3),
    )
        .prop_map(
            |(ccf_id, state_dir, validity, credentials, gateway, aef_ids)| Values {
                ccf_id,
                state_dir,
                validity,
                credentials,
                gateway,
                aef_ids,
            },
        )
}

fn render(v: &Values) -> String {
    let q = |s: &str| toml_string(s);
    let creds: Vec<String> = v.credentials.iter().map(|c| q(c)).collect();
    let mut t = format!(
        "ccf_id = {}\nstate_dir = {}\n",
        q(&v.ccf_id),
        q(&v.state_dir)
    );
    if let Some(x) = v.validity {
        t += &format!("[security]\naef_psk_validity_secs = {x}\n");
    }
    t += &format!("[onboarding]\ncredentials = [{}]\n", creds.join(", "));
    if let Some(g) = &v.gateway {
        t += &format!("[gateway]\naddress = {}\n", q(g));
    }
    for a in &v.aef_ids {
        t += &format!(
            "[[aef]]\naef_id = {}\nsecurity_methods = [\"PSK\"]\napis = [\"x\"]\n[aef.interface]\nfqdn = \"h.test\"\nport = 1\n",
            q(a)
        );
    }
    t
}

proptest! {
    #![proptest_config(config())]

    /// A generated config parses and keeps every value written (the credentials hidden from
    /// `Debug`), with the defaults for what it leaves out.
    #[test]
    fn props_ccf_config_keeps_its_values(v in values()) {
        let c = CcfConfig::parse(&render(&v), "gen.toml").unwrap();
        prop_assert_eq!(&c.ccf_id, &v.ccf_id);
        prop_assert_eq!(c.state_dir.to_str(), Some(v.state_dir.as_str()));
        prop_assert_eq!(c.security.aef_psk_validity_secs, v.validity.unwrap_or(3600));
        let creds: Vec<&str> = c.onboarding.credentials.iter().map(|c| c.expose()).collect();
        prop_assert_eq!(&creds, &v.credentials.iter().map(String::as_str).collect::<Vec<_>>());
        let shown = format!("{:?}", c.onboarding);
        prop_assert_eq!(shown.matches("<redacted>").count(), v.credentials.len());
        prop_assert_eq!(c.gateway.as_ref().map(|g| g.address.as_str()), v.gateway.as_deref());
        prop_assert_eq!(c.gateway.as_ref().map(|g| g.server_name.as_str()), v.gateway.as_ref().map(|_| "localhost"));
        prop_assert_eq!(c.aefs.iter().map(|a| a.aef_id.clone()).collect::<Vec<_>>(), v.aef_ids);
    }

    /// Arbitrary text, and a generated file with a line dropped, duplicated or cut short, is
    /// parsed or refused with a message that starts with the file's name.
    #[test]
    fn props_ccf_config_arbitrary_text(
        v in values(),
        junk in any::<String>(),
        at in any::<prop::sample::Index>(),
        op in 0..3u8,
    ) {
        let broken = ccf_core::testing::break_a_line(&render(&v), at, op);
        for text in [broken, junk] {
            if let Err(e) = CcfConfig::parse(&text, "any.toml") {
                prop_assert!(e.to_string().starts_with("any.toml: "), "{}", e);
            }
        }
    }
}
