//! The crate's front door: open the token, list keys, sign, verify,
//! generate keys and import certificates.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::config::HsmConfig;
use crate::error::{HsmError, Result, RvClass};
use crate::fair_queue::Lane;
use crate::keys::{self, KeyInfo};
use crate::pin::PinSource;
use crate::pool::{Health, HsmMetrics, SessionPool};
use crate::profile::{Algorithm, ProfileTable, SignatureEncoding, VendorProfile};
use crate::signature::{SoftwareVerifier, encode_signature, normalise_signature};
use crate::token::{Token, TokenSelector, TokenSession, UserPinState};
use crate::uri::Pkcs11Uri;

/// Signing keys by name (CKA_LABEL).
pub type KeySet = HashMap<String, Arc<KeyInfo>>;

/// An opened HSM: a token, its signing keys, and the session pool.
pub struct Hsm {
    token: Arc<Token>,
    profile: Arc<VendorProfile>,
    pool: SessionPool<Token>,
    keys: RwLock<KeySet>,
    verifier: Arc<SoftwareVerifier>,
    verify_after_sign: bool,
    default_id: Vec<u8>,
    default_key: Option<String>,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm")
            .field("token", &self.token)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl Hsm {
    /// Opens the token described by `config`, checks it, discovers its keys
    /// and starts the pool. Blocking (it loads a module and logs in): call it
    /// at start-up or from `spawn_blocking`.
    pub fn open(config: &HsmConfig, metrics: Arc<dyn HsmMetrics>) -> Result<Hsm> {
        let uri = config.uri.as_deref().map(Pkcs11Uri::parse).transpose()?;
        if uri.as_ref().is_some_and(|u| u.has_pin_value) {
            return Err(HsmError::Config(
                "the PKCS#11 URI carries pin-value: use pin-source or `pin` instead".into(),
            ));
        }
        let mut module = config.module.clone();
        if let Some(path) = uri.as_ref().and_then(|u| u.module_path.clone()) {
            module = crate::token::ModuleSource::Path(path.into());
        }
        let pin_source = config
            .pin
            .clone()
            .or_else(|| {
                uri.as_ref()
                    .and_then(|u| u.pin_source.as_deref())
                    .map(PinSource::from_uri_value)
            })
            .ok_or_else(|| {
                HsmError::Config("no PIN source: set `pin` or the URI's pin-source".into())
            })?;
        let pin = pin_source.read()?;
        let default_key = uri.as_ref().and_then(|u| u.object.clone());
        let selector = TokenSelector {
            label: config.token_label.clone(),
            serial: config.token_serial.clone(),
            uri,
        };
        let profiles = ProfileTable::with_overrides(&config.profiles)?;
        let token = Arc::new(Token::open(
            &module,
            selector,
            pin,
            &profiles,
            &config.profile,
        )?);
        check_pool_size(config.pool.size, token.max_sessions())?;
        let pool = SessionPool::start(token.clone(), config.pool.clone(), metrics)?;
        // Readiness right after open should reflect open sessions, not
        // workers that have not started yet.
        let until =
            std::time::Instant::now() + std::time::Duration::from_millis(config.pool.op_timeout_ms);
        while pool.health().sessions_open < config.pool.size && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let hsm = Hsm {
            profile: Arc::new(token.profile().clone()),
            token,
            pool,
            keys: RwLock::new(KeySet::new()),
            verifier: Arc::new(SoftwareVerifier::new()),
            verify_after_sign: config.verify_after_sign,
            default_key,
            default_id: config.default_sm2_id.as_bytes().to_vec(),
        };
        Ok(hsm)
    }

    /// The key named by the URI's `object` attribute, if any.
    pub fn default_key(&self) -> Option<&str> {
        self.default_key.as_deref()
    }

    /// The vendor profile in use.
    pub fn profile(&self) -> &VendorProfile {
        self.token.profile()
    }

    /// The token (module handle, identity, limits).
    pub fn token(&self) -> &Token {
        &self.token
    }

    /// Pool health for readiness probes and metrics.
    pub fn health(&self) -> Health {
        self.pool.health()
    }

    /// The user PIN's state ([`Token::user_pin_state`]), off the async
    /// runtime.
    pub async fn user_pin_state(&self) -> Result<UserPinState> {
        let token = self.token.clone();
        tokio::task::spawn_blocking(move || token.user_pin_state())
            .await
            .map_err(|e| HsmError::Unavailable(format!("token info: {e}")))?
    }

    /// The software verifier (also usable without any key on the token).
    pub fn verifier(&self) -> &SoftwareVerifier {
        &self.verifier
    }

    /// The token's keys by name as they are now, without making them the
    /// keys [`Hsm::key`] and [`Hsm::sign`] use: a caller that must check
    /// them first (svsd's reload, whose pairwise tests sign with them
    /// through [`Hsm::sign_digests`]) installs them with
    /// [`Hsm::install_keys`] once they pass. Of two keys sharing a label
    /// only the first is kept.
    pub async fn discover_keys(&self) -> Result<KeySet> {
        let profile = self.token.profile().clone();
        let found = self
            .pool
            .run("discover", None, true, move |s: &mut TokenSession| {
                s.forget_handles();
                crate::token::require_user(&s.session)?;
                keys::discover(&s.session, &profile)
            })
            .await?;
        let mut map = KeySet::new();
        for k in found {
            if map.contains_key(&k.name) {
                tracing::warn!(key = %k.name, "two keys share a label: only the first is usable by name");
                continue;
            }
            map.insert(k.name.clone(), Arc::new(k));
        }
        Ok(map)
    }

    /// Makes `keys` (from [`Hsm::discover_keys`]) the keys used by name.
    pub fn install_keys(&self, keys: KeySet) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
    }

    /// Re-reads the token's keys and installs them at once (at start, and
    /// after this handle generated a key or imported a certificate);
    /// returns them. A failure leaves the installed keys as they were.
    pub async fn refresh_keys(&self) -> Result<Vec<Arc<KeyInfo>>> {
        let found = self.discover_keys().await?;
        self.install_keys(found);
        Ok(self.keys())
    }

    /// Known signing keys (as of the last refresh).
    pub fn keys(&self) -> Vec<Arc<KeyInfo>> {
        let mut list: Vec<_> = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// The key with this name.
    pub fn key(&self, name: &str) -> Result<Arc<KeyInfo>> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| HsmError::UnknownKey(name.to_owned()))
    }

    /// The digest the token signs for `message` with this key: SM2's
    /// e = SM3(Z ‖ M) (Z from the key and `id`, default ID when `None`) or SHA-256(M).
    pub fn digest_for(&self, key: &KeyInfo, id: Option<&[u8]>, message: &[u8]) -> Result<[u8; 32]> {
        self.verifier.digest(
            key.algorithm,
            &key.public_point,
            id.unwrap_or(&self.default_id),
            message,
        )
    }

    /// Signs a message: the digest is computed here, only it goes to the HSM.
    pub async fn sign(
        &self,
        key: &str,
        id: Option<&[u8]>,
        message: &[u8],
        encoding: SignatureEncoding,
    ) -> Result<Vec<u8>> {
        let k = self.key(key)?;
        let digest = self.digest_for(&k, id, message)?;
        self.sign_prepared(k, digest, encoding).await
    }

    /// Signs a caller's ready digest (SM2 e, or SHA-256 for ECDSA).
    pub async fn sign_digest(
        &self,
        key: &str,
        digest: &[u8],
        encoding: SignatureEncoding,
    ) -> Result<Vec<u8>> {
        let k = self.key(key)?;
        let digest: [u8; 32] = digest.try_into().map_err(|_| {
            HsmError::InvalidInput(format!("digest must be 32 bytes, got {}", digest.len()))
        })?;
        self.sign_prepared(k, digest, encoding).await
    }

    async fn sign_prepared(
        &self,
        key: Arc<KeyInfo>,
        digest: [u8; 32],
        encoding: SignatureEncoding,
    ) -> Result<Vec<u8>> {
        // One path for one signature and many: a batch of one.
        let raw = self
            .sign_digests(vec![(key, digest)])
            .await
            .pop()
            .unwrap_or(Err(HsmError::Shutdown))?;
        Ok(encode_signature(&raw, encoding))
    }

    /// Signs several ready digests (SM2 e, or SHA-256 for ECDSA), each with
    /// its own key, answering raw r‖s per item in order.
    ///
    /// The items are split into one job per worker, not one per item: a
    /// batch costs a queue slot and a hand-off per worker. An item the token
    /// refuses (a caller-class CK_RV) fails alone; a session- or token-level
    /// failure fails its job, which is retried once on a recovered session
    /// like any signature, so no item ever gets a partial or wrong result.
    pub async fn sign_digests(
        &self,
        items: Vec<(Arc<KeyInfo>, [u8; 32])>,
    ) -> Vec<Result<[u8; 64]>> {
        self.sign_digests_in(Lane::SHARED, items).await
    }

    /// [`Hsm::sign_digests`] for a tenant: its jobs queue in `lane`, and
    /// busy lanes take turns at the workers (svsd: one per entity), so one
    /// tenant's backlog does not stand before another's signature.
    pub async fn sign_digests_in(
        &self,
        lane: Lane,
        items: Vec<(Arc<KeyInfo>, [u8; 32])>,
    ) -> Vec<Result<[u8; 64]>> {
        let n = items.len();
        let signer = match self.digest_signer() {
            Ok(s) => s,
            Err(e) => return (0..n).map(|_| Err(e.clone())).collect(),
        };
        let jobs = self.pool.config().size.clamp(1, n.max(1));
        let per_job = n.div_ceil(jobs).max(1);
        let mut rest = items;
        let mut pending = Vec::with_capacity(jobs);
        while !rest.is_empty() {
            let chunk: Vec<_> = rest.drain(..per_job.min(rest.len())).collect();
            let len = chunk.len();
            let signer = signer.clone();
            // Queued now, all of them, so the workers take them in parallel.
            // Metrics tell one signature's latency from a chunk's.
            let op = if len == 1 { "sign" } else { "sign_batch" };
            let job = self.pool.submit(
                lane,
                op,
                Some(signer.profile.sign_digest_mechanism),
                true,
                move |s: &mut TokenSession| {
                    let mut out = Vec::with_capacity(chunk.len());
                    for (key, digest) in &chunk {
                        match signer.sign(s, key, digest) {
                            Ok(raw) => out.push(Ok(raw)),
                            // The token refused this item: it says nothing
                            // about the session, the others go on.
                            Err(e) if e.rv_class().is_none_or(|c| c == RvClass::CallerError) => {
                                out.push(Err(e))
                            }
                            // The session or token failed: the whole job
                            // goes to recovery and is retried once.
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(out)
                },
            );
            pending.push((len, job));
        }
        let mut results = Vec::with_capacity(n);
        for (len, job) in pending {
            match job.await {
                Ok(out) => {
                    for e in out.iter().filter_map(|r| r.as_ref().err()) {
                        self.pool.count_item_error(e);
                    }
                    results.extend(out)
                }
                // Every item of the failed job gets the same answer.
                Err(e) => results.extend((0..len).map(|_| Err(e.clone()))),
            }
        }
        results
    }

    /// What a worker needs to sign a digest, checked before anything is queued.
    fn digest_signer(&self) -> Result<Arc<DigestSigner>> {
        // Mechanism is not Send (some variants hold raw pointers): it is
        // built on the worker; this only checks it can be.
        keys::mechanism(self.profile.sign_digest_mechanism)?;
        Ok(Arc::new(DigestSigner {
            profile: self.profile.clone(),
            verifier: self.verifier.clone(),
            verify_all: self.verify_after_sign,
        }))
    }

    /// Verifies in software a signature (raw or DER) by a known key.
    pub fn verify(
        &self,
        key: &str,
        id: Option<&[u8]>,
        message: &[u8],
        signature: &[u8],
    ) -> Result<()> {
        let k = self.key(key)?;
        self.verifier.verify_message(
            k.algorithm,
            &k.public_point,
            id.unwrap_or(&self.default_id),
            message,
            signature,
        )
    }

    /// Verifies in software with any public point (no key on the token needed).
    pub fn verify_with_point(
        &self,
        algorithm: Algorithm,
        point: &[u8],
        id: Option<&[u8]>,
        message: &[u8],
        signature: &[u8],
    ) -> Result<()> {
        self.verifier.verify_message(
            algorithm,
            point,
            id.unwrap_or(&self.default_id),
            message,
            signature,
        )
    }

    /// Generates a token key pair named `label` (CKA_ID random unless given).
    pub async fn generate_key(&self, label: &str, id: Option<Vec<u8>>) -> Result<Arc<KeyInfo>> {
        let profile = self.token.profile().clone();
        let label_owned = label.to_owned();
        let mut id = Some(id);
        let key = self
            .pool
            .run(
                "generate",
                Some(profile.keygen_mechanism),
                false,
                move |s: &mut TokenSession| {
                    keys::generate(&s.session, &profile, &label_owned, id.take().flatten())
                },
            )
            .await?;
        self.refresh_keys().await?;
        self.key(&key.name)
    }

    /// Stores a DER certificate: for key `key` (its public key must match),
    /// or as a CA certificate for chains when `key` is `None`.
    pub async fn import_certificate(
        &self,
        key: Option<&str>,
        label: &str,
        der: &[u8],
    ) -> Result<()> {
        let key = key.map(|k| self.key(k)).transpose()?;
        let label = label.to_owned();
        let der = der.to_vec();
        self.pool
            .run(
                "import_certificate",
                None,
                false,
                move |s: &mut TokenSession| {
                    keys::import_certificate(&s.session, &label, key.as_deref(), &der)
                },
            )
            .await?;
        self.refresh_keys().await?;
        Ok(())
    }

    /// The values of the token's data objects labelled `label` (see [`crate::data`]).
    pub async fn read_data(&self, label: &str) -> Result<Vec<Vec<u8>>> {
        let label = label.to_owned();
        self.pool
            .run("read_data", None, true, move |s: &mut TokenSession| {
                crate::data::read(&s.session, &label)
            })
            .await
    }

    /// Makes `value` the only data object labelled `label` (see [`crate::data`]).
    pub async fn replace_data(&self, label: &str, value: Vec<u8>) -> Result<()> {
        let label = label.to_owned();
        self.pool
            .run("replace_data", None, false, move |s: &mut TokenSession| {
                crate::data::replace(&s.session, &label, &value)
            })
            .await
    }
}

/// Signs one digest on a worker's session.
struct DigestSigner {
    profile: Arc<VendorProfile>,
    verifier: Arc<SoftwareVerifier>,
    /// `verify_after_sign`: every signature is checked, not only those of
    /// keys whose public key the token did not state.
    verify_all: bool,
}

impl DigestSigner {
    fn sign(&self, s: &mut TokenSession, key: &KeyInfo, digest: &[u8; 32]) -> Result<[u8; 64]> {
        let (handle, confirmed) = s.private_key(&self.profile, &key.id, &key.public_point)?;
        let mechanism = keys::mechanism(self.profile.sign_digest_mechanism)?;
        let out = s.session.sign(&mechanism, handle, digest)?;
        let raw = normalise_signature(&out, self.profile.signature_encoding)?;
        // Checked on the worker thread so the curve arithmetic stays off
        // the async runtime; a bad signature never leaves.
        if self.verify_all || !confirmed {
            self.verifier
                .verify_digest(key.algorithm, &key.public_point, digest, &raw)
                .map_err(|_| HsmError::FaultySignature("HSM signature does not verify".into()))?;
        }
        Ok(raw)
    }
}

/// A pool needs one session per worker; a token that states a limit must allow them.
fn check_pool_size(size: usize, token_max: Option<u64>) -> Result<()> {
    match token_max {
        Some(max) if size as u64 > max => Err(HsmError::Config(format!(
            "pool size {size} exceeds the token's maximum of {max} sessions"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_size_against_token_limit() {
        assert!(check_pool_size(4, None).is_ok());
        assert!(check_pool_size(4, Some(4)).is_ok());
        let e = check_pool_size(5, Some(4)).unwrap_err();
        assert!(e.to_string().contains("maximum of 4"), "{e}");
    }
}
