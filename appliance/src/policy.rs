//! Application entities at run time: who a client certificate belongs to,
//! what it may do, and its rate and concurrency limits.
//!
//! A [`Policy`] is immutable and swapped whole on reload; the limiter state
//! (token buckets, in-flight counts) lives in [`EntityLimiter`]s that a new
//! policy takes over from the old one by entity name, so a reload neither
//! refills buckets nor forgets requests in flight.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use der::{Decode, Encode};
use sha2::{Digest, Sha256};

use crate::anomaly::Traffic;
use crate::config::{ClientMatch, EntityConfig, EntityStatus, Operation, RateLimit};
use crate::dn::DistinguishedName;
use crate::error::SvsError;

/// What the server knows of a verified client certificate; computed once per
/// connection, matched against the current policy on every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// SHA-256 of the DER certificate.
    pub certificate_sha256: [u8; 32],
    /// SHA-256 of its DER SubjectPublicKeyInfo.
    pub spki_sha256: [u8; 32],
    /// Subject DN.
    pub subject: DistinguishedName,
    /// Issuer DN.
    pub issuer: DistinguishedName,
    /// End of the certificate's validity: checked on every request, as a
    /// connection may outlive its certificate.
    pub not_after: std::time::SystemTime,
}

impl ClientIdentity {
    /// Reads the identity out of a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<ClientIdentity, SvsError> {
        let cert = x509_cert::Certificate::from_der(der)
            .map_err(|e| SvsError::InvalidCertificate(e.to_string()))?;
        let tbs = cert.tbs_certificate();
        let spki = tbs
            .subject_public_key_info()
            .to_der()
            .map_err(|e| SvsError::InvalidCertificate(e.to_string()))?;
        Ok(ClientIdentity {
            certificate_sha256: Sha256::digest(der).into(),
            spki_sha256: Sha256::digest(&spki).into(),
            subject: DistinguishedName::from_name(tbs.subject()),
            issuer: DistinguishedName::from_name(tbs.issuer()),
            not_after: tbs.validity().not_after.to_system_time(),
        })
    }

    /// Refuses a certificate past its notAfter (TLS checked it only at the
    /// handshake).
    pub fn check_valid_at(&self, now: std::time::SystemTime) -> Result<(), SvsError> {
        if now > self.not_after {
            Err(SvsError::ClientCertificateRefused(
                crate::error::CERTIFICATE_EXPIRED,
            ))
        } else {
            Ok(())
        }
    }
}

/// A connection's client as one request presents it: the certificate's
/// identity, and what the current client CA bundle proves of its issuer.
#[derive(Debug, Clone, Copy)]
pub struct VerifiedClient<'a> {
    /// The leaf certificate's identity.
    pub identity: &'a ClientIdentity,
    /// The leaf alone, with no intermediate, verifies against the client CA
    /// bundle: its signature is by a bundle certificate whose subject DN is
    /// the leaf's issuer DN (webpki matches an anchor by that name, byte for
    /// byte, then checks the signature with its key). Only then is
    /// `identity.issuer` the name of a CA in the bundle rather than one the
    /// client made up (a sub-CA of any CA the bundle trusts may take any
    /// name), so subject matching requires it.
    pub issued_directly: bool,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Rate and concurrency state of one entity, kept across reloads.
#[derive(Debug)]
pub struct EntityLimiter {
    bucket: Mutex<Bucket>,
    in_flight: AtomicUsize,
    /// Bytes of request bodies its requests hold (read so far).
    body_bytes: AtomicUsize,
    /// Its connections (counted by [`ConnectionSlot`]s).
    connections: Arc<AtomicUsize>,
    traffic: Traffic,
    /// Its HSM queue lane, so that entities take turns at the HSM.
    lane: svs_hsm::Lane,
}

/// The next entity's HSM lane; 0 is svs-hsm's shared lane.
static NEXT_LANE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl EntityLimiter {
    fn new(rate: Option<RateLimit>) -> EntityLimiter {
        EntityLimiter {
            lane: svs_hsm::Lane(NEXT_LANE.fetch_add(1, Ordering::Relaxed)),
            bucket: Mutex::new(Bucket {
                tokens: rate.map_or(0.0, |r| f64::from(r.burst)),
                last: Instant::now(),
            }),
            in_flight: AtomicUsize::new(0),
            body_bytes: AtomicUsize::new(0),
            connections: Arc::new(AtomicUsize::new(0)),
            traffic: Traffic::default(),
        }
    }

    fn refill(&self, rate: RateLimit, now: Instant) -> std::sync::MutexGuard<'_, Bucket> {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate.per_second).min(f64::from(rate.burst));
        b.last = now;
        b
    }

    /// Takes `n` tokens, one per item. A batch larger than the burst passes
    /// only on a full bucket and leaves it in debt (negative), so batching
    /// cannot beat the configured rate; Retry-After includes the debt.
    fn take(&self, rate: RateLimit, n: usize, now: Instant) -> Result<(), SvsError> {
        let mut b = self.refill(rate, now);
        let need = (n as f64).min(f64::from(rate.burst));
        if b.tokens >= need {
            b.tokens -= n as f64;
            Ok(())
        } else {
            Err(rate_limited(rate, need - b.tokens))
        }
    }

    /// Refuses when not even one token is there (nor the bucket full, for a
    /// zero burst), without taking any: the check made before a body is read.
    fn peek(&self, rate: RateLimit, now: Instant) -> Result<(), SvsError> {
        let b = self.refill(rate, now);
        let need = 1f64.min(f64::from(rate.burst));
        if b.tokens >= need {
            Ok(())
        } else {
            Err(rate_limited(rate, need - b.tokens))
        }
    }
}

fn rate_limited(rate: RateLimit, missing: f64) -> SvsError {
    let wait = if rate.per_second > 0.0 {
        missing / rate.per_second
    } else {
        f64::from(u32::MAX)
    };
    SvsError::RateLimited {
        retry_after: Duration::try_from_secs_f64(wait)
            .unwrap_or(Duration::from_secs(u64::from(u32::MAX))),
    }
}

/// Adds `n` to `held` unless the sum would pass `cap`; true when added.
/// One compare-and-swap loop: no lock on the request path.
pub fn take_up_to(held: &AtomicUsize, n: usize, cap: usize) -> bool {
    held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
        h.checked_add(n).filter(|&t| t <= cap)
    })
    .is_ok()
}

/// One connection counted against a cap (an entity's, or that of the
/// clients no entity claims); given back on drop.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    /// A slot of `held`, unless it already counts `cap`.
    pub fn take(held: &Arc<AtomicUsize>, cap: usize) -> Option<ConnectionSlot> {
        take_up_to(held, 1, cap).then(|| ConnectionSlot(held.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Holds one of an entity's concurrency slots; released on drop.
#[derive(Debug)]
pub struct InFlight(Arc<EntityLimiter>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One entity as the request path sees it.
#[derive(Debug)]
pub struct Entity {
    /// Its configuration.
    pub config: EntityConfig,
    limiter: Arc<EntityLimiter>,
}

impl Entity {
    /// The entity's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Its lane in the HSM pool's queue (kept across reloads, like its limits).
    pub fn lane(&self) -> svs_hsm::Lane {
        self.limiter.lane
    }

    /// Refuses a suspended entity.
    pub fn check_active(&self) -> Result<(), SvsError> {
        match self.config.status {
            EntityStatus::Active => Ok(()),
            EntityStatus::Suspended => Err(SvsError::EntitySuspended(self.config.name.clone())),
        }
    }

    /// Admits a request before its body is read: a concurrency slot, held
    /// until the returned guard drops, and at least one token in the bucket
    /// (none is taken yet: the item count is not known). An entity without
    /// `max_concurrent` has `default_max` slots: each request in flight
    /// holds a stream and, once its body arrives, memory, so no entity may
    /// have an unbounded number of them.
    pub fn reserve(&self, default_max: usize) -> Result<InFlight, SvsError> {
        self.reserve_at(Instant::now(), default_max)
    }

    fn reserve_at(&self, now: Instant, default_max: usize) -> Result<InFlight, SvsError> {
        let prev = self.limiter.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(self.limiter.clone());
        if prev >= self.config.max_concurrent.unwrap_or(default_max) {
            return Err(SvsError::TooManyConcurrent);
        }
        if let Some(rate) = self.config.rate {
            self.limiter.peek(rate, now)?;
        }
        Ok(guard)
    }

    /// Charges a parsed request of `items` operations to the token bucket.
    pub fn charge(&self, items: usize) -> Result<(), SvsError> {
        self.charge_at(items, Instant::now())
    }

    fn charge_at(&self, items: usize, now: Instant) -> Result<(), SvsError> {
        match self.config.rate {
            Some(rate) => self.limiter.take(rate, items, now),
            None => Ok(()),
        }
    }

    /// Counts `n` more bytes of body held by this entity's requests, unless
    /// that would pass `cap`; true when counted.
    pub fn take_body_bytes(&self, n: usize, cap: usize) -> bool {
        take_up_to(&self.limiter.body_bytes, n, cap)
    }

    /// Gives back `n` bytes counted by [`Entity::take_body_bytes`].
    pub fn release_body_bytes(&self, n: usize) {
        self.limiter.body_bytes.fetch_sub(n, Ordering::AcqRel);
    }

    /// Its connection count, for [`ConnectionSlot::take`] (kept across
    /// reloads with the rest of its limiter state).
    pub fn connections(&self) -> &Arc<AtomicUsize> {
        &self.limiter.connections
    }

    /// Gives back what [`Entity::charge`] took for `items`, for a request
    /// refused after it was charged (by the anomaly throttle): a refusal
    /// costs no token. Only refusals come here, so the common path keeps
    /// its one lock.
    pub fn refund(&self, items: usize) {
        self.refund_at(items, Instant::now());
    }

    fn refund_at(&self, items: usize, now: Instant) {
        if let Some(rate) = self.config.rate {
            let mut b = self.limiter.refill(rate, now);
            b.tokens = (b.tokens + items as f64).min(f64::from(rate.burst));
        }
    }

    /// Test helper: reserve and charge in one go.
    #[cfg(test)]
    fn admit_at(&self, items: usize, now: Instant) -> Result<InFlight, SvsError> {
        let g = self.reserve_at(now, usize::MAX)?;
        self.charge_at(items, now)?;
        Ok(g)
    }

    /// May this entity perform `op` at all?
    pub fn check_operation(&self, op: Operation) -> Result<(), SvsError> {
        if self.config.operations.contains(&op) {
            Ok(())
        } else {
            Err(SvsError::OperationNotAllowed(op.as_str()))
        }
    }

    /// May this entity use exposed key `key` (which must exist) for `op`?
    pub fn check_key(&self, key: &str, op: Operation) -> Result<(), SvsError> {
        self.check_operation(op)?;
        if self.config.keys.contains(key) {
            Ok(())
        } else {
            Err(SvsError::KeyNotAllowed(key.to_owned()))
        }
    }

    /// The keys it may use.
    pub fn keys(&self) -> &BTreeSet<String> {
        &self.config.keys
    }

    /// Its traffic record for anomaly detection (kept across reloads).
    pub fn traffic(&self) -> &Traffic {
        &self.limiter.traffic
    }
}

/// All entities, indexed by the ways a certificate can match.
#[derive(Debug, Default)]
pub struct Policy {
    entities: Vec<Arc<Entity>>,
    by_certificate: HashMap<[u8; 32], usize>,
    by_spki: HashMap<[u8; 32], usize>,
    /// By subject, then issuer: looked up without copying the names.
    by_subject: HashMap<DistinguishedName, HashMap<DistinguishedName, usize>>,
}

impl Policy {
    /// Builds a policy, taking over the limiter state of same-named
    /// entities from `previous`.
    pub fn new(entities: &[EntityConfig], previous: Option<&Policy>) -> Policy {
        let mut p = Policy::default();
        let old: HashMap<&str, &Arc<EntityLimiter>> = previous
            .map(|old| {
                old.entities
                    .iter()
                    .map(|e| (e.config.name.as_str(), &e.limiter))
                    .collect()
            })
            .unwrap_or_default();
        for (i, config) in entities.iter().enumerate() {
            let limiter = old
                .get(config.name.as_str())
                .map(|l| Arc::clone(l))
                .unwrap_or_else(|| Arc::new(EntityLimiter::new(config.rate)));
            match &config.client {
                ClientMatch::CertificateSha256(fp) => {
                    p.by_certificate.insert(*fp, i);
                }
                ClientMatch::SpkiSha256(fp) => {
                    p.by_spki.insert(*fp, i);
                }
                ClientMatch::Subject { subject, issuer } => {
                    p.by_subject
                        .entry(subject.clone())
                        .or_default()
                        .insert(issuer.clone(), i);
                }
            }
            p.entities.push(Arc::new(Entity {
                config: config.clone(),
                limiter,
            }));
        }
        p
    }

    /// The entity a client certificate belongs to. The most specific match
    /// wins: whole certificate, then public key, then subject within CA; the
    /// last only for a certificate issued directly by a client CA
    /// certificate (see [`VerifiedClient::issued_directly`]).
    pub fn identify(&self, client: VerifiedClient<'_>) -> Result<Arc<Entity>, SvsError> {
        let id = client.identity;
        self.by_certificate
            .get(&id.certificate_sha256)
            .or_else(|| self.by_spki.get(&id.spki_sha256))
            .or_else(|| {
                if !client.issued_directly {
                    return None;
                }
                self.by_subject.get(&id.subject)?.get(&id.issuer)
            })
            .map(|&i| self.entities[i].clone())
            .ok_or(SvsError::Unauthenticated)
    }

    /// Every entity, in configuration order.
    pub fn entities(&self) -> &[Arc<Entity>] {
        &self.entities
    }

    /// Number of entities.
    pub fn len(&self) -> usize {
        self.entities.len()
    }

    /// True when no entity is configured.
    pub fn is_empty(&self) -> bool {
        self.entities.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entity(name: &str, client: ClientMatch) -> EntityConfig {
        EntityConfig {
            name: name.into(),
            status: EntityStatus::Active,
            client,
            keys: ["k1".to_string()].into(),
            operations: [Operation::Sign].into(),
            rate: Some(RateLimit {
                per_second: 10.0,
                burst: 5,
            }),
            max_concurrent: Some(2),
        }
    }

    fn id(cert: u8, spki: u8, subject: &str) -> ClientIdentity {
        ClientIdentity {
            certificate_sha256: [cert; 32],
            spki_sha256: [spki; 32],
            subject: if subject.is_empty() {
                // A certificate may have an empty subject; no entity's is.
                DistinguishedName::from_name(&Default::default())
            } else {
                subject.parse().unwrap()
            },
            issuer: "CN=CA".parse().unwrap(),
            not_after: std::time::SystemTime::now() + Duration::from_secs(3600),
        }
    }

    /// Identifies a client whose certificate the client CA issued directly.
    fn find(p: &Policy, id: &ClientIdentity) -> Result<Arc<Entity>, SvsError> {
        p.identify(VerifiedClient {
            identity: id,
            issued_directly: true,
        })
    }

    #[test]
    fn identifies_by_certificate_spki_or_subject() {
        let p = Policy::new(
            &[
                entity("a", ClientMatch::CertificateSha256([1; 32])),
                entity("b", ClientMatch::SpkiSha256([2; 32])),
                entity(
                    "c",
                    ClientMatch::Subject {
                        subject: "CN=c".parse().unwrap(),
                        issuer: "CN=CA".parse().unwrap(),
                    },
                ),
            ],
            None,
        );
        assert_eq!(find(&p, &id(1, 9, "CN=x")).unwrap().name(), "a");
        assert_eq!(find(&p, &id(9, 2, "CN=x")).unwrap().name(), "b");
        assert_eq!(find(&p, &id(9, 9, "CN=c")).unwrap().name(), "c");
        assert_eq!(
            find(&p, &id(9, 9, "CN=d")).unwrap_err(),
            SvsError::Unauthenticated
        );
        let mut other_ca = id(9, 9, "CN=c");
        other_ca.issuer = "CN=Other".parse().unwrap();
        assert!(find(&p, &other_ca).is_err());
    }

    #[test]
    fn a_subject_matches_only_a_certificate_issued_directly_by_the_client_ca() {
        let p = Policy::new(
            &[
                entity("a", ClientMatch::CertificateSha256([1; 32])),
                entity(
                    "c",
                    ClientMatch::Subject {
                        subject: "CN=c".parse().unwrap(),
                        issuer: "CN=CA".parse().unwrap(),
                    },
                ),
            ],
            None,
        );
        fn through_intermediates(id: &ClientIdentity) -> VerifiedClient<'_> {
            VerifiedClient {
                identity: id,
                issued_directly: false,
            }
        }
        // The issuer's name alone (a sub-CA may carry any) is not enough.
        assert_eq!(
            p.identify(through_intermediates(&id(9, 9, "CN=c")))
                .unwrap_err(),
            SvsError::Unauthenticated
        );
        // Fingerprints prove the certificate itself: they need no such proof.
        assert_eq!(
            p.identify(through_intermediates(&id(1, 9, "CN=c")))
                .unwrap()
                .name(),
            "a"
        );
        assert_eq!(find(&p, &id(9, 9, "CN=c")).unwrap().name(), "c");
    }

    #[test]
    fn authorisation_matrix() {
        let p = Policy::new(
            &[entity("a", ClientMatch::CertificateSha256([1; 32]))],
            None,
        );
        let e = find(&p, &id(1, 0, "")).unwrap();
        assert!(e.check_key("k1", Operation::Sign).is_ok());
        assert_eq!(
            e.check_key("k2", Operation::Sign).unwrap_err(),
            SvsError::KeyNotAllowed("k2".into())
        );
        assert_eq!(
            e.check_key("k1", Operation::Verify).unwrap_err(),
            SvsError::OperationNotAllowed("verify")
        );
        let mut suspended = entity("a", ClientMatch::CertificateSha256([1; 32]));
        suspended.status = EntityStatus::Suspended;
        let p2 = Policy::new(&[suspended], Some(&p));
        assert!(matches!(
            find(&p2, &id(1, 0, "")).unwrap().check_active(),
            Err(SvsError::EntitySuspended(_))
        ));
    }

    #[test]
    fn token_bucket_refills_at_the_configured_rate() {
        let p = Policy::new(
            &[entity("a", ClientMatch::CertificateSha256([1; 32]))],
            None,
        );
        let e = find(&p, &id(1, 0, "")).unwrap();
        let t0 = Instant::now();
        for _ in 0..5 {
            drop(e.admit_at(1, t0).unwrap());
        }
        let Err(SvsError::RateLimited { retry_after }) = e.admit_at(1, t0) else {
            panic!("bucket should be empty")
        };
        assert!(retry_after <= Duration::from_millis(100) && retry_after > Duration::ZERO);
        // 10/s: after 100 ms one token is back.
        drop(e.admit_at(1, t0 + Duration::from_millis(100)).unwrap());
        assert!(e.admit_at(1, t0 + Duration::from_millis(100)).is_err());
        // A batch bigger than the burst passes on a full bucket.
        drop(e.admit_at(50, t0 + Duration::from_secs(10)).unwrap());
    }

    #[test]
    fn a_refund_gives_back_what_the_charge_took_and_no_more() {
        let p = Policy::new(
            &[entity("a", ClientMatch::CertificateSha256([1; 32]))],
            None,
        );
        let e = find(&p, &id(1, 0, "")).unwrap();
        let t0 = Instant::now();
        // 10/s, burst 5: a batch of 50 leaves the bucket 45 in debt; its
        // refund restores the full bucket, not more.
        e.charge_at(50, t0).unwrap();
        e.refund_at(50, t0);
        for _ in 0..5 {
            e.charge_at(1, t0).unwrap();
        }
        assert!(e.charge_at(1, t0).is_err());
        e.refund_at(1000, t0);
        for _ in 0..5 {
            e.charge_at(1, t0).unwrap();
        }
        assert!(e.charge_at(1, t0).is_err());
    }

    #[test]
    fn a_batch_pays_one_token_per_item_and_the_debt_holds_the_rate() {
        let p = Policy::new(
            &[entity("a", ClientMatch::CertificateSha256([1; 32]))],
            None,
        );
        let e = find(&p, &id(1, 0, "")).unwrap();
        let t0 = Instant::now();
        // 10/s, burst 5: a full bucket admits a batch of 50, 45 in debt.
        drop(e.admit_at(50, t0).unwrap());
        // 4 s later the bucket is still 5 short: refused, before the body
        // too, and Retry-After covers the debt.
        let t4 = t0 + Duration::from_secs(4);
        let Err(SvsError::RateLimited { retry_after }) = e.reserve_at(t4, usize::MAX) else {
            panic!("the debt must hold the rate")
        };
        assert!(retry_after >= Duration::from_millis(500), "{retry_after:?}");
        assert!(e.admit_at(1, t4).is_err());
        // After 4.6 s (46 tokens back) one request passes.
        drop(e.admit_at(1, t0 + Duration::from_millis(4600)).unwrap());
        // Over 10 s: 50 + 5 + 1 at most, never 25x the rate.
        let mut passed = 0;
        for ms in (4700..10_000).step_by(10) {
            if e.admit_at(1, t0 + Duration::from_millis(ms)).is_ok() {
                passed += 1;
            }
        }
        assert!(passed <= 55, "{passed}");
    }

    #[test]
    fn reserve_holds_a_concurrency_slot_before_the_body() {
        let mut cfg = entity("a", ClientMatch::CertificateSha256([1; 32]));
        cfg.rate = None;
        let p = Policy::new(&[cfg], None);
        let e = find(&p, &id(1, 0, "")).unwrap();
        let g1 = e.reserve(100).unwrap();
        let g2 = e.reserve(100).unwrap();
        assert_eq!(e.reserve(100).unwrap_err(), SvsError::TooManyConcurrent);
        drop(g1);
        drop((g2, e.reserve(100).unwrap()));
    }

    #[test]
    fn concurrency_cap_counts_guards_and_survives_reload() {
        let mut cfg = entity("a", ClientMatch::CertificateSha256([1; 32]));
        cfg.rate = None;
        let p = Policy::new(std::slice::from_ref(&cfg), None);
        let e = find(&p, &id(1, 0, "")).unwrap();
        let g1 = e.reserve(100).unwrap();
        let g2 = e.reserve(100).unwrap();
        assert_eq!(e.reserve(100).unwrap_err(), SvsError::TooManyConcurrent);
        // The new policy sees the two requests still in flight.
        let p2 = Policy::new(&[cfg], Some(&p));
        let e2 = find(&p2, &id(1, 0, "")).unwrap();
        assert_eq!(e2.reserve(100).unwrap_err(), SvsError::TooManyConcurrent);
        drop(g1);
        let g3 = e2.reserve(100).unwrap();
        drop((g2, g3));
        assert!(e2.reserve(100).is_ok());
    }

    #[test]
    fn an_entity_without_max_concurrent_gets_the_default_cap() {
        let mut cfg = entity("a", ClientMatch::CertificateSha256([1; 32]));
        cfg.rate = None;
        cfg.max_concurrent = None;
        let p = Policy::new(&[cfg], None);
        let e = find(&p, &id(1, 0, "")).unwrap();
        let held: Vec<_> = (0..3).map(|_| e.reserve(3).unwrap()).collect();
        assert_eq!(e.reserve(3).unwrap_err(), SvsError::TooManyConcurrent);
        drop(held);
        // Its own max_concurrent wins over the default, either way.
        let mut cfg = entity("b", ClientMatch::CertificateSha256([2; 32]));
        cfg.rate = None;
        cfg.max_concurrent = Some(5);
        let p = Policy::new(&[cfg], None);
        let e = find(&p, &id(2, 0, "")).unwrap();
        let held: Vec<_> = (0..5).map(|_| e.reserve(1).unwrap()).collect();
        assert_eq!(e.reserve(1).unwrap_err(), SvsError::TooManyConcurrent);
        drop(held);
    }

    #[test]
    fn connection_slots_are_capped_given_back_and_survive_reload() {
        let cfg = entity("a", ClientMatch::CertificateSha256([1; 32]));
        let p = Policy::new(std::slice::from_ref(&cfg), None);
        let e = find(&p, &id(1, 0, "")).unwrap();
        let a = ConnectionSlot::take(e.connections(), 2).unwrap();
        let b = ConnectionSlot::take(e.connections(), 2).unwrap();
        assert!(ConnectionSlot::take(e.connections(), 2).is_none());
        // A failed take leaves the count as it was.
        assert_eq!(e.connections().load(Ordering::Relaxed), 2);
        // After a reload the entity's connections still count.
        let p2 = Policy::new(&[cfg], Some(&p));
        let e2 = find(&p2, &id(1, 0, "")).unwrap();
        assert!(ConnectionSlot::take(e2.connections(), 2).is_none());
        drop(a);
        let c = ConnectionSlot::take(e2.connections(), 2).unwrap();
        drop((b, c));
        assert_eq!(e2.connections().load(Ordering::Relaxed), 0);
        // A group without an entity (unknown clients) works the same.
        let unknown = Arc::new(AtomicUsize::new(0));
        let one = ConnectionSlot::take(&unknown, 1).unwrap();
        assert!(ConnectionSlot::take(&unknown, 1).is_none());
        drop(one);
        assert!(ConnectionSlot::take(&unknown, 1).is_some());
    }

    #[test]
    fn body_bytes_are_counted_against_the_entity_share() {
        let p = Policy::new(
            &[entity("a", ClientMatch::CertificateSha256([1; 32]))],
            None,
        );
        let e = find(&p, &id(1, 0, "")).unwrap();
        assert!(e.take_body_bytes(600, 1000));
        assert!(e.take_body_bytes(400, 1000));
        assert!(!e.take_body_bytes(1, 1000));
        e.release_body_bytes(400);
        assert!(e.take_body_bytes(400, 1000));
        assert!(!e.take_body_bytes(usize::MAX, usize::MAX));
    }
}
