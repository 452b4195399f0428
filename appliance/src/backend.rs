//! The signing backend: the only thing the API needs from an HSM is the
//! private-key operation on a ready digest and the public facts of its
//! keys. svs-hsm's [`Hsm`] implements it; [`SoftBackend`] does it in
//! software for tests of policy, API and audit without a token.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use svs_hsm::{Algorithm, HealthState, Hsm, KeyInfo, KeySet, Lane, UserPinState};

use crate::error::SvsError;

/// A boxed future, so the trait can be used as `dyn`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What svsd needs from a key store.
pub trait SigningBackend: Send + Sync + 'static {
    /// The installed key with this token object name (CKA_LABEL).
    fn key(&self, object: &str) -> Option<Arc<KeyInfo>>;
    /// The token's keys by object name as they are now, not installed: a
    /// reload tests the ones that changed before anything serves them.
    fn discover_keys(&self) -> BoxFuture<'_, Result<KeySet, SvsError>>;
    /// Makes `keys` (from [`SigningBackend::discover_keys`]) the ones
    /// [`SigningBackend::key`] answers and signatures by name use.
    fn install_keys(&self, keys: KeySet);
    /// Signs a ready 32-byte digest (SM2 e) with this key, installed or not
    /// (a reload's pairwise test of a key before it serves); raw r‖s.
    fn sign_digest_with(
        &self,
        key: Arc<KeyInfo>,
        digest: [u8; 32],
    ) -> BoxFuture<'_, Result<[u8; 64], SvsError>>;
    /// Signs several ready digests, each with the key it was made for; one
    /// answer per item, in order. Backends with a worker pool hand the
    /// items over in as few jobs as they have workers, queued in `lane`
    /// (the entity's): busy lanes take turns.
    fn sign_digests(
        &self,
        _lane: Lane,
        items: Vec<(Arc<KeyInfo>, [u8; 32])>,
    ) -> BoxFuture<'_, Vec<Result<[u8; 64], SvsError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(items.len());
            for (key, digest) in items {
                out.push(self.sign_digest_with(key, digest).await);
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
    /// The token's user PIN state (count low, final try, locked); none
    /// for backends that have no PIN.
    fn user_pin_state(&self) -> BoxFuture<'_, Result<Option<UserPinState>, SvsError>>;
}

impl SigningBackend for Hsm {
    fn key(&self, object: &str) -> Option<Arc<KeyInfo>> {
        Hsm::key(self, object).ok()
    }

    fn discover_keys(&self) -> BoxFuture<'_, Result<KeySet, SvsError>> {
        Box::pin(async move { Ok(Hsm::discover_keys(self).await?) })
    }

    fn install_keys(&self, keys: KeySet) {
        Hsm::install_keys(self, keys);
    }

    fn sign_digest_with(
        &self,
        key: Arc<KeyInfo>,
        digest: [u8; 32],
    ) -> BoxFuture<'_, Result<[u8; 64], SvsError>> {
        Box::pin(async move {
            Hsm::sign_digests(self, vec![(key, digest)])
                .await
                .pop()
                .unwrap_or(Err(svs_hsm::HsmError::Shutdown))
                .map_err(SvsError::from)
        })
    }

    fn sign_digests(
        &self,
        lane: Lane,
        items: Vec<(Arc<KeyInfo>, [u8; 32])>,
    ) -> BoxFuture<'_, Vec<Result<[u8; 64], SvsError>>> {
        Box::pin(async move {
            Hsm::sign_digests_in(self, lane, items)
                .await
                .into_iter()
                .map(|r| r.map_err(SvsError::from))
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

    fn user_pin_state(&self) -> BoxFuture<'_, Result<Option<UserPinState>, SvsError>> {
        Box::pin(async move { Ok(Some(Hsm::user_pin_state(self).await?)) })
    }
}

/// SM2 keys in process memory. For tests and benchmarks only: the point of
/// svsd is that keys live in an HSM. It models a token the way svsd sees
/// one: the keys on it (which [`SoftBackend::replace_key`] and
/// [`SoftBackend::delete_key`] change, as an officer would) and the keys
/// installed from it, which change only with
/// [`SigningBackend::install_keys`].
pub struct SoftBackend {
    /// On the "token", by name: signing finds the private key here by name
    /// and public point, as the HSM does by CKA_ID and point.
    token: RwLock<HashMap<String, (Arc<KeyInfo>, sm2::dsa::SigningKey)>>,
    installed: RwLock<KeySet>,
    /// When set, every signature fails as if the token were gone.
    pub fail: std::sync::atomic::AtomicBool,
    /// Data objects by label.
    data: std::sync::Mutex<HashMap<String, Vec<u8>>>,
    /// What [`SigningBackend::user_pin_state`] answers (tests set it).
    pub pin_state: std::sync::Mutex<UserPinState>,
}

impl std::fmt::Debug for SoftBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let installed = self.installed.read().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("SoftBackend")
            .field("keys", &installed.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A soft key `name` (CKA_ID `id`) whose scalar is derived from `seed`.
fn soft_key(name: &str, id: &[u8], seed: &[u8]) -> Option<(Arc<KeyInfo>, sm2::dsa::SigningKey)> {
    let scalar = crate::audit::sm3(seed);
    let sk = sm2::SecretKey::from_slice(&scalar)
        .or_else(|_| sm2::SecretKey::from_slice(&[1u8; 32]))
        .ok()?;
    let point = sk.public_key().to_sec1_bytes().to_vec();
    let signing = sm2::dsa::SigningKey::new("1234567812345678", &sk).ok()?;
    let info = KeyInfo {
        name: name.to_owned(),
        id: id.to_vec(),
        algorithm: Algorithm::Sm2,
        spki_der: svs_hsm::keys::spki_for_point(Algorithm::Sm2, &point),
        public_point: point,
        certificate_chain: Vec::new(),
    };
    Some((Arc::new(info), signing))
}

impl SoftBackend {
    /// Keys named `names`, derived deterministically from their names, on
    /// the token and installed.
    pub fn new(names: &[&str]) -> SoftBackend {
        let token: HashMap<_, _> = names
            .iter()
            .filter_map(|name| {
                Some((
                    (*name).to_owned(),
                    soft_key(name, name.as_bytes(), name.as_bytes())?,
                ))
            })
            .collect();
        let installed = token
            .iter()
            .map(|(name, (info, _))| (name.clone(), info.clone()))
            .collect();
        SoftBackend {
            token: RwLock::new(token),
            installed: RwLock::new(installed),
            fail: Default::default(),
            data: Default::default(),
            pin_state: Default::default(),
        }
    }

    /// Deletes key `name` from the token and generates another under the
    /// same name (new CKA_ID and public point), as an officer re-creating
    /// a key does; not installed. Returns the new key.
    pub fn replace_key(&self, name: &str) -> Option<Arc<KeyInfo>> {
        let mut token = self.token.write().unwrap_or_else(|p| p.into_inner());
        // Seeded by the point it replaces: a new key every time, reproducibly.
        let seed = token
            .get(name)
            .map_or_else(|| name.as_bytes().to_vec(), |(k, _)| k.public_point.clone());
        let (info, signing) = soft_key(name, &crate::audit::sm3(&seed)[..8], &seed)?;
        token.insert(name.to_owned(), (info.clone(), signing));
        Some(info)
    }

    /// Gives key `name` on the token a certificate chain (an import), the
    /// key itself the same.
    pub fn set_certificate_chain(&self, name: &str, chain: Vec<Vec<u8>>) {
        let mut token = self.token.write().unwrap_or_else(|p| p.into_inner());
        if let Some((info, _)) = token.get_mut(name) {
            let mut with = (**info).clone();
            with.certificate_chain = chain;
            *info = Arc::new(with);
        }
    }

    /// Deletes key `name` from the token (the installed list keeps it until
    /// the next install; it can no longer sign).
    pub fn delete_key(&self, name: &str) {
        self.token
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}

impl SigningBackend for SoftBackend {
    fn key(&self, object: &str) -> Option<Arc<KeyInfo>> {
        self.installed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(object)
            .cloned()
    }

    fn discover_keys(&self) -> BoxFuture<'_, Result<KeySet, SvsError>> {
        let found = if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
            Err(SvsError::HsmUnavailable("soft backend told to fail".into()))
        } else {
            Ok(self
                .token
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(name, (info, _))| (name.clone(), info.clone()))
                .collect())
        };
        Box::pin(async move { found })
    }

    fn install_keys(&self, keys: KeySet) {
        *self.installed.write().unwrap_or_else(|p| p.into_inner()) = keys;
    }

    fn sign_digest_with(
        &self,
        key: Arc<KeyInfo>,
        digest: [u8; 32],
    ) -> BoxFuture<'_, Result<[u8; 64], SvsError>> {
        use sm2::dsa::signature::hazmat::PrehashSigner;
        let result = (|| {
            if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(SvsError::HsmUnavailable("soft backend told to fail".into()));
            }
            let token = self.token.read().unwrap_or_else(|p| p.into_inner());
            let signing = token
                .get(&key.name)
                .filter(|(on_token, _)| on_token.public_point == key.public_point)
                .map(|(_, signing)| signing)
                // As svs-hsm answers (KeyChanged): the token changed, not
                // the client's doing.
                .ok_or_else(|| {
                    SvsError::HsmUnavailable(format!(
                        "key {} is no longer the one read from the token",
                        key.name
                    ))
                })?;
            let sig: sm2::dsa::Signature = signing
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

    fn user_pin_state(&self) -> BoxFuture<'_, Result<Option<UserPinState>, SvsError>> {
        let state = *self.pin_state.lock().unwrap_or_else(|p| p.into_inner());
        Box::pin(async move { Ok(Some(state)) })
    }
}
