//! What an accepted reload changed, for its audit record: the regulation
//! wants a unit's suspension or cut-off reconstructable from the trail.
//! Entities and keys are named, nothing else (no certificate data, no
//! rates): the configuration files say the rest.

use std::collections::BTreeMap;
use std::fmt;

use crate::config::{Config, EntityConfig, EntityStatus};
use crate::policy::Policy;

/// How the `reload` record names the entities file it read: this, a space,
/// and the SHA-256 of the file's bytes in hex.
pub const ENTITIES_SHA256: &str = "entities file sha256";

/// The detail of a `reload` or `start` record: what it says (what
/// changed; the version started), and the digest of the entities file read
/// (if there is one), by which svs-provision knows its edit was read.
pub fn record_detail(what: &dyn std::fmt::Display, entities_sha256: Option<&[u8; 32]>) -> String {
    match entities_sha256 {
        Some(d) => format!("{what}; {ENTITIES_SHA256} {}", svs_hsm::keys::hex(d)),
        None => what.to_string(),
    }
}

/// The entities-file digest a `reload` record's detail names, in hex.
pub fn entities_sha256_of(detail: &str) -> Option<&str> {
    detail
        .split("; ")
        .find_map(|part| part.strip_prefix(ENTITIES_SHA256)?.strip_prefix(' '))
}

/// The differences between the running configuration and an accepted one.
/// Every list is sorted by name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadChanges {
    /// Entities in the new configuration.
    pub entities: usize,
    /// Entities that were not there.
    pub added: Vec<String>,
    /// Entities no longer there (cut off).
    pub removed: Vec<String>,
    /// Entities now suspended that were active (or not there).
    pub suspended: Vec<String>,
    /// Entities active again.
    pub resumed: Vec<String>,
    /// Entities recognised by another certificate, key or name.
    pub client_changed: Vec<String>,
    /// Entities granted other keys or operations.
    pub grants_changed: Vec<String>,
    /// Entities with another rate or concurrency limit.
    pub limits_changed: Vec<String>,
    /// Key names newly exposed.
    pub keys_exposed: Vec<String>,
    /// Key names no longer exposed.
    pub keys_withdrawn: Vec<String>,
    /// Key names moved to another token object.
    pub keys_remapped: Vec<String>,
    /// Key names on the same token object whose key there is another one
    /// (deleted and created again: another CKA_ID or public key).
    pub keys_rekeyed: Vec<String>,
    /// Key names whose certificate chain on the token changed (imported,
    /// renewed or deleted), the key itself the same.
    pub certificates_changed: Vec<String>,
    /// The API's TLS files that hold other certificates than before:
    /// `server certificate`, `client CA` (the trust anchors of the
    /// applications' certificates).
    pub tls_changed: Vec<String>,
    /// Sections whose reloadable settings changed (`[limits]`,
    /// `[anomaly]`).
    pub settings_changed: Vec<String>,
    /// The audit checkpoint key is another key on the token.
    pub checkpoint_key_rekeyed: bool,
    /// Keys that passed the pairwise self-test before the reload was
    /// accepted: every exposed, remapped and re-keyed one.
    pub pairwise_passed: Vec<String>,
    /// The self-tests had failed and ran again after the reload: whether
    /// they passed (svsd ready again) or not.
    pub selftests_rerun: Option<bool>,
}

impl ReloadChanges {
    /// The entity and key-mapping differences between `running` and
    /// `next`; the token-key facts (re-keyed, pairwise) are for the caller
    /// to fill in.
    pub fn between(
        running: &Policy,
        running_keys: &BTreeMap<String, crate::config::KeyExposure>,
        next: &Config,
    ) -> ReloadChanges {
        let was: BTreeMap<&str, &EntityConfig> = running
            .entities()
            .iter()
            .map(|e| (e.name(), &e.config))
            .collect();
        let now: BTreeMap<&str, &EntityConfig> =
            next.entities.iter().map(|e| (e.name.as_str(), e)).collect();
        let mut c = ReloadChanges {
            entities: next.entities.len(),
            ..ReloadChanges::default()
        };
        c.removed = was
            .keys()
            .filter(|n| !now.contains_key(*n))
            .map(|n| (*n).to_owned())
            .collect();
        for (name, new) in &now {
            let old = was.get(name);
            let suspended = new.status == EntityStatus::Suspended;
            let name = (*name).to_owned();
            match old {
                None => {
                    c.added.push(name.clone());
                    if suspended {
                        c.suspended.push(name);
                    }
                }
                Some(old) => {
                    match (old.status, new.status) {
                        (EntityStatus::Active, EntityStatus::Suspended) => {
                            c.suspended.push(name.clone())
                        }
                        (EntityStatus::Suspended, EntityStatus::Active) => {
                            c.resumed.push(name.clone())
                        }
                        _ => {}
                    }
                    if old.client != new.client {
                        c.client_changed.push(name.clone());
                    }
                    if old.keys != new.keys || old.operations != new.operations {
                        c.grants_changed.push(name.clone());
                    }
                    if old.rate != new.rate || old.max_concurrent != new.max_concurrent {
                        c.limits_changed.push(name);
                    }
                }
            }
        }
        for (name, k) in &next.keys {
            match running_keys.get(name) {
                None => c.keys_exposed.push(name.clone()),
                Some(old) if old != k => c.keys_remapped.push(name.clone()),
                Some(_) => {}
            }
        }
        c.keys_withdrawn = running_keys
            .keys()
            .filter(|n| !next.keys.contains_key(*n))
            .cloned()
            .collect();
        c
    }
}

/// `13 entities; suspended: bank-b; keys re-keyed: demo; pairwise test
/// passed: demo`, or `13 entities; no changes`: the `detail` of the
/// `reload` audit record.
impl fmt::Display for ReloadChanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} entities", self.entities)?;
        let lists = [
            ("added", &self.added),
            ("removed", &self.removed),
            ("suspended", &self.suspended),
            ("resumed", &self.resumed),
            ("client changed", &self.client_changed),
            ("grants changed", &self.grants_changed),
            ("limits changed", &self.limits_changed),
            ("keys exposed", &self.keys_exposed),
            ("keys withdrawn", &self.keys_withdrawn),
            ("keys remapped", &self.keys_remapped),
            ("keys re-keyed", &self.keys_rekeyed),
            ("certificates changed", &self.certificates_changed),
            ("tls changed", &self.tls_changed),
            ("settings changed", &self.settings_changed),
        ];
        let mut changed = false;
        for (label, names) in lists {
            if !names.is_empty() {
                write!(f, "; {label}: {}", names.join(", "))?;
                changed = true;
            }
        }
        if self.checkpoint_key_rekeyed {
            f.write_str("; checkpoint key re-keyed")?;
            changed = true;
        }
        if !changed {
            f.write_str("; no changes")?;
        }
        if !self.pairwise_passed.is_empty() {
            write!(
                f,
                "; pairwise test passed: {}",
                self.pairwise_passed.join(", ")
            )?;
        }
        match self.selftests_rerun {
            Some(true) => f.write_str("; failed self-tests run again: passed")?,
            Some(false) => f.write_str("; failed self-tests run again: still failing")?,
            None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::Path;

    use super::*;

    /// A configuration with `keys` under [keys] and `entities` (each
    /// `name status rate fingerprint-byte`) granted `grants`.
    fn config(keys: &str, entities: &[(&str, &str, &str, u8)], grants: &str) -> Config {
        let mut text = format!(
            r#"
[server]
listen = ["127.0.0.1:8443"]
[tls]
certificate = "s.pem"
private_key = "s.key"
client_ca = "ca.pem"
[hsm]
module = "embedded"
token_label = "svs"
pin = {{ file = "/run/pin" }}
[keys]
{keys}
[audit]
dir = "audit"
checkpoint_interval_s = 0
"#
        );
        for (name, status, rate, fp) in entities {
            text.push_str(&format!(
                "[[entity]]\nname = \"{name}\"\nstatus = \"{status}\"\ncertificate_sha256 = \"{}\"\n{grants}\nrate = {{ per_second = {rate}, burst = 10 }}\n",
                format!("{fp:02x}").repeat(32)
            ));
        }
        Config::from_toml(&text, Path::new("/etc/svs/svsd.toml")).unwrap()
    }

    #[test]
    fn the_reload_record_names_each_entity_and_key_change_and_nothing_else() {
        let grants = "keys = [\"demo\"]\noperations = [\"sign\"]";
        let was = config(
            "demo = { object = \"demo\" }\nold = { object = \"old\" }\nmoved = { object = \"a\" }",
            &[
                ("bank-a", "active", "5.0", 1),
                ("bank-b", "active", "5.0", 2),
                ("hotel-c", "suspended", "5.0", 3),
                ("carrier-d", "active", "5.0", 4),
                ("gone-e", "suspended", "5.0", 5),
                ("same-f", "active", "5.0", 6),
            ],
            grants,
        );
        let running = Policy::new(&was.entities, None);
        let mut next = config(
            "demo = { object = \"demo\" }\nnew = { object = \"new\" }\nmoved = { object = \"b\" }",
            &[
                ("bank-a", "active", "9.0", 1),
                ("bank-b", "suspended", "5.0", 2),
                ("hotel-c", "active", "5.0", 3),
                ("carrier-d", "active", "5.0", 44),
                ("same-f", "active", "5.0", 6),
                ("fresh-g", "suspended", "5.0", 7),
            ],
            grants,
        );
        next.entities[4]
            .operations
            .insert(crate::config::Operation::Verify);
        let mut c = ReloadChanges::between(&running, &was.keys, &next);
        assert_eq!(c.entities, 6);
        c.keys_rekeyed.push("demo".into());
        c.pairwise_passed = vec!["moved".into(), "new".into(), "demo".into()];
        assert_eq!(
            c.to_string(),
            "6 entities; added: fresh-g; removed: gone-e; suspended: bank-b, fresh-g; \
             resumed: hotel-c; client changed: carrier-d; grants changed: same-f; \
             limits changed: bank-a; keys exposed: new; keys withdrawn: old; \
             keys remapped: moved; keys re-keyed: demo; \
             pairwise test passed: moved, new, demo"
        );
        // The record carries names only: no fingerprint, no rate.
        assert!(!c.to_string().contains("0101"));
        assert!(!c.to_string().contains("9.0"));

        let same = ReloadChanges::between(&running, &was.keys, &was);
        assert_eq!(same.to_string(), "6 entities; no changes");
    }
}
