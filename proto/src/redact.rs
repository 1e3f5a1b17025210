//! `Debug` for the messages that carry secrets (AEFPSK, onboarding credentials, access tokens):
//! the secret fields print as `<redacted>` so no `{:?}` anywhere can leak them (invariant 4
//! in docs/ARCHITECTURE.md). The messages do not implement `Drop` (that would forbid `..Default::default()`
//! construction); code that keeps a key moves it out into `ccf_core::kdf::AefPsk`, which zeroizes.

use std::fmt;

use crate::v1::{AccessTokenRsp, InvokerSecurityInformation, OnboardingInformation};

const REDACTED: &str = "<redacted>";

impl fmt::Debug for InvokerSecurityInformation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InvokerSecurityInformation")
            .field("api_invoker_id", &self.api_invoker_id)
            .field("home_ccf_id", &self.home_ccf_id)
            .field("aef_id", &self.aef_id)
            .field("sel_security_method", &self.sel_security_method)
            .field("aef_psk", &REDACTED)
            .field("key_id", &self.key_id)
            .field("remaining_validity_ms", &self.remaining_validity_ms)
            .field("allowed_api_names", &self.allowed_api_names)
            .field(
                "invoker_ca_certificates",
                &self.invoker_ca_certificates.len(),
            )
            .field("interface_canonical", &self.interface_canonical)
            .finish()
    }
}

impl fmt::Debug for OnboardingInformation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnboardingInformation")
            .field("api_invoker_public_key", &self.api_invoker_public_key)
            .field("onboarding_credential", &REDACTED)
            .finish()
    }
}

impl fmt::Debug for AccessTokenRsp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessTokenRsp")
            .field("access_token", &REDACTED)
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_reach_debug_output() {
        let info = InvokerSecurityInformation {
            aef_psk: vec![0xAB; 32],
            key_id: "k1".into(),
            ..Default::default()
        };
        let shown = format!("{info:?}");
        assert!(shown.contains("k1") && !shown.contains("171"), "{shown}");
        let onb = OnboardingInformation {
            onboarding_credential: "s3cret".into(),
            ..Default::default()
        };
        assert!(!format!("{onb:?}").contains("s3cret"));
        let tok = AccessTokenRsp {
            access_token: "eyJtoken".into(),
            ..Default::default()
        };
        assert!(!format!("{tok:?}").contains("eyJtoken"));
    }
}
