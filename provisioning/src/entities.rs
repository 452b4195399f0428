//! `entity add|list|suspend|resume|remove`: edits the entities file that
//! svsd reads (svsd.toml's `entities_file`), then asks svsd to reload.
//!
//! An edit is: lock, re-read, change, write a temporary file beside it,
//! fsync, check the whole configuration svsd would load with it
//! (`Config::load_with_entities`: svsd.toml and the edited text), rename
//! over the old file, fsync the directory. Any failure before the rename
//! leaves the file as it was. The file as it was need not pass: an edit
//! that repairs it (a key svsd.toml no longer exposes, taken out of an
//! entity's grants) is written.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use svs_appliance::config::{
    ClientMatch, Config, EntityConfig, EntityStatus, entities_from_toml, syntax_error,
};
use svs_appliance::error::SvsError;
use svs_appliance::reload::entities_sha256_of;
use svs_hsm::keys::hex;
use toml_edit::value;

use crate::Report;
use crate::error::{ProvisionError, Result};
use crate::replace::Replacement;

/// How to tell svsd to re-read its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// `systemctl reload svsd` when systemd runs an active svsd; refused
    /// (before any edit) otherwise.
    Auto,
    /// SIGHUP to this process (checked to be svsd).
    Pid(i32),
    /// SIGHUP to the process whose id is in this file.
    PidFile(PathBuf),
    /// `systemctl reload svsd`.
    Systemd,
    /// Do not reload.
    No,
}

/// What `entity add` is given.
#[derive(Debug, Clone)]
pub struct NewEntity {
    /// Entity name.
    pub name: String,
    /// The client certificate (PEM or DER).
    pub cert: PathBuf,
    /// Match the whole certificate (false: only its public key, which
    /// survives re-issuing with the same key).
    pub match_certificate: bool,
    /// Exposed key names.
    pub keys: Vec<String>,
    /// Operations.
    pub ops: Vec<String>,
    /// "R/s" or "R".
    pub rate: Option<String>,
    /// Token-bucket size.
    pub burst: Option<u32>,
    /// Requests in flight.
    pub max_concurrent: Option<usize>,
    /// Start suspended.
    pub suspended: bool,
}

/// svsd's configuration, loaded for its keys and entities file.
pub fn load_config(path: &Path) -> Result<Config> {
    // A path that names nothing is a typo (or the wrong host), not a
    // configuration to fix.
    if std::fs::metadata(path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
        return Err(ProvisionError::NotFound(format!(
            "no such file: {} (--config names svsd's configuration, e.g. /etc/svs/svsd.toml)",
            path.display()
        )));
    }
    Config::load(path).map_err(|e| {
        ProvisionError::Config(format!(
            "{}: {e}\nFix svsd's configuration first (svsd --check-config -c {0} checks it)",
            path.display()
        ))
    })
}

/// svsd's configuration, as an edit of its entities file starts from it.
#[derive(Debug)]
pub struct ForEdit {
    /// With `file_refused`, the inline entities only.
    pub config: Config,
    /// svsd refuses its configuration for what the entities file says
    /// (alone or beside the inline entities), which the edit may repair.
    pub file_refused: bool,
}

/// [`load_config`] for a command that edits the entities file. svsd.toml
/// must pass on its own: no entity edit repairs it. The entities file need
/// not (a key taken out of svsd.toml's `[keys]` that an entity still
/// names): the edit's result is judged, under the lock, before it is
/// written.
pub fn load_for_edit(path: &Path) -> Result<ForEdit> {
    let refused = match load_config(path) {
        Ok(config) => {
            return Ok(ForEdit {
                config,
                file_refused: false,
            });
        }
        Err(e) => e,
    };
    // Judged with an entities file of no entities, svsd.toml shows its own
    // errors only.
    match Config::load_with_entities(path, "") {
        Ok(config) if config.entities_file.as_deref().is_some_and(Path::is_file) => Ok(ForEdit {
            config,
            file_refused: true,
        }),
        _ => Err(refused),
    }
}

fn entities_path(config: &Config) -> Result<PathBuf> {
    config.entities_file.clone().ok_or_else(|| {
        ProvisionError::Config(format!(
            "{} has no entities_file: add `entities_file = \"entities.toml\"` at its top (and create that file) so that entities can be managed with svs-provision",
            config.path.display()
        ))
    })
}

/// Parses "200/s", "200", "0.5/s".
pub fn parse_rate(s: &str) -> Result<f64> {
    let n = s.trim().strip_suffix("/s").unwrap_or(s.trim());
    match n.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(ProvisionError::Usage(format!(
            "rate {s:?}: give operations per second, e.g. --rate 200/s"
        ))),
    }
}

fn status_name(s: EntityStatus) -> &'static str {
    match s {
        EntityStatus::Active => "active",
        EntityStatus::Suspended => "suspended",
    }
}

fn entity_json(e: &EntityConfig, source: &str) -> Value {
    let client = match &e.client {
        svs_appliance::config::ClientMatch::CertificateSha256(h) => {
            json!({"certificate_sha256": hex(h)})
        }
        svs_appliance::config::ClientMatch::SpkiSha256(h) => json!({"spki_sha256": hex(h)}),
        svs_appliance::config::ClientMatch::Subject { subject, issuer } => {
            json!({"subject": subject.to_string(), "issuer": issuer.to_string()})
        }
    };
    json!({
        "name": e.name,
        "status": status_name(e.status),
        "client": client,
        "keys": e.keys,
        "operations": e.operations.iter().map(|o| o.as_str()).collect::<Vec<_>>(),
        "rate": e.rate.map(|r| json!({"per_second": r.per_second, "burst": r.burst})),
        "max_concurrent": e.max_concurrent,
        "source": source,
    })
}

/// The names of the entities in the entities file (the others are inline
/// in svsd.toml, which svs-provision does not edit), whether or not svsd
/// would accept them.
fn entities_file_names(config: &Config) -> BTreeSet<String> {
    config
        .entities_file
        .as_deref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|text| names_in(&text))
        .unwrap_or_default()
}

/// The names entities-file text gives its entities.
fn names_in(text: &str) -> BTreeSet<String> {
    let Ok(doc) = text.parse::<toml_edit::DocumentMut>() else {
        return BTreeSet::new();
    };
    doc.get("entity")
        .and_then(toml_edit::Item::as_array_of_tables)
        .map(|list| {
            list.iter()
                .filter_map(|t| entity_name(t).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether svsd's configuration names entity `name`: one in an entities
/// file svsd refuses is not in `config`, yet is there to edit.
fn exists(config: &Config, name: &str) -> bool {
    config.entities.iter().any(|e| e.name == name) || entities_file_names(config).contains(name)
}

/// `entity list`.
pub fn list(config_path: &Path) -> Result<Report> {
    let config = load_config(config_path)?;
    let file_names = entities_file_names(&config);
    let mut text = String::new();
    let mut items = Vec::new();
    for e in &config.entities {
        let source = if file_names.contains(&e.name) {
            "entities_file"
        } else {
            "svsd.toml"
        };
        text.push_str(&format!(
            "{}  {}  keys [{}]  ops [{}]{}{}{}\n",
            e.name,
            status_name(e.status),
            e.keys.iter().cloned().collect::<Vec<_>>().join(","),
            e.operations
                .iter()
                .map(|o| o.as_str())
                .collect::<Vec<_>>()
                .join(","),
            e.rate
                .map(|r| format!("  rate {}/s burst {}", r.per_second, r.burst))
                .unwrap_or_default(),
            e.max_concurrent
                .map(|m| format!("  max_concurrent {m}"))
                .unwrap_or_default(),
            if source == "svsd.toml" {
                "  (inline in svsd.toml: edit that file to change it)"
            } else {
                ""
            }
        ));
        items.push(entity_json(e, source));
    }
    if items.is_empty() {
        text.push_str("no entities\n");
    }
    Ok(Report {
        text,
        json: json!({"entities": items}),
    })
}

/// Keys named that svsd does not expose.
fn check_keys(config: &Config, keys: &[String]) -> Result<()> {
    match keys.iter().find(|k| !config.keys.contains_key(*k)) {
        None => Ok(()),
        Some(k) => Err(ProvisionError::NotFound(format!(
            "key {k:?} is not exposed by svsd; exposed keys ([keys] in {}): {}",
            config.path.display(),
            config.keys.keys().cloned().collect::<Vec<_>>().join(", ")
        ))),
    }
}

fn check_ops(ops: &[String]) -> Result<()> {
    match ops.iter().find(|op| *op != "sign" && *op != "verify") {
        None => Ok(()),
        Some(op) => Err(ProvisionError::Usage(format!(
            "unknown operation {op:?}; operations are sign and verify"
        ))),
    }
}

/// A client certificate given to entity `name`: what svsd would see of it.
struct Claim {
    name: String,
    cert: PathBuf,
    identity: svs_appliance::policy::ClientIdentity,
    /// No intermediate came with it (see [`VerifiedClient`]).
    ///
    /// [`VerifiedClient`]: svs_appliance::policy::VerifiedClient
    issued_directly: bool,
}

impl Claim {
    /// Refuses the certificate if svsd, serving `entities`, already takes
    /// it for another entity: svsd picks the most specific match, so a
    /// renewal given the wrong file (another tenant's certificate, matched
    /// there by key or subject) silently moved that tenant's requests onto
    /// this entity's keys. svsd's own matching decides, so that every way
    /// of matching (whole certificate, key, subject and issuer) counts.
    fn check_against(&self, entities: &[EntityConfig]) -> Result<()> {
        let others: Vec<_> = entities
            .iter()
            .filter(|e| e.name != self.name)
            .cloned()
            .collect();
        let policy = svs_appliance::policy::Policy::new(&others, None);
        let client = svs_appliance::policy::VerifiedClient {
            identity: &self.identity,
            issued_directly: self.issued_directly,
        };
        match policy.identify(client) {
            Ok(other) => {
                let (other, name) = (other.name(), &self.name);
                Err(ProvisionError::AlreadyExists(format!(
                    "{}: svsd already recognises this certificate as entity {other:?}; giving it to {name:?} would move {other:?}'s requests to {name:?}'s keys. Check the file. Nothing was changed",
                    self.cert.display()
                )))
            }
            Err(_) => Ok(()),
        }
    }
}

/// Refuses `claim` for entity `name`, recognised by subject and issuer,
/// unless that matching already takes it (a certificate renewed by the
/// same CA under the same name): anything else needs the officer to choose
/// how it is to be recognised from now on.
fn recognised_by_subject(config: &Config, name: &str, claim: &Claim) -> Result<()> {
    let this: Vec<_> = config
        .entities
        .iter()
        .filter(|e| e.name == name)
        .cloned()
        .collect();
    let client = svs_appliance::policy::VerifiedClient {
        identity: &claim.identity,
        issued_directly: claim.issued_directly,
    };
    if svs_appliance::policy::Policy::new(&this, None)
        .identify(client)
        .is_ok()
    {
        return Ok(());
    }
    Err(ProvisionError::Usage(format!(
        "entity {name:?} is recognised by subject and issuer, and {} (subject {}, issuer {}) does not meet them{}: pass --match-cert or --match-key to recognise it by certificate or by key from now on, or edit its subject and issuer in the entities file. Nothing was changed",
        claim.cert.display(),
        claim.identity.subject,
        claim.identity.issuer,
        if claim.issued_directly {
            ""
        } else {
            " (or came with intermediates: subject matching takes only a certificate a client CA issued directly)"
        }
    )))
}

/// How svsd is to recognise the client of `cert` (which must pass svsd's
/// handshake check now) for entity `name`: the entity field and its
/// fingerprint, and the claim that [`edit`] checks again under the lock
/// (checked here first, against the entities as read before it).
fn client_match(
    config: &Config,
    name: &str,
    cert: &Path,
    match_certificate: bool,
) -> Result<((&'static str, String), Claim)> {
    let certs = crate::cert::read_certificates(cert)?;
    let chain: Vec<Vec<u8>> = certs.iter().map(|(der, _)| der.clone()).collect();
    svs_appliance::tls::check_client_chain(&config.tls.client_ca, &chain, SystemTime::now())
        .map_err(|e| {
            ProvisionError::Certificate(format!("{}: {e}. Nothing was changed", cert.display()))
        })?;
    let (der, parsed) = certs.into_iter().next().ok_or_else(|| {
        ProvisionError::Certificate(format!("{}: no certificate", cert.display()))
    })?;
    let identity = svs_appliance::policy::ClientIdentity::from_der(&der)
        .map_err(|e| ProvisionError::Certificate(format!("{}: {e}", cert.display())))?;
    let claim = Claim {
        name: name.to_owned(),
        cert: cert.to_path_buf(),
        identity,
        // Subject matching applies only to a leaf a client CA issued
        // directly, told as svsd tells it: by the leaf alone.
        issued_directly: svs_appliance::tls::check_client_chain(
            &config.tls.client_ca,
            &chain[..1],
            SystemTime::now(),
        )
        .is_ok(),
    };
    claim.check_against(&config.entities)?;
    let field = if match_certificate {
        ("certificate_sha256", hex(&Sha256::digest(&der)))
    } else {
        use der::Encode;
        let spki = parsed
            .tbs_certificate()
            .subject_public_key_info()
            .to_der()?;
        ("spki_sha256", hex(&Sha256::digest(spki)))
    };
    Ok((field, claim))
}

/// Writes `entity update`'s change into the entity's table `t`. Values
/// changed keep their place and comments.
fn apply_change(
    t: &mut toml_edit::Table,
    client: Option<(&str, String)>,
    change: &EntityChange,
    rate: Option<toml_edit::InlineTable>,
) {
    if let Some((field, fp)) = client {
        // The field kept is changed where it stands, with its comment.
        for f in CLIENT_FIELDS.iter().filter(|f| **f != field) {
            t.remove(f);
        }
        set_in_place(t, field, fp.as_str().into());
    }
    if let Some(keys) = &change.keys {
        set_in_place(t, "keys", string_array(keys));
    }
    if let Some(ops) = &change.ops {
        set_in_place(t, "operations", string_array(ops));
    }
    match rate {
        // A `[entity.rate]` table keeps its place and comments.
        Some(r) => match t.get_mut("rate").and_then(toml_edit::Item::as_table_mut) {
            Some(table) => {
                table.remove("burst");
                for (k, v) in r.iter() {
                    set_in_place(table, k, v.clone());
                }
            }
            None => set_in_place(t, "rate", r.into()),
        },
        None if change.no_rate => {
            t.remove("rate");
        }
        None => {}
    }
    match change.max_concurrent {
        Some(m) => set_in_place(t, "max_concurrent", (m as i64).into()),
        None if change.no_max_concurrent => {
            t.remove("max_concurrent");
        }
        None => {}
    }
}

/// Sets `key` to `v`; a value already there keeps its comments and layout
/// around it (toml_edit's `t[key] = …` would drop them).
fn set_in_place(t: &mut dyn toml_edit::TableLike, key: &str, mut v: toml_edit::Value) {
    match t.get_mut(key).and_then(toml_edit::Item::as_value_mut) {
        Some(old) => {
            *v.decor_mut() = old.decor().clone();
            *old = v;
        }
        None => {
            t.insert(key, toml_edit::Item::Value(v));
        }
    }
}

/// The `rate` value of `--rate`/`--burst`.
fn rate_value(rate: Option<&str>, burst: Option<u32>) -> Result<Option<toml_edit::InlineTable>> {
    let Some(r) = rate.map(parse_rate).transpose()? else {
        if burst.is_some() {
            return Err(ProvisionError::Usage("--burst needs --rate".into()));
        }
        return Ok(None);
    };
    let mut t = toml_edit::InlineTable::new();
    t.insert("per_second", r.into());
    if let Some(b) = burst {
        t.insert("burst", i64::from(b).into());
    }
    Ok(Some(t))
}

/// `items` as a TOML array, each once, in the order first given.
fn string_array(items: &[String]) -> toml_edit::Value {
    let mut seen = BTreeSet::new();
    items
        .iter()
        .map(String::as_str)
        .filter(|i| seen.insert(*i))
        .collect::<toml_edit::Array>()
        .into()
}

/// `entity add`.
pub fn add(config_path: &Path, new: &NewEntity, reload: &Reload) -> Result<Report> {
    let config = load_for_edit(config_path)?.config;
    let target = reload_target_for(reload, &config)?;
    check_keys(&config, &new.keys)?;
    check_ops(&new.ops)?;
    if exists(&config, &new.name) {
        return Err(ProvisionError::AlreadyExists(format!(
            "an entity named {:?} exists already; choose another name (or change it with `entity update`)",
            new.name
        )));
    }
    let ((field, fp), claim) = client_match(&config, &new.name, &new.cert, new.match_certificate)?;
    let rate = rate_value(new.rate.as_deref(), new.burst)?;
    let mut table = toml_edit::Table::new();
    table["name"] = value(new.name.as_str());
    if new.suspended {
        table["status"] = value("suspended");
    }
    table[field] = value(fp.as_str());
    table["keys"] = value(string_array(&new.keys));
    table["operations"] = value(string_array(&new.ops));
    if let Some(r) = rate {
        table["rate"] = value(r);
    }
    if let Some(m) = new.max_concurrent {
        table["max_concurrent"] = value(m as i64);
    }
    let path = entities_path(&config)?;
    let name = new.name.clone();
    let written = edit(&config, &path, Some(&claim), move |list| {
        if list.iter().any(|t| entity_name(t) == Some(&name)) {
            return Err(ProvisionError::AlreadyExists(format!(
                "an entity named {name:?} exists already"
            )));
        }
        list.push(table);
        Ok(())
    })?;
    let outcome = do_reload(&target, &config, &written)?;
    Ok(Report {
        text: format!(
            "entity {:?} added ({field} {fp}, keys [{}], ops [{}]){}\n{}",
            new.name,
            new.keys.join(","),
            new.ops.join(","),
            if new.suspended { ", suspended" } else { "" },
            outcome.text
        ),
        json: json!({"name": new.name, field: fp, "reload": outcome.json}),
    })
}

/// How `entity update --cert` is to recognise the client from then on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recognise {
    /// As the entity does now: by the whole certificate, by its public key,
    /// or by subject and issuer (which a certificate renewed by the same CA
    /// under the same name already meets). An entity set up to outlive
    /// renewals stays so: before, a renewal pinned it to one certificate
    /// and the next renewal cut it off.
    #[default]
    AsNow,
    /// By the whole certificate (`--match-cert`).
    Certificate,
    /// By its public key (`--match-key`).
    PublicKey,
}

/// What `entity update` changes; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default)]
pub struct EntityChange {
    /// A new client certificate (a renewed one), and how to recognise it.
    pub cert: Option<(PathBuf, Recognise)>,
    /// The keys it may use, all of them.
    pub keys: Option<Vec<String>>,
    /// The operations, all of them.
    pub ops: Option<Vec<String>>,
    /// A new rate limit ("R/s") and burst.
    pub rate: Option<(String, Option<u32>)>,
    /// Drop the rate limit.
    pub no_rate: bool,
    /// A new concurrency cap.
    pub max_concurrent: Option<usize>,
    /// Drop the concurrency cap (back to svsd's default).
    pub no_max_concurrent: bool,
}

/// Fields that recognise an entity's client: a new certificate replaces
/// whichever of them the entity used.
const CLIENT_FIELDS: [&str; 4] = ["certificate_sha256", "spki_sha256", "subject", "issuer"];

/// `entity update`: changes an entity's grants, limits or client
/// certificate in place. Renewing an application's certificate or granting
/// it a newly exposed key by `remove` + `add` cut the application off in
/// between and made the officer type its settings again; its status
/// (suspended or not) and every setting not named stay as they are.
pub fn update(
    config_path: &Path,
    name: &str,
    change: &EntityChange,
    reload: &Reload,
) -> Result<Report> {
    let config = load_for_edit(config_path)?.config;
    if !exists(&config, name) {
        return Err(not_found(name, &config));
    }
    if let Some(keys) = &change.keys {
        check_keys(&config, keys)?;
    }
    if let Some(ops) = &change.ops {
        check_ops(ops)?;
    }
    let rate = match &change.rate {
        Some((r, burst)) => rate_value(Some(r), *burst)?,
        None => None,
    };
    let mut said = Vec::new();
    let (client, claim) = match &change.cert {
        Some((cert, how)) => {
            let current = config
                .entities
                .iter()
                .find(|e| e.name == name)
                .map(|e| &e.client);
            let whole = match (how, current) {
                (Recognise::Certificate, _) => Some(true),
                (Recognise::PublicKey, _) => Some(false),
                (Recognise::AsNow, Some(ClientMatch::SpkiSha256(_))) => Some(false),
                (Recognise::AsNow, Some(ClientMatch::Subject { .. })) => None,
                (Recognise::AsNow, Some(ClientMatch::CertificateSha256(_))) => Some(true),
                // svsd refuses the entities file, so how the entity is
                // recognised now is not known: guessing could pin an
                // entity meant to outlive renewals.
                (Recognise::AsNow, None) => {
                    return Err(ProvisionError::Usage(format!(
                        "svsd refuses the entities file as it is, so how entity {name:?} is recognised now cannot be read: pass --match-cert or --match-key with --cert. Nothing was changed"
                    )));
                }
            };
            let (client, claim) = client_match(&config, name, cert, whole.unwrap_or(true))?;
            match whole {
                Some(_) => (Some(client), Some(claim)),
                None => {
                    recognised_by_subject(&config, name, &claim)?;
                    said.push("a certificate it already recognises by subject and issuer".into());
                    // Still claimed: checked again under the lock with
                    // whatever else this command writes.
                    (None, Some(claim))
                }
            }
        }
        None => (None, None),
    };
    if let Some((field, fp)) = &client {
        said.push(format!("{field} {fp}"));
    }
    if let Some(keys) = &change.keys {
        said.push(format!("keys [{}]", keys.join(",")));
    }
    if let Some(ops) = &change.ops {
        said.push(format!("ops [{}]", ops.join(",")));
    }
    if let Some((r, _)) = &change.rate {
        said.push(format!("rate {r}"));
    } else if change.no_rate {
        said.push("no rate limit".into());
    }
    if let Some(m) = change.max_concurrent {
        said.push(format!("max_concurrent {m}"));
    } else if change.no_max_concurrent {
        said.push("svsd's default max_concurrent".into());
    }
    if said.is_empty() {
        return Err(ProvisionError::Usage(
            "nothing to change: give --cert, --keys, --ops, --rate/--no-rate or --max-concurrent/--no-max-concurrent".into(),
        ));
    }
    // Only a certificate its subject matching already takes: nothing to
    // write, wherever the entity is defined.
    if client.is_none() && said.len() == 1 && change.cert.is_some() {
        return Ok(Report {
            text: format!(
                "entity {name:?} already has {}; nothing was changed\n",
                said[0]
            ),
            json: json!({"name": name, "updated": [], "changed": false, "reload": null}),
        });
    }
    let path = entities_path(&config)?;
    let target = reload_target_for(reload, &config)?;
    let owned = name.to_owned();
    let change = change.clone();
    let written = edit(&config, &path, claim.as_ref(), move |list| {
        apply_change(find_entity(list, &owned)?, client, &change, rate);
        Ok(())
    })?;
    if written.is_none() {
        return Ok(Report {
            text: format!(
                "entity {name:?} already has {}; nothing was changed\n",
                said.join(", ")
            ),
            json: json!({"name": name, "updated": [], "changed": false, "reload": null}),
        });
    }
    let outcome = do_reload(&target, &config, &written)?;
    Ok(Report {
        text: format!(
            "entity {name:?} updated: {}\n{}",
            said.join(", "),
            outcome.text
        ),
        json: json!({"name": name, "updated": said, "changed": true, "reload": outcome.json}),
    })
}

/// `entity suspend` / `entity resume`.
pub fn set_status(
    config_path: &Path,
    name: &str,
    suspended: bool,
    reload: &Reload,
) -> Result<Report> {
    let ForEdit {
        config,
        file_refused,
    } = load_for_edit(config_path)?;
    let (want, state) = if suspended {
        (EntityStatus::Suspended, "suspended")
    } else {
        (EntityStatus::Active, "active")
    };
    // Before svsd is looked for: what is already so needs no write, no
    // reload and no svsd at all. Not while svsd refuses the entities file:
    // it serves none of what the files say then.
    if !file_refused
        && config
            .entities
            .iter()
            .any(|e| e.name == name && e.status == want)
    {
        return Ok(Report {
            text: format!("entity {name:?} is already {state}; nothing was changed\n"),
            json: json!({"name": name, "status": state, "changed": false, "reload": null}),
        });
    }
    let path = entities_path(&config)?;
    let target = reload_target_for(reload, &config)?;
    let owned = name.to_owned();
    let written = edit(&config, &path, None, move |list| {
        let t = find_entity(list, &owned)?;
        if suspended {
            t["status"] = value("suspended");
        } else {
            t.remove("status");
        }
        Ok(())
    })?;
    let outcome = do_reload(&target, &config, &written)?;
    Ok(Report {
        text: format!("entity {name:?} is now {state}\n{}", outcome.text),
        json: json!({"name": name, "status": state, "changed": true, "reload": outcome.json}),
    })
}

/// `entity suspend --all`: every entity of the entities file suspended in
/// one edit and one reload. One by one, each a reload, the last entity
/// was still signing seconds after the first was cut off.
pub fn suspend_all(config_path: &Path, reload: &Reload) -> Result<Report> {
    let ForEdit {
        config,
        file_refused,
    } = load_for_edit(config_path)?;
    let path = entities_path(&config)?;
    let file_names = entities_file_names(&config);
    // Inline entities svs-provision cannot suspend: only the active ones
    // are news to the officer.
    let inline: Vec<&str> = config
        .entities
        .iter()
        .filter(|e| !file_names.contains(&e.name) && e.status == EntityStatus::Active)
        .map(|e| e.name.as_str())
        .collect();
    // What was so before the lock spares the write, the reload and the
    // search for svsd; which entities to suspend is decided under the lock.
    let any_active = config
        .entities
        .iter()
        .any(|e| file_names.contains(&e.name) && e.status == EntityStatus::Active);
    let inline_note = if inline.is_empty() {
        String::new()
    } else {
        format!(
            "still active: entities written inline in {}, which only that file can suspend ({})\n",
            config.path.display(),
            inline.join(", ")
        )
    };
    // A file svsd refuses has its entities missing from `config`: the edit
    // decides.
    if !any_active && !file_refused {
        let already = if file_names.is_empty() {
            "the entities file has no entities"
        } else {
            "every entity in the entities file is already suspended"
        };
        return Ok(Report {
            text: format!("{already}; nothing was changed\n{inline_note}"),
            json: json!({"suspended": [], "changed": false, "inline": inline, "reload": null}),
        });
    }
    let target = reload_target_for(reload, &config)?;
    // Chosen again under the lock, from the file as it is then: an entity
    // another officer added or resumed while this run waited for the lock
    // would otherwise stay active (still signing, in the emergency this
    // command is for) while the command said everything was suspended.
    let mut suspended = Vec::new();
    let written = edit(&config, &path, None, |list| {
        for t in list.iter_mut() {
            let Some(name) = entity_name(t).map(str::to_owned) else {
                continue;
            };
            if t.get("status").and_then(toml_edit::Item::as_str) != Some("suspended") {
                set_in_place(t, "status", "suspended".into());
                suspended.push(name);
            }
        }
        Ok(())
    })?;
    if written.is_none() {
        return Ok(Report {
            text: format!(
                "every entity in the entities file is already suspended; nothing was changed\n{inline_note}"
            ),
            json: json!({"suspended": [], "changed": false, "inline": inline, "reload": null}),
        });
    }
    let outcome = do_reload(&target, &config, &written)?;
    Ok(Report {
        text: format!(
            "suspended: {}\n{inline_note}{}",
            suspended.join(", "),
            outcome.text
        ),
        json: json!({"suspended": suspended, "changed": true, "inline": inline, "reload": outcome.json}),
    })
}

/// `entity remove`.
pub fn remove(config_path: &Path, name: &str, yes: bool, reload: &Reload) -> Result<Report> {
    let config = load_for_edit(config_path)?.config;
    let path = entities_path(&config)?;
    // Fail on an unknown name before asking anything.
    if !exists(&config, name) {
        return Err(not_found(name, &config));
    }
    let target = reload_target_for(reload, &config)?;
    if !yes {
        crate::pin::confirm(
            &format!(
                "Removing entity {name:?}: its client will be refused from the next reload on."
            ),
            name,
        )?;
    }
    let owned = name.to_owned();
    let written = edit(&config, &path, None, move |list| {
        find_entity(list, &owned)?;
        list.retain(|t| entity_name(t) != Some(owned.as_str()));
        Ok(())
    })?;
    let outcome = do_reload(&target, &config, &written)?;
    Ok(Report {
        text: format!("entity {name:?} removed\n{}", outcome.text),
        json: json!({"name": name, "removed": true, "reload": outcome.json}),
    })
}

fn not_found(name: &str, config: &Config) -> ProvisionError {
    let mut names: Vec<String> = config.entities.iter().map(|e| e.name.clone()).collect();
    for n in entities_file_names(config) {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    ProvisionError::NotFound(format!(
        "no entity named {name:?}; entities: {}",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    ))
}

fn entity_name(t: &toml_edit::Table) -> Option<&str> {
    t.get("name").and_then(|n| n.as_str())
}

fn find_entity<'a>(
    list: &'a mut toml_edit::ArrayOfTables,
    name: &str,
) -> Result<&'a mut toml_edit::Table> {
    let names: Vec<String> = list
        .iter()
        .filter_map(|t| entity_name(t).map(str::to_owned))
        .collect();
    list.iter_mut()
        .find(|t| entity_name(t) == Some(name))
        .ok_or_else(|| {
            ProvisionError::NotFound(format!(
                "no entity named {name:?} in the entities file (entities there: {}); entities written inline in svsd.toml are edited in that file",
                if names.is_empty() { "none".into() } else { names.join(", ") }
            ))
        })
}

/// Put at the top of an entities file that has no comment of its own there.
const HEADER: &str = "# Application entities, read by svsd (entities_file in svsd.toml).\n\
# Managed with `svs-provision entity ...`, which rewrites this file atomically\n\
# and asks svsd to reload; comments and layout are kept.\n\n";

/// The entities file's text `text` (read from `path`) after `change`.
fn edited(
    text: &str,
    path: &Path,
    change: impl FnOnce(&mut toml_edit::ArrayOfTables) -> Result<()>,
) -> Result<String> {
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| {
        ProvisionError::Config(format!(
            "{}; the file is not valid TOML: fix it by hand first",
            syntax_error(path, text, e.span(), e.message())
        ))
    })?;
    // A file of comments only (as packaged) holds them as the document's
    // trailing text, which toml_edit writes after the tables: kept there,
    // the file's header would end up below the first entity added.
    let mut header = None;
    if doc.get("entity").is_none() {
        if doc.as_table().is_empty() {
            header = doc.trailing().as_str().map(str::to_owned);
            doc.set_trailing("");
        }
        doc.insert(
            "entity",
            toml_edit::Item::ArrayOfTables(toml_edit::ArrayOfTables::new()),
        );
    }
    let list = doc
        .get_mut("entity")
        .and_then(toml_edit::Item::as_array_of_tables_mut)
        .ok_or_else(|| {
            ProvisionError::Config(format!(
                "{}: `entity` must be an array of tables ([[entity]])",
                path.display()
            ))
        })?;
    change(list)?;
    if let Some(header) = header.filter(|h| !h.trim().is_empty()) {
        match list.get_mut(0) {
            Some(first) => first.decor_mut().set_prefix(format!("{header}\n")),
            None => doc.set_trailing(header),
        }
    }
    let mut body = doc.to_string();
    if !body.trim_start().starts_with('#') {
        body.insert_str(0, HEADER);
    }
    Ok(body)
}

/// Locks, re-reads, changes and atomically replaces the entities file.
/// Edited as a TOML document (toml_edit), not re-serialised from values:
/// officers annotate entities (owner, ticket, contact) and those comments
/// must survive every `entity` command.
fn edit(
    config: &Config,
    path: &Path,
    claim: Option<&Claim>,
    change: impl FnOnce(&mut toml_edit::ArrayOfTables) -> Result<()>,
) -> Result<Option<Written>> {
    let io = |what: &str, e: std::io::Error| {
        ProvisionError::Io(format!(
            "{what} {}: {e}; the file was not changed",
            path.display()
        ))
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // A lock file beside it, not the file itself: the file is replaced by
    // rename, so a lock on it would not exclude the next editor.
    let lock_path = dir.join(format!(
        ".{}.lock",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("entities")
    ));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| io("cannot lock", e))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io("cannot lock", e.into()))?;

    // Re-read under the lock: another editor may have just written.
    let text = std::fs::read_to_string(path).map_err(|e| io("cannot read", e))?;
    // svsd's verdict on the files as they stand: the edit need not start
    // from a configuration svsd accepts, only end in one.
    let earlier = match judged(config, &text)? {
        Ok(_) => Vec::new(),
        Err(errors) => errors,
    };
    let body = edited(&text, path, change)?;
    // Nothing to write, and nothing for svsd to reload. Compared with the
    // file as an edit that changes nothing renders it too: rendering puts
    // the header on a file that has none, and that alone must not write
    // the file and reload svsd.
    if body == text || body == edited(&text, path, |_| Ok(()))? {
        // Unless svsd refuses the file as it stands: then it does not
        // serve what the file says, and "already so" would mislead.
        if earlier.is_empty() {
            return Ok(None);
        }
        return Err(ProvisionError::Config(format!(
            "this changes nothing in the entities file, and svsd refuses its configuration as it stands, so nothing was written:\n  {}\nFix it first (svsd --check-config -c {} checks it)",
            earlier.join("\n  "),
            config.path.display()
        )));
    }

    let tmp = Replacement::write(path, body.as_bytes(), 0o640)
        .map_err(|e| io("cannot write a temporary file beside", e))?;

    // svsd's own checks, on exactly the bytes that will be renamed in, but
    // named as the file they replace: the temporary name means nothing to
    // the officer and is gone by the time the message is read.
    let written = std::fs::read_to_string(tmp.path())
        .map_err(|e| io("cannot read back the temporary file beside", e))?;
    // From a configuration svsd accepted, two entities clashing are this
    // edit's doing, and said so (exit 4) before svsd's whole verdict.
    if earlier.is_empty()
        && let Ok(after) = entities_from_toml(&written, path, &config.keys)
    {
        cross_check(config, &names_in(&text), &after)?;
    }
    match judged(config, &written)? {
        // Checked again under the lock, against the entities svsd would
        // serve: another officer may have given the certificate to an
        // entity meanwhile, matched another way.
        Ok(result) => {
            if let Some(claim) = claim {
                claim.check_against(&result.entities)?;
            }
        }
        Err(errors) => return Err(refused(config, &errors, &earlier)),
    }

    tmp.commit().map_err(|e| io("cannot replace", e))?;
    Ok(Some(Written {
        path: path.to_path_buf(),
        sha256: sha256_hex(written.as_bytes()),
    }))
}

/// An edit of the entities file, as written.
#[derive(Debug)]
struct Written {
    path: PathBuf,
    /// SHA-256 of the bytes written, in hex (as svsd's `reload` record
    /// names the file it read).
    sha256: String,
}

impl Written {
    /// Whether a reload that read the entities file as `read` (its digest,
    /// from the `reload` record) includes this edit: it read exactly these
    /// bytes, or the file as it is now, if another edit has replaced them
    /// since (editors take turns under the lock, each starting from the
    /// last one's file, so a later file holds this edit too).
    fn is_in(&self, read: &str) -> bool {
        read == self.sha256
            || std::fs::read(&self.path)
                .is_ok_and(|now| read == sha256_hex(&now) && read != self.sha256)
    }
}

/// The refusal of an edit that svsd would refuse for `errors`. Those in
/// `earlier` (the files as they stood) are marked: the edit itself may be
/// right, and they need fixing by hand.
fn refused(config: &Config, errors: &[String], earlier: &[String]) -> ProvisionError {
    let listed: Vec<String> = errors
        .iter()
        .map(|e| {
            if earlier.contains(e) {
                format!("{e} (already so before this edit)")
            } else {
                e.clone()
            }
        })
        .collect();
    let hint = if errors.iter().all(|e| earlier.contains(e)) {
        format!(
            "\nNone of them is this edit's: fix them (svsd --check-config -c {} checks the configuration), then run it again",
            config.path.display()
        )
    } else {
        String::new()
    };
    ProvisionError::Config(format!(
        "the edited entities file would be refused by svsd, so it was not written:\n  {}{hint}",
        listed.join("\n  ")
    ))
}

/// svsd's configuration as svsd would load it with `entities` as its
/// entities file's text, or every error for which it would refuse it.
fn judged(config: &Config, entities: &str) -> Result<std::result::Result<Config, Vec<String>>> {
    match Config::load_with_entities(&config.path, entities) {
        Ok(c) => Ok(Ok(c)),
        Err(SvsError::Config(errors)) => Ok(Err(errors)),
        Err(e) => Err(ProvisionError::Config(format!(
            "{}: {e}; the entities file was not changed",
            config.path.display()
        ))),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The checks svsd makes across inline entities and the file's (`after`;
/// `from_file` names the file's entities before the edit, which `config`
/// may hold too): made again here, under the lock, since another officer
/// may have added the same name or certificate since `config` was read.
fn cross_check(
    config: &Config,
    from_file: &BTreeSet<String>,
    after: &[EntityConfig],
) -> Result<()> {
    let inline = config
        .entities
        .iter()
        .filter(|e| !from_file.contains(&e.name));
    let mut names = BTreeSet::new();
    let mut clients: BTreeMap<String, String> = BTreeMap::new();
    for e in inline.chain(after.iter()) {
        if !names.insert(e.name.clone()) {
            return Err(ProvisionError::AlreadyExists(format!(
                "entity {:?} would be defined twice; nothing was changed",
                e.name
            )));
        }
        if let Some(other) = clients.insert(format!("{:?}", e.client), e.name.clone()) {
            return Err(ProvisionError::AlreadyExists(format!(
                "entities {other:?} and {:?} would match the same client certificate; nothing was changed",
                e.name
            )));
        }
    }
    Ok(())
}

struct ReloadOutcome {
    text: String,
    json: Value,
}

/// How long svsd gets to record a reload: it re-reads its files, builds
/// the TLS acceptor and fsyncs one audit record.
const RELOAD_WAIT: Duration = Duration::from_secs(5);

fn not_reloaded(why: String) -> ProvisionError {
    ProvisionError::NotReloaded(format!(
        "the entities file was updated, but {why}. Until svsd reloads, it keeps serving the previous entities: fix the cause, then `systemctl reload svsd` (or `kill -HUP <svsd pid>`) and check `{}`",
        crate::cli::command("audit show --type reload --last 1")
    ))
}

fn proc_name(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}

/// Why `pid` is not a running svsd, if it is not.
fn not_svsd(pid: i32) -> Option<String> {
    match proc_name(pid) {
        Some(n) if n == "svsd" => None,
        Some(n) => Some(format!("process {pid} is {n:?}, not svsd")),
        None => Some(format!("there is no process {pid}")),
    }
}

fn sighup(pid: i32) -> Result<()> {
    // Checked again although `reload_target` did: svsd may have stopped
    // while the file was edited.
    if let Some(why) = not_svsd(pid) {
        return Err(not_reloaded(format!("svsd was not told: {why}")));
    }
    let p = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| not_reloaded(format!("svsd was not told: {pid} is not a process id")))?;
    rustix::process::kill_process(p, rustix::process::Signal::HUP)
        .map_err(|e| not_reloaded(format!("svsd was not told: SIGHUP to {pid}: {e}")))
}

fn systemctl(args: &[&str]) -> bool {
    std::process::Command::new("systemctl")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The seq of the newest complete record in the trail (0 when empty).
fn audit_mark(dir: &Path) -> std::io::Result<u64> {
    let files = svs_appliance::audit::trail_files(dir)?;
    for (_, path) in files.iter().rev() {
        let text = svs_appliance::audit::read_trail_file(path)?;
        let complete = text
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(&text[..0], |i| &text[..i]);
        if let Some(last) = complete
            .split(|b| *b == b'\n')
            .rev()
            .find(|l| !l.is_empty())
        {
            return Ok(serde_json::from_slice::<Value>(last)
                .ok()
                .and_then(|v| v.get("seq")?.as_u64())
                .unwrap_or(0));
        }
    }
    Ok(0)
}

/// The seq of the first `reload` record after `mark` that read `edit`,
/// if svsd wrote one. A reload that read the file before the edit (another
/// editor's, sent just before) does not count.
fn reload_after(dir: &Path, mark: u64, edit: &Written) -> Option<u64> {
    let files = svs_appliance::audit::trail_files(dir).ok()?;
    // Only the file holding `mark` and later ones can hold newer records.
    let start = files.iter().rposition(|(s, _)| *s <= mark).unwrap_or(0);
    for (_, path) in &files[start..] {
        let bytes = svs_appliance::audit::read_trail_file(path).ok()?;
        for line in String::from_utf8_lossy(&bytes).lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let seq = v.get("seq").and_then(Value::as_u64).unwrap_or(0);
            // A `start` counts too: a reload sent to an svsd waiting to
            // start made it start, with the edited file.
            if seq > mark
                && matches!(
                    v.get("type").and_then(Value::as_str),
                    Some("reload" | "start")
                )
                && v.get("detail")
                    .and_then(Value::as_str)
                    .and_then(entities_sha256_of)
                    .is_some_and(|read| edit.is_in(read))
            {
                return Some(seq);
            }
        }
    }
    None
}

/// Waits for svsd's `reload` audit record: svsd writes it only once the
/// new configuration is installed, and writes nothing when it refuses one
/// (the previous configuration keeps serving). A signal delivered, or
/// `systemctl reload` returning, says neither.
fn confirm(dir: &Path, mark: u64, edit: &Written, wait: Duration) -> Option<u64> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(seq) = reload_after(dir, mark, edit) {
            return Some(seq);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Who will be asked to reload, settled before the file is edited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// --no-reload.
    Nobody,
    /// SIGHUP to this svsd.
    Pid(i32),
    /// `systemctl reload svsd`.
    Systemd,
}

/// [`reload_target`], and a reload svsd would refuse for its TLS files
/// (a server key that is not its certificate's, half through a renewal; a
/// client CA bundle that does not parse) refused before the edit: the file
/// would be changed and svsd would go on serving the old one, an entity
/// shown suspended by `entity list` still signing. Files not complete yet
/// are left to svsd, which waits for them at start.
fn reload_target_for(how: &Reload, config: &Config) -> Result<Target> {
    let target = reload_target(how, &config.path)?;
    if target != Target::Nobody
        && let Some(why) = svs_appliance::daemon::api_tls_refusal(&config.tls)
    {
        return Err(ProvisionError::Config(format!(
            "svsd would refuse the reload: [tls]: {why}. Nothing was changed. Put the TLS files right first (svsd --check-config -c {} checks them); in an emergency, `systemctl stop svsd` stops all signing at once",
            config.path.display()
        )));
    }
    Ok(target)
}

/// Resolves `how` to a running svsd, or refuses: a pid or pid file that
/// names no svsd, or no svsd under systemd, is the operator's to correct,
/// and found out after the edit it would leave a changed file behind that
/// the corrected command then trips over (the entity exists already).
fn reload_target(how: &Reload, config: &Path) -> Result<Target> {
    let refuse = |why: String| {
        ProvisionError::Usage(format!(
            "{why}; nothing was changed. Pass --pid or --pid-file naming the running svsd, or --no-reload to change the file only"
        ))
    };
    // Another svsd (a second instance, a test one) would reload its own
    // files, not the one edited, and the edit would wait unconfirmed.
    let same_config = |pid: i32| match svsd_config_of(pid) {
        Some(theirs) if canonical(&theirs) != canonical(config) => Err(refuse(format!(
            "svsd (pid {pid}) runs with the configuration {}, not {}",
            theirs.display(),
            config.display()
        ))),
        _ => Ok(()),
    };
    let pid = match how {
        Reload::No => return Ok(Target::Nobody),
        Reload::Systemd => {
            systemd_main_pid().map_or(Ok(()), same_config)?;
            return Ok(Target::Systemd);
        }
        Reload::Auto => {
            if !(Path::new("/run/systemd/system").exists()
                && systemctl(&["is-active", "--quiet", "svsd"]))
            {
                return Err(refuse("no svsd running under systemd was found".into()));
            }
            systemd_main_pid().map_or(Ok(()), same_config)?;
            return Ok(Target::Systemd);
        }
        Reload::Pid(pid) => *pid,
        Reload::PidFile(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                refuse(format!(
                    "svsd's pid file {} cannot be read ({e})",
                    path.display()
                ))
            })?;
            text.trim()
                .parse::<i32>()
                .map_err(|_| refuse(format!("{} does not hold a process id", path.display())))?
        }
    };
    if let Some(why) = not_svsd(pid) {
        return Err(refuse(why));
    }
    same_config(pid)?;
    Ok(Target::Pid(pid))
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The main process of systemd's svsd unit, when it has one.
fn systemd_main_pid() -> Option<i32> {
    let out = std::process::Command::new("systemctl")
        .args(["show", "--property=MainPID", "--value", "svsd"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    String::from_utf8(out.stdout)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|pid| *pid > 0)
}

/// The configuration file svsd `pid` was started with, from its command
/// line (`--config`/`-c`, else svsd's default), relative paths taken from
/// its working directory; None when it cannot be told (`--dev`, which
/// makes its own, or /proc not readable).
fn svsd_config_of(pid: i32) -> Option<PathBuf> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if args.iter().any(|a| a == "--dev") {
        return None;
    }
    let mut named = None;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--config" || a == "-c" {
            named = it.next().cloned();
        } else if let Some(v) = a.strip_prefix("--config=") {
            named = Some(v.to_owned());
        } else if let Some(v) = a.strip_prefix("-c").filter(|v| !v.is_empty()) {
            named = Some(v.to_owned());
        }
    }
    let path = PathBuf::from(named.unwrap_or_else(|| SVSD_DEFAULT_CONFIG.to_owned()));
    if path.is_absolute() {
        Some(path)
    } else {
        Some(
            std::fs::read_link(format!("/proc/{pid}/cwd"))
                .ok()?
                .join(path),
        )
    }
}

/// svsd's configuration file when it is started without `--config`.
const SVSD_DEFAULT_CONFIG: &str = "/etc/svs/svsd.toml";

/// Asks svsd to reload after `edit`; an edit that changed nothing (None)
/// needs no reload.
fn do_reload(target: &Target, config: &Config, edit: &Option<Written>) -> Result<ReloadOutcome> {
    match edit {
        Some(edit) => do_reload_within(
            target,
            &config.audit.dir,
            config.health_listen,
            edit,
            RELOAD_WAIT,
        ),
        None => Ok(ReloadOutcome {
            text: "the file already said so: nothing was written, svsd not reloaded\n".into(),
            json: json!({"method": "none", "sent": false, "confirmed": false, "changed": false}),
        }),
    }
}

/// Why svsd's probe listener at `addr` says it is waiting to start (not
/// provisioned, HSM unreachable, its first start attempt still running),
/// if it says so. A waiting svsd has no
/// audit trail open, so it writes no `reload` record; but SIGHUP makes it
/// re-read its configuration, and it reads the entities file when it
/// starts. A running svsd that is not ready (self-tests failed) still
/// writes reload records, so it never gets here.
fn waiting_reason(addr: SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(1);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut raw = Vec::new();
    s.take(64 << 10).read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.0 503") && !head.starts_with("HTTP/1.1 503") {
        return None;
    }
    let body: Value = serde_json::from_str(body).ok()?;
    let message = body["error"]["message"].as_str()?;
    (body["error"]["code"] == "not_ready"
        && (message.starts_with("not provisioned")
            || message.starts_with("HSM unavailable")
            || message == "starting"))
        .then(|| message.to_owned())
}

fn do_reload_within(
    target: &Target,
    audit_dir: &Path,
    health: Option<SocketAddr>,
    edit: &Written,
    wait: Duration,
) -> Result<ReloadOutcome> {
    let pid = match *target {
        Target::Nobody => {
            return Ok(ReloadOutcome {
                text: "svsd not reloaded (--no-reload): run `systemctl reload svsd` when ready\n"
                    .into(),
                json: json!({"method": "none", "sent": false, "confirmed": false}),
            });
        }
        Target::Pid(pid) => Some(pid),
        Target::Systemd => None,
    };
    let mark = audit_mark(audit_dir).map_err(|e| {
        not_reloaded(format!(
            "svsd was not asked: its audit trail {} cannot be read ({e}), so a reload could not be confirmed",
            audit_dir.display()
        ))
    })?;
    let method = match pid {
        Some(pid) => {
            sighup(pid)?;
            json!({"method": "sighup", "pid": pid})
        }
        None => {
            if !systemctl(&["reload", "svsd"]) {
                return Err(not_reloaded(
                    "`systemctl reload svsd` failed (see `systemctl status svsd`)".into(),
                ));
            }
            json!({"method": "systemd"})
        }
    };
    let who = pid.map_or("svsd".to_string(), |p| format!("svsd (pid {p})"));
    match confirm(audit_dir, mark, edit, wait) {
        Some(seq) => {
            let mut j = method;
            j["sent"] = true.into();
            j["confirmed"] = true.into();
            j["audit_seq"] = seq.into();
            Ok(ReloadOutcome {
                text: format!(
                    "{who} reloaded (confirmed by its audit record at seq {seq}, which read the edited file)\n"
                ),
                json: j,
            })
        }
        None => match health.and_then(waiting_reason) {
            Some(reason) => {
                let mut j = method;
                j["sent"] = true.into();
                j["confirmed"] = false.into();
                j["waiting"] = reason.clone().into();
                Ok(ReloadOutcome {
                    text: format!(
                        "{who} is waiting to start ({reason}): it reads the entities file when it starts\n"
                    ),
                    json: j,
                })
            }
            None => Err(not_reloaded(format!(
                "{who} was asked to reload and did not confirm within {}s (no new `reload` audit record): it refused the new configuration (its log says why), is not running, or is still waiting to be provisioned (`systemctl status svsd`; then it reads the file when it starts)",
                wait.as_secs()
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot HTTP server answering `answer` to one request.
    fn probe_answering(answer: &'static str) -> SocketAddr {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(answer.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn a_probe_saying_svsd_waits_to_start_is_told_from_other_answers() {
        let waiting = probe_answering(
            "HTTP/1.0 503 Service Unavailable\r\ncontent-type: application/json\r\n\r\n{\"error\":{\"code\":\"not_ready\",\"message\":\"not provisioned: HSM PIN missing\"}}",
        );
        assert_eq!(
            waiting_reason(waiting).as_deref(),
            Some("not provisioned: HSM PIN missing")
        );
        // Its first start attempt still running: the SIGHUP is taken once it
        // has started (or makes it start again).
        let starting = probe_answering(
            "HTTP/1.0 503 Service Unavailable\r\n\r\n{\"error\":{\"code\":\"not_ready\",\"message\":\"starting\"}}",
        );
        assert_eq!(waiting_reason(starting).as_deref(), Some("starting"));
        // Running but not ready: it writes reload records, so no excuse.
        let failing = probe_answering(
            "HTTP/1.0 503 Service Unavailable\r\n\r\n{\"error\":{\"code\":\"not_ready\",\"message\":\"self-tests failed\"}}",
        );
        assert_eq!(waiting_reason(failing), None);
        let ready = probe_answering("HTTP/1.0 200 OK\r\n\r\n{\"status\":\"ready\"}");
        assert_eq!(waiting_reason(ready), None);
        // Nothing listening.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = l.local_addr().unwrap();
        drop(l);
        assert_eq!(waiting_reason(closed), None);
    }

    #[test]
    fn an_update_changes_values_where_they_stand_and_keeps_their_comments() {
        let text = "\
# bank-a: owner ops
[[entity]]
name = \"bank-a\"
certificate_sha256 = \"00\" # renewed yearly
keys = [\"k1\"] # the demo key only
operations = [\"sign\"]
max_concurrent = 4 # agreed with the unit

[entity.rate] # per contract
per_second = 10.0
burst = 20
";
        let mut doc: toml_edit::DocumentMut = text.parse().unwrap();
        let list = doc["entity"].as_array_of_tables_mut().unwrap();
        let change = EntityChange {
            keys: Some(vec!["k1".into(), "k2".into(), "k2".into()]),
            max_concurrent: Some(8),
            ..EntityChange::default()
        };
        let rate = rate_value(Some("50/s"), None).unwrap();
        apply_change(
            find_entity(list, "bank-a").unwrap(),
            Some(("certificate_sha256", "11".into())),
            &change,
            rate,
        );
        assert_eq!(
            doc.to_string(),
            "\
# bank-a: owner ops
[[entity]]
name = \"bank-a\"
certificate_sha256 = \"11\" # renewed yearly
keys = [\"k1\", \"k2\"] # the demo key only
operations = [\"sign\"]
max_concurrent = 8 # agreed with the unit

[entity.rate] # per contract
per_second = 50.0
"
        );
        // A certificate matched another way replaces the old field; an
        // inline rate stays inline.
        let mut doc: toml_edit::DocumentMut = "[[entity]]\nname = \"b\"\nsubject = \"CN=b\"\nissuer = \"CN=ca\"\nrate = { per_second = 1.0 }\n".parse().unwrap();
        let list = doc["entity"].as_array_of_tables_mut().unwrap();
        apply_change(
            find_entity(list, "b").unwrap(),
            Some(("spki_sha256", "22".into())),
            &EntityChange::default(),
            rate_value(Some("2"), Some(5)).unwrap(),
        );
        assert_eq!(
            doc.to_string(),
            "[[entity]]\nname = \"b\"\nrate = { per_second = 2.0, burst = 5 }\nspki_sha256 = \"22\"\n"
        );
    }

    /// An svsd configuration in a temporary directory: a client CA, key
    /// `demo` exposed, an entities file of `entities`.
    struct Fixture {
        dir: tempfile::TempDir,
        config: PathBuf,
        ca: svs_appliance::tls::devpki::DevCa,
    }

    impl Fixture {
        fn new(entities: &str) -> Fixture {
            use svs_appliance::tls::devpki::{DevCa, save_issued};
            let dir = tempfile::tempdir().unwrap();
            let ca = DevCa::generate("Test CA").unwrap();
            ca.save(dir.path()).unwrap();
            save_issued(dir.path(), "server", &ca.server(&["localhost"]).unwrap()).unwrap();
            std::fs::create_dir(dir.path().join("audit")).unwrap();
            std::fs::write(dir.path().join("pin"), "123456\n").unwrap();
            std::fs::write(dir.path().join("entities.toml"), entities).unwrap();
            let config = dir.path().join("svsd.toml");
            std::fs::write(
                &config,
                format!(
                    "entities_file = \"entities.toml\"\n\
                     [server]\nlisten = [\"127.0.0.1:1\"]\n\
                     [tls]\ncertificate = \"server.pem\"\nprivate_key = \"server-key.pem\"\nclient_ca = \"ca.pem\"\n\
                     [hsm]\nmodule = \"embedded\"\ntoken_label = \"t\"\npin = {{ file = \"{}\" }}\n\
                     [keys]\ndemo = {{ object = \"demo\" }}\n\
                     [audit]\ndir = \"audit\"\ncheckpoint_interval_s = 0\n",
                    dir.path().join("pin").display()
                ),
            )
            .unwrap();
            Fixture { dir, config, ca }
        }

        fn entities(&self) -> PathBuf {
            self.dir.path().join("entities.toml")
        }

        /// A client certificate with common name `cn`, on disk, and what
        /// svsd would see of it.
        fn client(&self, cn: &str) -> (PathBuf, svs_appliance::policy::ClientIdentity) {
            let issued = self.ca.client(cn).unwrap();
            let (cert, _) =
                svs_appliance::tls::devpki::save_issued(self.dir.path(), cn, &issued).unwrap();
            let identity =
                svs_appliance::policy::ClientIdentity::from_der(&issued.cert_der).unwrap();
            (cert, identity)
        }
    }

    /// An `[[entity]]` table for `name`, recognised by a made-up public
    /// key `digit` repeated (each entity needs its own).
    fn entity_toml(name: &str, digit: char, status: &str) -> String {
        format!(
            "[[entity]]\nname = \"{name}\"\n{status}spki_sha256 = \"{}\"\nkeys = [\"demo\"]\noperations = [\"sign\"]\n",
            digit.to_string().repeat(64)
        )
    }

    /// Whether some process or thread waits for a lock on `lock`, as
    /// /proc/locks tells (a waiter's line has `->`; files are named by
    /// device and inode).
    fn someone_waits_for(lock: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(lock).unwrap().ino().to_string();
        std::fs::read_to_string("/proc/locks")
            .unwrap()
            .lines()
            .any(|l| {
                l.contains("->")
                    && l.split_whitespace().any(|f| {
                        f.matches(':').count() == 2 && f.rsplit(':').next() == Some(ino.as_str())
                    })
            })
    }

    /// Runs `command` while this test holds the entities file's lock;
    /// once `command` waits for it, `meanwhile` (another officer's edit)
    /// runs, then the lock is released.
    fn racing<T: Send + 'static>(
        f: &Fixture,
        command: impl FnOnce() -> T + Send + 'static,
        meanwhile: impl FnOnce(),
    ) -> T {
        let lock_path = f.dir.path().join(".entities.toml.lock");
        let lock = File::create(&lock_path).unwrap();
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
        let run = std::thread::spawn(command);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !someone_waits_for(&lock_path) {
            assert!(!run.is_finished(), "the command did not wait for the lock");
            assert!(Instant::now() < deadline, "the command never took the lock");
            std::thread::sleep(Duration::from_millis(10));
        }
        meanwhile();
        drop(lock);
        run.join().unwrap()
    }

    #[test]
    fn suspend_all_suspends_the_entities_written_while_it_waited_for_the_lock() {
        let f = Fixture::new(&entity_toml("a", '1', ""));
        let config = f.config.clone();
        let r = racing(
            &f,
            move || suspend_all(&config, &Reload::No),
            || {
                // Another officer's `entity add b` and `entity resume c`.
                let text = [
                    entity_toml("a", '1', ""),
                    entity_toml("b", '2', ""),
                    entity_toml("c", '3', "status = \"active\"\n"),
                ]
                .join("\n");
                std::fs::write(f.entities(), text).unwrap();
            },
        )
        .unwrap();
        let config = load_config(&f.config).unwrap();
        let states: Vec<_> = config
            .entities
            .iter()
            .map(|e| (e.name.as_str(), e.status))
            .collect();
        assert_eq!(
            states,
            [
                ("a", EntityStatus::Suspended),
                ("b", EntityStatus::Suspended),
                ("c", EntityStatus::Suspended)
            ]
        );
        assert_eq!(r.json["suspended"], json!(["a", "b", "c"]), "{}", r.text);
        assert!(r.text.starts_with("suspended: a, b, c\n"), "{}", r.text);
        // Once all are, nothing is written.
        let before = std::fs::read_to_string(f.entities()).unwrap();
        let r = suspend_all(&f.config, &Reload::No).unwrap();
        assert_eq!(r.json["changed"], false);
        assert_eq!(std::fs::read_to_string(f.entities()).unwrap(), before);
    }

    #[test]
    fn a_certificate_another_officer_gave_another_entity_meanwhile_is_refused_under_the_lock() {
        let f = Fixture::new(&entity_toml("a", '1', ""));
        let (cert, id) = f.client("app-x");
        // `entity add c` of the same certificate, matched by its hash, is
        // written while `entity add b` (by its key) waits for the lock.
        let theirs = format!(
            "{}\n[[entity]]\nname = \"c\"\ncertificate_sha256 = \"{}\"\nkeys = [\"demo\"]\noperations = [\"sign\"]\n",
            entity_toml("a", '1', ""),
            hex(&id.certificate_sha256)
        );
        let new = NewEntity {
            name: "b".into(),
            cert: cert.clone(),
            match_certificate: false,
            keys: vec!["demo".into()],
            ops: vec!["sign".into()],
            rate: None,
            burst: None,
            max_concurrent: None,
            suspended: false,
        };
        let config = f.config.clone();
        let e = racing(
            &f,
            move || add(&config, &new, &Reload::No),
            || std::fs::write(f.entities(), &theirs).unwrap(),
        )
        .expect_err("two entities would match one certificate");
        assert_eq!(e.exit_code(), 4, "{e}");
        assert!(
            e.to_string()
                .contains("already recognises this certificate as entity \"c\""),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(f.entities()).unwrap(), theirs);

        // The same for `entity update --cert`, the other matching by key.
        let theirs = format!(
            "{}\n[[entity]]\nname = \"d\"\nspki_sha256 = \"{}\"\nkeys = [\"demo\"]\noperations = [\"sign\"]\n",
            entity_toml("a", '1', ""),
            hex(&id.spki_sha256)
        );
        std::fs::write(f.entities(), entity_toml("a", '1', "")).unwrap();
        let config = f.config.clone();
        let change = EntityChange {
            cert: Some((cert, Recognise::Certificate)),
            ..EntityChange::default()
        };
        let e = racing(
            &f,
            move || update(&config, "a", &change, &Reload::No),
            || std::fs::write(f.entities(), &theirs).unwrap(),
        )
        .expect_err("two entities would match one certificate");
        assert!(
            e.to_string()
                .contains("already recognises this certificate as entity \"d\""),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(f.entities()).unwrap(), theirs);
    }

    /// A renewal keeps how the entity is recognised: by key stays by key
    /// (in place, with its comment), by subject and issuer needs no edit
    /// for a certificate renewed under the same name and refuses another
    /// one; only --match-cert / --match-key change the way.
    #[test]
    fn a_renewed_certificate_keeps_the_way_the_entity_is_recognised() {
        let f = Fixture::new(&entity_toml("a", '1', "").replace(
            &format!("\"{}\"\n", "1".repeat(64)),
            &format!("\"{}\" # CHG-1234\n", "1".repeat(64)),
        ));
        let renew = |name: &str, cert: &Path, how: Recognise| {
            let change = EntityChange {
                cert: Some((cert.to_path_buf(), how)),
                ..EntityChange::default()
            };
            update(&f.config, name, &change, &Reload::No)
        };
        let (cert, id) = f.client("app-a");
        renew("a", &cert, Recognise::AsNow).unwrap();
        let text = std::fs::read_to_string(f.entities()).unwrap();
        let line = format!("spki_sha256 = \"{}\" # CHG-1234\n", hex(&id.spki_sha256));
        assert!(text.contains(&line), "{text}");
        assert!(!text.contains("certificate_sha256"), "{text}");
        renew("a", &cert, Recognise::Certificate).unwrap();
        let text = std::fs::read_to_string(f.entities()).unwrap();
        assert!(text.contains(&hex(&id.certificate_sha256)), "{text}");
        assert!(!text.contains("spki_sha256"), "{text}");

        // By subject and issuer (written by hand: `entity add` pins).
        let (_, old_id) = f.client("app-b");
        let by_subject = format!(
            "{text}\n[[entity]]\nname = \"b\"\nsubject = \"{}\"\nissuer = \"{}\"\nkeys = [\"demo\"]\noperations = [\"sign\"]\n",
            old_id.subject, old_id.issuer
        );
        std::fs::write(f.entities(), &by_subject).unwrap();
        let (renewed, renewed_id) = f.client("app-b");
        assert_ne!(renewed_id.spki_sha256, old_id.spki_sha256);
        let r = renew("b", &renewed, Recognise::AsNow).unwrap();
        assert!(r.text.contains("nothing was changed"), "{}", r.text);
        assert_eq!(std::fs::read_to_string(f.entities()).unwrap(), by_subject);
        // The same as a full-chain file (the CA after the leaf): svsd
        // judges "issued directly" by the leaf alone, and so does this.
        let full_chain = f.dir.path().join("app-b-full.pem");
        let pem = [
            std::fs::read_to_string(&renewed).unwrap(),
            std::fs::read_to_string(f.dir.path().join("ca.pem")).unwrap(),
        ];
        std::fs::write(&full_chain, pem.concat()).unwrap();
        let r = renew("b", &full_chain, Recognise::AsNow).unwrap();
        assert!(r.text.contains("nothing was changed"), "{}", r.text);
        let (other, _) = f.client("app-c");
        let e = renew("b", &other, Recognise::AsNow).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        assert!(e.to_string().contains("--match-cert or --match-key"), "{e}");
        assert_eq!(std::fs::read_to_string(f.entities()).unwrap(), by_subject);
        renew("b", &other, Recognise::PublicKey).unwrap();
        let text = std::fs::read_to_string(f.entities()).unwrap();
        assert!(!text.contains("subject ="), "{text}");

        // A file svsd refuses (a key it does not expose): how "a" is
        // recognised now cannot be read, so it is not guessed.
        let refused = text.replacen("keys = [\"demo\"]", "keys = [\"ghost\"]", 1);
        std::fs::write(f.entities(), &refused).unwrap();
        let e = renew("a", &cert, Recognise::AsNow).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        assert!(e.to_string().contains("cannot be read"), "{e}");
        assert_eq!(std::fs::read_to_string(f.entities()).unwrap(), refused);
    }

    #[test]
    fn an_update_that_changes_nothing_writes_nothing_in_a_file_without_header() {
        let text = "[[entity]]\nname = \"a\"\nspki_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\nkeys = [\"demo\"]\noperations = [\"sign\"]\n";
        let f = Fixture::new(text);
        let change = EntityChange {
            keys: Some(vec!["demo".into()]),
            ..EntityChange::default()
        };
        let r = update(&f.config, "a", &change, &Reload::No).unwrap();
        assert!(r.text.contains("nothing was changed"), "{}", r.text);
        assert_eq!(r.json["changed"], false);
        assert_eq!(std::fs::read_to_string(f.entities()).unwrap(), text);
        let r = set_status(&f.config, "a", false, &Reload::No).unwrap();
        assert_eq!(r.json["changed"], false);
        assert_eq!(std::fs::read_to_string(f.entities()).unwrap(), text);
        // A real change may still give it the header.
        let change = EntityChange {
            ops: Some(vec!["sign".into(), "verify".into()]),
            ..EntityChange::default()
        };
        let r = update(&f.config, "a", &change, &Reload::No).unwrap();
        assert_eq!(r.json["changed"], true);
        let now = std::fs::read_to_string(f.entities()).unwrap();
        assert!(now.starts_with(HEADER), "{now}");
        assert!(now.contains("operations = [\"sign\", \"verify\"]"), "{now}");
    }

    /// An entities file that svsd refuses only because `bank-a` (and, with
    /// `also_c`, `bank-c`) names a key svsd.toml no longer exposes.
    fn retired_key(also_c: bool) -> String {
        let mut text = format!(
            "# bank-a: owner ops, ticket OPS-1\n{}keys = [\"retired\"] # the 2025 key\noperations = [\"sign\"]\n\n{}",
            "[[entity]]\nname = \"bank-a\"\nspki_sha256 = \"1111111111111111111111111111111111111111111111111111111111111111\"\n",
            entity_toml("bank-b", '2', "")
        );
        if also_c {
            text.push('\n');
            text.push_str(&entity_toml("bank-c", '3', "").replace("\"demo\"", "\"retired\""));
        }
        text
    }

    #[test]
    fn an_edit_that_repairs_the_entities_file_is_written() {
        use clap::Parser;
        let f = Fixture::new(&retired_key(false));
        let e = load_config(&f.config).expect_err("svsd refuses the file as it is");
        assert!(e.to_string().contains("\"retired\""), "{e}");
        // As the officer runs it: the command line loads the configuration
        // first too.
        let cli = crate::cli::Cli::try_parse_from([
            "svs-provision",
            "--config",
            f.config.to_str().unwrap(),
            "entity",
            "update",
            "--name",
            "bank-a",
            "--keys",
            "demo",
            "--no-reload",
        ])
        .unwrap();
        let r = crate::cli::run(cli).unwrap().report;
        assert_eq!(r.json["changed"], true, "{}", r.text);
        let now = std::fs::read_to_string(f.entities()).unwrap();
        assert!(
            now.starts_with("# bank-a: owner ops, ticket OPS-1\n"),
            "{now}"
        );
        assert!(now.contains("keys = [\"demo\"] # the 2025 key\n"), "{now}");
        let config = load_config(&f.config).unwrap();
        assert_eq!(config.entities.len(), 2);

        // Removing the entity at fault repairs it too.
        std::fs::write(f.entities(), retired_key(false)).unwrap();
        remove(&f.config, "bank-a", true, &Reload::No).unwrap();
        let names: Vec<_> = load_config(&f.config)
            .unwrap()
            .entities
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["bank-b"]);
    }

    #[test]
    fn an_edit_that_leaves_the_configuration_refused_writes_nothing() {
        let f = Fixture::new(&retired_key(true));
        let before = std::fs::read(f.entities()).unwrap();
        let refused = |e: ProvisionError| {
            assert_eq!(e.exit_code(), 8, "{e}");
            let e = e.to_string();
            // bank-c's error is older than the edit, and says so.
            let c = e
                .lines()
                .find(|l| l.contains("entity \"bank-c\": key \"retired\""))
                .unwrap_or_else(|| panic!("{e}"));
            assert!(
                c.contains("already so before this edit") || e.contains("as it stands"),
                "{e}"
            );
            assert_eq!(std::fs::read(f.entities()).unwrap(), before, "{e}");
            e
        };
        let fix_a = EntityChange {
            keys: Some(vec!["demo".into()]),
            ..EntityChange::default()
        };
        let e = refused(update(&f.config, "bank-a", &fix_a, &Reload::No).unwrap_err());
        assert!(!e.contains("\"bank-a\""), "bank-a's error is fixed: {e}");
        let e = refused(set_status(&f.config, "bank-a", true, &Reload::No).unwrap_err());
        assert!(e.contains("\"bank-a\""), "{e}");
        refused(suspend_all(&f.config, &Reload::No).unwrap_err());
        // Nothing to change is refused as well: the file is not as svsd
        // serves it, whatever it says about bank-b.
        refused(set_status(&f.config, "bank-b", false, &Reload::No).unwrap_err());
        let (cert, _) = f.client("app-x");
        let new = NewEntity {
            name: "bank-d".into(),
            cert,
            match_certificate: false,
            keys: vec!["demo".into()],
            ops: vec!["sign".into()],
            rate: None,
            burst: None,
            max_concurrent: None,
            suspended: false,
        };
        refused(add(&f.config, &new, &Reload::No).unwrap_err());
        // An entity that is in neither file is still not found.
        let e = update(&f.config, "bank-x", &fix_a, &Reload::No).unwrap_err();
        assert_eq!(e.exit_code(), 3, "{e}");
        assert!(e.to_string().contains("bank-a"), "{e}");
        assert_eq!(std::fs::read(f.entities()).unwrap(), before);
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("200/s").unwrap(), 200.0);
        assert_eq!(parse_rate("0.5").unwrap(), 0.5);
        for bad in ["", "0", "-1/s", "fast", "NaN"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    fn push_entity(name: &str) -> impl FnOnce(&mut toml_edit::ArrayOfTables) -> Result<()> {
        let name = name.to_owned();
        move |list| {
            let mut t = toml_edit::Table::new();
            t["name"] = value(name);
            list.push(t);
            Ok(())
        }
    }

    #[test]
    fn the_packaged_files_header_stays_at_the_top_when_entities_are_added() {
        let packaged = include_str!("../../image/deb/entities.toml");
        let path = Path::new("/etc/svs/entities.toml");
        let once = edited(packaged, path, push_entity("bank-a")).unwrap();
        assert!(once.starts_with(packaged), "{once}");
        assert!(!once.contains(HEADER.trim_end()), "{once}");
        assert!(once.trim_end().ends_with("name = \"bank-a\""), "{once}");
        let twice = edited(&once, path, push_entity("bank-b")).unwrap();
        assert!(twice.starts_with(&once), "{twice}");
        // A file without comments of its own gets the header, once.
        let bare = edited("", path, push_entity("bank-a")).unwrap();
        assert!(bare.starts_with(HEADER), "{bare}");
        let again = edited(&bare, path, push_entity("bank-b")).unwrap();
        assert_eq!(again.matches(HEADER.trim_end()).count(), 1, "{again}");
    }

    #[test]
    fn sighup_refuses_a_process_that_is_not_svsd() {
        let me = std::process::id() as i32;
        let e = sighup(me).expect_err("must refuse");
        assert!(e.to_string().contains("not svsd"), "{e}");
        assert_eq!(e.exit_code(), 14);
    }

    /// Records of `(type, detail)` appended to the trail in `dir`.
    fn trail_with(dir: &Path, records: &[(&'static str, String)]) {
        let trail = svs_appliance::audit::AuditTrail::open(
            &svs_appliance::config::AuditConfig::without_token(dir.to_path_buf(), 1 << 20),
            None,
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for (kind, detail) in records {
            rt.block_on(trail.note(kind, detail.clone())).unwrap();
        }
        trail.close();
    }

    /// A `reload` record of svsd having read an entities file of `text`.
    fn reload_of(text: &str) -> (&'static str, String) {
        let changes = svs_appliance::reload::ReloadChanges::default();
        let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        (
            "reload",
            svs_appliance::reload::record_detail(&changes, Some(&digest)),
        )
    }

    fn nothing() -> String {
        "test".into()
    }

    #[test]
    fn a_reload_counts_only_once_svsd_recorded_it_reading_the_edit() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("entities.toml");
        std::fs::write(&file, "ours").unwrap();
        let edit = Written {
            path: file.clone(),
            sha256: sha256_hex(b"ours"),
        };
        let audit = dir.path().join("audit");
        trail_with(
            &audit,
            &[
                ("start", nothing()),
                reload_of("ours"),
                ("selftest", nothing()),
            ],
        );
        let mark = audit_mark(&audit).unwrap();
        assert_eq!(mark, 3);
        // An older reload record does not confirm a new request, nor does
        // a newer one that read the file as it was before the edit (another
        // editor's reload, sent just before).
        let quick = Duration::from_millis(200);
        assert_eq!(confirm(&audit, mark, &edit, quick), None);
        trail_with(&audit, &[("anomaly", nothing()), reload_of("before")]);
        assert_eq!(confirm(&audit, mark, &edit, quick), None);
        trail_with(&audit, &[reload_of("ours")]);
        assert_eq!(confirm(&audit, mark, &edit, quick), Some(6));
        // A later editor's file (made from ours) read by the reload counts.
        std::fs::write(&file, "ours, then theirs").unwrap();
        let mark = audit_mark(&audit).unwrap();
        trail_with(&audit, &[reload_of("ours, then theirs")]);
        assert_eq!(confirm(&audit, mark, &edit, quick), Some(7));
    }

    #[test]
    fn no_svsd_to_ask_is_refused_before_anything_changes_unless_no_reload_was_given() {
        if !(Path::new("/run/systemd/system").exists()
            && systemctl(&["is-active", "--quiet", "svsd"]))
        {
            let e = reload_target(&Reload::Auto, Path::new(SVSD_DEFAULT_CONFIG))
                .expect_err("nothing to ask must not pass");
            assert_eq!(e.exit_code(), 2, "{e}");
        }
        assert_eq!(
            reload_target(&Reload::No, Path::new(SVSD_DEFAULT_CONFIG)).unwrap(),
            Target::Nobody
        );
        let dir = tempfile::tempdir().unwrap();
        let edit = Written {
            path: dir.path().join("entities.toml"),
            sha256: sha256_hex(b""),
        };
        assert!(do_reload_within(&Target::Nobody, dir.path(), None, &edit, Duration::ZERO).is_ok());
        let me = std::process::id() as i32;
        let pid_file = dir.path().join("svsd.pid");
        std::fs::write(&pid_file, format!("{me}\n")).unwrap();
        for (how, says) in [
            (Reload::Pid(i32::MAX), "there is no process"),
            (Reload::Pid(me), "not svsd"),
            (
                Reload::PidFile(dir.path().join("none.pid")),
                "cannot be read",
            ),
            (Reload::PidFile(pid_file), "not svsd"),
        ] {
            let e = reload_target(&how, Path::new(SVSD_DEFAULT_CONFIG)).expect_err("must refuse");
            assert_eq!(e.exit_code(), 2, "{e}");
            let e = e.to_string();
            assert!(e.contains(says) && e.contains("nothing was changed"), "{e}");
        }
        // svsd gone between the check and the signal: the file has changed
        // by then, so it is a reload not confirmed.
        let e = do_reload_within(
            &Target::Pid(i32::MAX),
            dir.path(),
            None,
            &edit,
            Duration::ZERO,
        )
        .err()
        .unwrap();
        assert_eq!(e.exit_code(), 14, "{e}");
    }
}
