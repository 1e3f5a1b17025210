//! The CCF's acknowledged state in an embedded ACID store (redb, one file in the state directory):
//! onboarded invokers, used onboarding credentials, and security contexts with their expiry.
//!
//! Every operation is one write transaction, committed durably before the RPC that caused it is
//! answered, so whatever a client saw acknowledged survives a crash. Values are JSON; a context's
//! AEFPSK is kept (hex) because the CCF must hand it to AEFs later.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::ids::{AefId, ApiInvokerId, ApiName, CcfId};
use crate::kdf::AefPsk;
use crate::registry::SecurityMethod;

const INVOKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("invokers");
const CONTEXTS: TableDefinition<&str, &[u8]> = TableDefinition::new("security_contexts");
const CREDENTIALS: TableDefinition<&str, &str> =
    TableDefinition::new("used_onboarding_credentials");

/// Why the store failed. The operation changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("state store: {0}")]
    Db(String),
    /// A stored value cannot be read back.
    #[error("state store holds a corrupt record: {0}")]
    Corrupt(String),
    /// The onboarding credential was used before.
    #[error("the onboarding credential was already used")]
    CredentialUsed,
    /// The invoker is not (or no longer) onboarded.
    #[error("the API invoker is not onboarded")]
    InvokerGone,
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.to_string()) }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// An onboarded invoker.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InvokerRecord {
    /// Its id.
    pub api_invoker_id: ApiInvokerId,
    /// The certificate issued at onboarding.
    pub certificate_pem: String,
    /// Its public key.
    pub public_key_pem: String,
    /// When, Unix ms.
    pub onboarded_at_ms: u64,
    /// TS 29.222 apiInvokerInformation.
    pub information: String,
    /// TS 29.222 notificationDestination.
    pub notification_destination: String,
}

mod psk_hex {
    use super::*;
    use serde::{Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(psk: &Option<AefPsk>, s: S) -> Result<S::Ok, S::Error> {
        match psk {
            Some(p) => s.serialize_some(Zeroizing::new(hex::encode(p.expose())).as_str()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<AefPsk>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)?.map(Zeroizing::new) else {
            return Ok(None);
        };
        let bytes = Zeroizing::new(hex::decode(text.as_str()).map_err(D::Error::custom)?);
        AefPsk::from_slice(&bytes)
            .map(Some)
            .ok_or_else(|| D::Error::custom("AEFPSK of wrong length"))
    }
}

/// A security context: what the invoker negotiated for one AEF.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecurityContext {
    /// The invoker.
    pub api_invoker_id: ApiInvokerId,
    /// The AEF.
    pub aef_id: AefId,
    /// The domain owning the AEF.
    pub aef_ccf_id: CcfId,
    /// The selected method.
    pub method: SecurityMethod,
    /// The AEFPSK (PSK only).
    #[serde(with = "psk_hex", default)]
    pub aef_psk: Option<AefPsk>,
    /// Key id of the AEFPSK; empty for other methods.
    pub key_id: String,
    /// P0 the key is bound to.
    pub interface_canonical: String,
    /// APIs the invoker may call at the AEF.
    pub allowed_apis: Vec<ApiName>,
    /// When created, Unix ms.
    pub created_at_ms: u64,
    /// When it stops being valid, Unix ms.
    pub expires_at_ms: u64,
}

fn ctx_key(invoker: &ApiInvokerId, aef: &AefId) -> String {
    format!("{invoker}/{aef}")
}

fn ctx_range(invoker: &ApiInvokerId) -> (String, String) {
    // ids never contain '/', and '0' is the character after '/'.
    (format!("{invoker}/"), format!("{invoker}0"))
}

fn encode<T: Serialize>(v: &T) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    serde_json::to_vec(v)
        .map(Zeroizing::new)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The CCF state store.
pub struct Store {
    db: Database,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens (or creates) the store file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(INVOKERS)?;
        tx.open_table(CONTEXTS)?;
        tx.open_table(CREDENTIALS)?;
        tx.commit()?;
        Ok(Self { db })
    }

    /// Records a new invoker and marks its onboarding credential (by digest) used, atomically.
    pub fn onboard(&self, credential_digest: &str, rec: &InvokerRecord) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut creds = tx.open_table(CREDENTIALS)?;
            if creds.get(credential_digest)?.is_some() {
                return Err(StoreError::CredentialUsed);
            }
            creds.insert(credential_digest, rec.api_invoker_id.as_str())?;
            let mut inv = tx.open_table(INVOKERS)?;
            inv.insert(rec.api_invoker_id.as_str(), encode(rec)?.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Whether a credential digest was used.
    pub fn credential_used(&self, credential_digest: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx
            .open_table(CREDENTIALS)?
            .get(credential_digest)?
            .is_some())
    }

    /// An invoker's record.
    pub fn invoker(&self, id: &ApiInvokerId) -> Result<Option<InvokerRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(INVOKERS)?;
        t.get(id.as_str())?.map(|v| decode(v.value())).transpose()
    }

    /// Number of onboarded invokers.
    pub fn invoker_count(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(INVOKERS)?.len()?)
    }

    /// Number of stored security contexts.
    pub fn context_count(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(CONTEXTS)?.len()?)
    }

    /// Removes an invoker and all its contexts; returns the removed contexts, or `InvokerGone`.
    pub fn offboard(&self, id: &ApiInvokerId) -> Result<Vec<SecurityContext>, StoreError> {
        let tx = self.db.begin_write()?;
        let removed = {
            let mut inv = tx.open_table(INVOKERS)?;
            if inv.remove(id.as_str())?.is_none() {
                return Err(StoreError::InvokerGone);
            }
            Self::remove_in(&tx, id, None)?
        };
        tx.commit()?;
        Ok(removed)
    }

    fn remove_in(
        tx: &redb::WriteTransaction,
        id: &ApiInvokerId,
        aef: Option<&AefId>,
    ) -> Result<Vec<SecurityContext>, StoreError> {
        let mut t = tx.open_table(CONTEXTS)?;
        let keys: Vec<String> = match aef {
            Some(a) => vec![ctx_key(id, a)],
            None => {
                let (lo, hi) = ctx_range(id);
                t.range(lo.as_str()..hi.as_str())?
                    .map(|r| r.map(|(k, _)| k.value().to_string()))
                    .collect::<Result<_, _>>()?
            }
        };
        let mut removed = Vec::new();
        for k in keys {
            if let Some(v) = t.remove(k.as_str())? {
                removed.push(decode(v.value())?);
            }
        }
        Ok(removed)
    }

    /// Stores contexts of an onboarded invoker, replacing those for the same AEFs, atomically.
    /// Returns the replaced contexts.
    pub fn put_contexts(
        &self,
        id: &ApiInvokerId,
        contexts: &[SecurityContext],
    ) -> Result<Vec<SecurityContext>, StoreError> {
        let tx = self.db.begin_write()?;
        let mut replaced = Vec::new();
        {
            if tx.open_table(INVOKERS)?.get(id.as_str())?.is_none() {
                return Err(StoreError::InvokerGone);
            }
            let mut t = tx.open_table(CONTEXTS)?;
            for c in contexts {
                let key = ctx_key(id, &c.aef_id);
                if let Some(old) = t.insert(key.as_str(), encode(c)?.as_slice())? {
                    replaced.push(decode(old.value())?);
                }
            }
        }
        tx.commit()?;
        Ok(replaced)
    }

    /// The context of an invoker for one AEF.
    pub fn context(
        &self,
        id: &ApiInvokerId,
        aef: &AefId,
    ) -> Result<Option<SecurityContext>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(CONTEXTS)?;
        t.get(ctx_key(id, aef).as_str())?
            .map(|v| decode(v.value()))
            .transpose()
    }

    /// Every context of an invoker.
    pub fn contexts_of(&self, id: &ApiInvokerId) -> Result<Vec<SecurityContext>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(CONTEXTS)?;
        let (lo, hi) = ctx_range(id);
        t.range(lo.as_str()..hi.as_str())?
            .map(|r| {
                r.map_err(StoreError::from)
                    .and_then(|(_, v)| decode(v.value()))
            })
            .collect()
    }

    /// Removes an invoker's contexts (for one AEF, or all); returns what was removed.
    pub fn remove_contexts(
        &self,
        id: &ApiInvokerId,
        aef: Option<&AefId>,
    ) -> Result<Vec<SecurityContext>, StoreError> {
        let tx = self.db.begin_write()?;
        let removed = Self::remove_in(&tx, id, aef)?;
        tx.commit()?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> InvokerRecord {
        InvokerRecord {
            api_invoker_id: ApiInvokerId::new(id).unwrap(),
            certificate_pem: "c".into(),
            public_key_pem: "k".into(),
            onboarded_at_ms: 1,
            information: String::new(),
            notification_destination: String::new(),
        }
    }

    fn ctx(inv: &str, aef: &str, psk: u8) -> SecurityContext {
        SecurityContext {
            api_invoker_id: ApiInvokerId::new(inv).unwrap(),
            aef_id: AefId::new(aef).unwrap(),
            aef_ccf_id: CcfId::new("a.test").unwrap(),
            method: SecurityMethod::Psk,
            aef_psk: AefPsk::from_slice(&[psk; 32]),
            key_id: "k".into(),
            interface_canonical: "h:1".into(),
            allowed_apis: vec![],
            created_at_ms: 0,
            expires_at_ms: 10,
        }
    }

    #[test]
    fn reused_credential_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        s.onboard("d1", &rec("inv-1")).unwrap();
        assert!(matches!(
            s.onboard("d1", &rec("inv-2")),
            Err(StoreError::CredentialUsed)
        ));
        assert_eq!(s.invoker_count().unwrap(), 1);
        assert!(
            s.invoker(&ApiInvokerId::new("inv-2").unwrap())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn contexts_round_trip_and_go_with_the_invoker() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        s.onboard("d1", &rec("inv-1")).unwrap();
        s.onboard("d2", &rec("inv-10")).unwrap();
        let id = ApiInvokerId::new("inv-1").unwrap();
        let id10 = ApiInvokerId::new("inv-10").unwrap();
        s.put_contexts(&id, &[ctx("inv-1", "aef-a", 1), ctx("inv-1", "aef-b", 2)])
            .unwrap();
        s.put_contexts(&id10, &[ctx("inv-10", "aef-a", 3)]).unwrap();
        let got = s
            .context(&id, &AefId::new("aef-b").unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(got.aef_psk.unwrap().expose(), &[2; 32]);
        assert_eq!(s.contexts_of(&id).unwrap().len(), 2);
        assert_eq!(s.offboard(&id).unwrap().len(), 2);
        assert_eq!(
            s.contexts_of(&id10).unwrap().len(),
            1,
            "prefix scan must not touch inv-10"
        );
        assert!(matches!(
            s.put_contexts(&id, &[ctx("inv-1", "aef-a", 1)]),
            Err(StoreError::InvokerGone)
        ));
        assert_eq!(s.context_count().unwrap(), 1);
    }
}
