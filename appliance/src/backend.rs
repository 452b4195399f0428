//! The signing backend: the only thing the API needs from an HSM is the
//! private-key operation on a ready digest and the public facts of its
//! keys. svs-hsm's [`Hsm`] implements it; [`SoftBackend`] does it in
//! software for tests of policy, API and audit without a token.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use svs_hsm::signature::normalise_signature;
use svs_hsm::{Algorithm, HealthState, Hsm, KeyInfo, SignatureEncoding};

use crate::error::SvsError;

/// A boxed future, so the trait can be used as `dyn`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What svsd needs from a key store.
pub trait SigningBackend: Send + Sync + 'static {
    /// The key with this token object name (CKA_LABEL).
    fn key(&self, object: &str) -> Option<Arc<KeyInfo>>;
    /// Signs a ready 32-byte digest (SM2 e) with the key; raw r‖s.
    fn sign_digest(
        &self,
        object: &str,
        digest: [u8; 32],
    ) -> BoxFuture<'_, Result<[u8; 64], SvsError>>;
    /// Signs several ready digests, each with its own key object; one
    /// answer per item, in order. Backends with a worker pool hand the
    /// items over in as few jobs as they have workers.
    fn sign_digests(
        &self,
        items: Vec<(String, [u8; 32])>,
    ) -> BoxFuture<'_, Vec<Result<[u8; 64], SvsError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(items.len());
            for (object, digest) in items {
                out.push(self.sign_digest(&object, digest).await);
            }
            out
        })
    }
    /// The values of the token's data objects labelled `label` (the audit
    /// anchor, see `svs_hsm::data`).
    fn read_data(&self, label: &str) -> BoxFuture<'_, Result<Vec<Vec<u8>>, SvsError>>;
    /// Makes `value` the only data object labelled `label`.
    fn replace_data(&self, label: &str, value: Vec<u8>) -> BoxFuture<'_, Result<(), SvsError>>;
    /// Whether the backend can sign right now; the reason when not.
    fn health(&self) -> Result<(), String>;
    /// The session pool's state, for metrics; none for backends without one.
    fn pool_health(&self) -> Option<svs_hsm::Health> {
        None
    }
}

impl SigningBackend for Hsm {
    fn key(&self, object: &str) -> Option<Arc<KeyInfo>> {
        Hsm::key(self, object).ok()
    }

    fn sign_digest(
        &self,
        object: &str,
        digest: [u8; 32],
    ) -> BoxFuture<'_, Result<[u8; 64], SvsError>> {
        let object = object.to_owned();
        Box::pin(async move {
            let sig = Hsm::sign_digest(self, &object, &digest, SignatureEncoding::Raw).await?;
            normalise_signature(&sig, SignatureEncoding::Raw).map_err(SvsError::from)
        })
    }

    fn sign_digests(
        &self,
        items: Vec<(String, [u8; 32])>,
    ) -> BoxFuture<'_, Vec<Result<[u8; 64], SvsError>>> {
        Box::pin(async move {
            // Unknown objects are answered here; the rest go to the pool.
            let looked_up: Vec<_> = items
                .into_iter()
                .map(|(object, digest)| Hsm::key(self, &object).map(|k| (k, digest)))
                .collect();
            let known = looked_up
                .iter()
                .filter_map(|r| r.as_ref().ok().cloned())
                .collect();
            let mut signed = Hsm::sign_digests(self, known).await.into_iter();
            looked_up
                .into_iter()
                .map(|r| {
                    r.map_err(SvsError::from)?;
                    signed
                        .next()
                        .unwrap_or(Err(svs_hsm::HsmError::Shutdown))
                        .map_err(SvsError::from)
                })
                .collect()
        })
    }

    fn read_data(&self, label: &str) -> BoxFuture<'_, Result<Vec<Vec<u8>>, SvsError>> {
        let label = label.to_owned();
        Box::pin(async move { Ok(Hsm::read_data(self, &label).await?) })
    }

    fn replace_data(&self, label: &str, value: Vec<u8>) -> BoxFuture<'_, Result<(), SvsError>> {
        let label = label.to_owned();
        Box::pin(async move { Ok(Hsm::replace_data(self, &label, value).await?) })
    }

    fn health(&self) -> Result<(), String> {
        let h = Hsm::health(self);
        match h.state {
            // A hung HSM: every worker inside a call past its timeout, so
            // every request would wait out its deadline (504).
            _ if h.workers_stuck >= h.workers && h.workers > 0 => Err(format!(
                "HSM not answering: all {} workers stuck in calls past the operation timeout",
                h.workers
            )),
            HealthState::Up | HealthState::Degraded if h.sessions_open > 0 => Ok(()),
            _ => Err(format!(
                "HSM {:?}: {} of {} sessions open{}",
                h.state,
                h.sessions_open,
                h.workers,
                h.last_error
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            )),
        }
    }

    fn pool_health(&self) -> Option<svs_hsm::Health> {
        Some(Hsm::health(self))
    }
}

/// SM2 keys in process memory. For tests and benchmarks only: the point of
/// svsd is that keys live in an HSM.
pub struct SoftBackend {
    keys: HashMap<String, (Arc<KeyInfo>, sm2::dsa::SigningKey)>,
    /// When set, every signature fails as if the token were gone.
    pub fail: std::sync::atomic::AtomicBool,
    /// Data objects by label.
    data: std::sync::Mutex<HashMap<String, Vec<u8>>>,
}

impl std::fmt::Debug for SoftBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftBackend")
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl SoftBackend {
    /// Keys named `names`, derived deterministically from their names.
    pub fn new(names: &[&str]) -> SoftBackend {
        let mut keys = HashMap::new();
        for name in names {
            let scalar = crate::audit::sm3(name.as_bytes());
            let sk = sm2::SecretKey::from_slice(&scalar).unwrap_or_else(|_| {
                sm2::SecretKey::from_slice(&[1u8; 32]).unwrap_or_else(|_| unreachable!())
            });
            let point = sk.public_key().to_sec1_bytes().to_vec();
            let signing = match sm2::dsa::SigningKey::new("1234567812345678", &sk) {
                Ok(s) => s,
                Err(_) => continue,
            };
            let info = KeyInfo {
                name: (*name).to_owned(),
                id: name.as_bytes().to_vec(),
                algorithm: Algorithm::Sm2,
                spki_der: svs_hsm::keys::spki_for_point(Algorithm::Sm2, &point),
                public_point: point,
                certificate_chain: Vec::new(),
            };
            keys.insert((*name).to_owned(), (Arc::new(info), signing));
        }
        SoftBackend {
            keys,
            fail: Default::default(),
            data: Default::default(),
        }
    }
}

impl SigningBackend for SoftBackend {
    fn key(&self, object: &str) -> Option<Arc<KeyInfo>> {
        self.keys.get(object).map(|(k, _)| k.clone())
    }

    fn sign_digest(
        &self,
        object: &str,
        digest: [u8; 32],
    ) -> BoxFuture<'_, Result<[u8; 64], SvsError>> {
        use sm2::dsa::signature::hazmat::PrehashSigner;
        let result = (|| {
            if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(SvsError::HsmUnavailable("soft backend told to fail".into()));
            }
            let (_, key) = self
                .keys
                .get(object)
                .ok_or_else(|| SvsError::UnknownKey(object.to_owned()))?;
            let sig: sm2::dsa::Signature = key
                .sign_prehash(&digest)
                .map_err(|e| SvsError::Internal(e.to_string()))?;
            let mut raw = [0u8; 64];
            raw.copy_from_slice(sig.to_bytes().as_slice());
            Ok(raw)
        })();
        Box::pin(async move { result })
    }

    fn read_data(&self, label: &str) -> BoxFuture<'_, Result<Vec<Vec<u8>>, SvsError>> {
        let data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let values = data.get(label).cloned().into_iter().collect();
        Box::pin(async move { Ok(values) })
    }

    fn replace_data(&self, label: &str, value: Vec<u8>) -> BoxFuture<'_, Result<(), SvsError>> {
        self.data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(label.to_owned(), value);
        Box::pin(async { Ok(()) })
    }

    fn health(&self) -> Result<(), String> {
        if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
            Err("soft backend told to fail".into())
        } else {
            Ok(())
        }
    }
}
