//! `cert import`: stores the certificate a CA issued for a token key, with
//! the key's CKA_ID so that svsd serves it with the key, plus its chain.
//! Everything is checked before the token is touched; a failure while
//! writing removes what this run had written.

use std::path::Path;
use std::time::SystemTime;

use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use der::{Decode, Encode};
use serde_json::json;
use sha2::{Digest, Sha256};
use svs_hsm::keys::{certificate_template, hex};
use x509_cert::Certificate;

use crate::Report;
use crate::csr::{ECDSA_WITH_SHA256, SM3_WITH_SM2};
use crate::error::{ProvisionError, Result};
use crate::keys::{self, Key, cert_point};
use crate::pin::PinReader;
use crate::token::Opened;

/// Reads one or more certificates from a PEM (or a single DER) file.
pub fn read_certificates(path: &Path) -> Result<Vec<(Vec<u8>, Certificate)>> {
    let bytes = std::fs::read(path)
        .map_err(|e| ProvisionError::NotFound(format!("cannot read {}: {e}", path.display())))?;
    let bad = |why: String| {
        ProvisionError::Certificate(format!(
            "{}: {why}; expected a PEM file with -----BEGIN CERTIFICATE----- blocks (or one DER certificate)",
            path.display()
        ))
    };
    let mut ders = Vec::new();
    // A DER certificate starts with a SEQUENCE tag; PEM starts with text.
    if bytes.first() == Some(&0x30) {
        ders.push(bytes.clone());
    } else {
        let text = std::str::from_utf8(&bytes).map_err(|_| bad("not text and not DER".into()))?;
        const BEGIN: &str = "-----BEGIN ";
        let mut rest = text;
        while let Some(start) = rest.find(BEGIN) {
            let block = &rest[start..];
            let end_marker = block
                .find("-----END ")
                .ok_or_else(|| bad("a PEM block has no END line".into()))?;
            let after = block[end_marker + 9..]
                .find("-----")
                .map(|i| end_marker + 9 + i + 5)
                .ok_or_else(|| bad("a PEM END line is cut short".into()))?;
            let (label, der) = der::pem::decode_vec(&block.as_bytes()[..after])
                .map_err(|e| bad(format!("PEM block is damaged ({e})")))?;
            if label == "CERTIFICATE" {
                ders.push(der);
            } else {
                return Err(bad(format!("found a {label} block, not a certificate")));
            }
            rest = &block[after..];
        }
    }
    if ders.is_empty() {
        return Err(bad("no certificate found".into()));
    }
    ders.into_iter()
        .enumerate()
        .map(|(i, der)| {
            let c = Certificate::from_der(&der)
                .map_err(|e| bad(format!("certificate #{} does not parse ({e})", i + 1)))?;
            Ok((der, c))
        })
        .collect()
}

fn validity_problem(c: &Certificate, now: SystemTime) -> Option<String> {
    let v = c.tbs_certificate().validity();
    let nb = v.not_before.to_system_time();
    let na = v.not_after.to_system_time();
    let t = svs_appliance::audit::rfc3339;
    if now < nb {
        Some(format!("is not valid before {} (now {})", t(nb), t(now)))
    } else if now > na {
        Some(format!("expired at {} (now {})", t(na), t(now)))
    } else {
        None
    }
}

/// Checks that `issuer` signed `cert` (SM3withSM2 with the default ID, or
/// ecdsa-with-SHA256); `None` when the algorithm is not one we check.
fn issued_by(cert: &Certificate, issuer: &Certificate) -> Option<bool> {
    let tbs = cert.tbs_certificate().to_der().ok()?;
    let sig = cert.signature().as_bytes()?;
    let oid = cert.signature_algorithm().oid;
    let alg = if oid == SM3_WITH_SM2 {
        svs_hsm::Algorithm::Sm2
    } else if oid == ECDSA_WITH_SHA256 {
        svs_hsm::Algorithm::EcdsaP256
    } else {
        return None;
    };
    let point = cert_point(&issuer.to_der().ok()?, alg)?;
    Some(
        svs_hsm::signature::SoftwareVerifier::new()
            .verify_message(alg, &point, svs_hsm::signature::DEFAULT_SM2_ID, &tbs, sig)
            .is_ok(),
    )
}

fn find_cert_by_value(session: &Session, der: &[u8]) -> Result<Vec<ObjectHandle>> {
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::Value(der.to_vec()),
        ])
        .map_err(|e| ProvisionError::pkcs11(e, "searching certificates", "user"))
}

/// Checks the chain before anything is stored: every chain certificate is
/// within its validity period, and each link from the certificate up to
/// the last issuer found in the chain is signed by that issuer. A wrong
/// signature is always refused; a date problem or a signature that cannot
/// be checked (an algorithm other than SM3withSM2 / ecdsa-with-SHA256) is
/// refused unless `force`, and then returned as a warning: an unchecked
/// link proves nothing, so it must not pass silently.
fn check_chain(
    leaf: &Certificate,
    chain: &[(Vec<u8>, Certificate)],
    now: SystemTime,
    force: bool,
) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    let mut soft = |problem: String| -> Result<()> {
        if force {
            warnings.push(problem);
            Ok(())
        } else {
            Err(ProvisionError::Certificate(format!(
                "{problem}. Nothing was stored (pass --force to store it anyway)"
            )))
        }
    };
    for (_, c) in chain {
        if let Some(p) = validity_problem(c, now) {
            soft(format!(
                "chain certificate {} {p}",
                c.tbs_certificate().subject()
            ))?;
        }
    }
    if chain.is_empty() {
        return Ok(warnings);
    }
    let mut cur = leaf;
    // Each step moves to another chain certificate; a chain cannot be
    // longer than the file, so this also ends on a loop of issuers.
    for step in 0..=chain.len() {
        let issuer_name = cur.tbs_certificate().issuer();
        let self_signed = cur.tbs_certificate().subject() == issuer_name;
        let Some((_, ca)) = chain
            .iter()
            .find(|(_, c)| c.tbs_certificate().subject() == issuer_name)
        else {
            if step == 0 {
                return Err(ProvisionError::Certificate(format!(
                    "the chain does not contain the certificate's issuer {}; chain subjects: {}. Nothing was stored",
                    issuer_name,
                    chain
                        .iter()
                        .map(|(_, c)| c.tbs_certificate().subject().to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                )));
            }
            // The top of the chain given: its issuer is trusted elsewhere.
            break;
        };
        let subject = cur.tbs_certificate().subject();
        match issued_by(cur, ca) {
            Some(true) => {}
            Some(false) => {
                return Err(ProvisionError::Certificate(format!(
                    "the signature on {subject} does not verify with the public key of {issuer_name}; it was not issued by that CA. Nothing was stored"
                )));
            }
            None => soft(format!(
                "the signature on {subject} by {issuer_name} cannot be checked (signature algorithm {} is not SM3withSM2 or ecdsa-with-SHA256)",
                cur.signature_algorithm().oid
            ))?,
        }
        if self_signed {
            break;
        }
        cur = ca;
    }
    Ok(warnings)
}

/// Options of `cert import`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ImportOptions {
    /// Accept an expired or not-yet-valid certificate or chain
    /// certificate, or a chain signature that cannot be checked.
    pub force: bool,
    /// Replace a certificate the key already has.
    pub replace: bool,
}

/// `cert import`.
pub fn import(
    opened: &Opened,
    pins: &mut PinReader,
    label: &str,
    file: &Path,
    chain: Option<&Path>,
    opts: ImportOptions,
) -> Result<Report> {
    // Files first: a malformed file must not cost a PIN attempt.
    let mut certs = read_certificates(file)?;
    let (leaf_der, leaf) = certs.remove(0);
    let mut chain_certs = certs;
    if let Some(c) = chain {
        chain_certs.extend(read_certificates(c)?);
    }
    let now = SystemTime::now();
    if let Some(problem) = validity_problem(&leaf, now)
        && !opts.force
    {
        return Err(ProvisionError::Certificate(format!(
            "the certificate in {} {problem}; nothing was stored. Ask the CA for a current one (or pass --force to store it anyway)",
            file.display()
        )));
    }
    let chain_warnings = check_chain(&leaf, &chain_certs, now, opts.force)?;

    let session = opened.user_session(pins)?;
    // Not before the PIN (an officer at its prompt would hold up every
    // other run), but before looking at what the token holds.
    let _changing = crate::token::lock_changes()?;
    let key: Key = keys::find(&session, &opened.profile, label, &opened.label)?;
    let cert_key = cert_point(&leaf_der, key.algorithm);
    if cert_key.as_deref() != Some(key.point.as_slice()) {
        let cert_fp = hex(&Sha256::digest(
            leaf.tbs_certificate().subject_public_key_info().to_der()?,
        ));
        return Err(ProvisionError::Certificate(format!(
            "the certificate in {} is for another key: its public key has spki_sha256 {cert_fp}, key '{label}' has {}. Nothing was stored; check that the CA answered the request made with `{}`",
            file.display(),
            key.fingerprint(),
            crate::cli::command(&format!("csr --label {label}"))
        )));
    }
    if key.id.is_empty() {
        return Err(ProvisionError::Usage(format!(
            "key '{label}' has no CKA_ID, so a certificate cannot be tied to it"
        )));
    }
    let existing = session
        .find_objects(&[
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::Id(key.id.clone()),
        ])
        .map_err(|e| ProvisionError::pkcs11(e, "searching certificates", "user"))?;
    let same = key.certificate.as_deref() == Some(leaf_der.as_slice());
    if !existing.is_empty() && !same && !opts.replace {
        let old = key
            .certificate
            .as_deref()
            .and_then(keys::cert_summary)
            .map(|c| {
                format!(
                    " (subject {}, expires {})",
                    c["subject"].as_str().unwrap_or(""),
                    c["not_after"].as_str().unwrap_or("")
                )
            })
            .unwrap_or_default();
        return Err(ProvisionError::AlreadyExists(format!(
            "key '{label}' already has a certificate{old}; pass --replace to replace it. Nothing was stored"
        )));
    }

    let mut created: Vec<ObjectHandle> = Vec::new();
    let result = (|| -> Result<usize> {
        if !same {
            created.push(
                session
                    .create_object(&certificate_template(
                        label,
                        Some(&key.id),
                        &leaf_der,
                        &leaf,
                    )?)
                    .map_err(|e| ProvisionError::pkcs11(e, "storing the certificate", "user"))?,
            );
        }
        let mut chain_stored = 0;
        for (der, c) in &chain_certs {
            if !find_cert_by_value(&session, der)?.is_empty() {
                continue;
            }
            let ca_label = format!("ca:{}", &hex(&Sha256::digest(der))[..16]);
            created.push(
                session
                    .create_object(&certificate_template(&ca_label, None, der, c)?)
                    .map_err(|e| {
                        ProvisionError::pkcs11(e, "storing a chain certificate", "user")
                    })?,
            );
            chain_stored += 1;
        }
        Ok(chain_stored)
    })();
    let chain_stored = match result {
        Ok(n) => n,
        Err(e) => {
            for h in created {
                let _ = session.destroy_object(h);
            }
            return Err(e);
        }
    };
    // Only once the new certificate is in place does the old one go.
    if !same {
        for h in existing {
            session
                .destroy_object(h)
                .map_err(|e| ProvisionError::pkcs11(e, "removing the old certificate", "user"))?;
        }
    }
    let mut warn = validity_problem(&leaf, now)
        .map(|p| format!("WARNING: the certificate {p} (stored because of --force)\n"))
        .unwrap_or_default();
    for w in &chain_warnings {
        warn.push_str(&format!("WARNING: {w} (stored because of --force)\n"));
    }
    let subject = leaf.tbs_certificate().subject().to_string();
    Ok(Report {
        text: format!(
            "{warn}{} certificate {subject} for key '{label}' on token '{}'{}\n",
            if same { "already stored:" } else { "stored" },
            opened.label,
            if chain_stored > 0 {
                format!(", plus {chain_stored} chain certificate(s)")
            } else {
                String::new()
            }
        ),
        json: json!({
            "label": label,
            "subject": subject,
            "already_stored": same,
            "chain_stored": chain_stored,
            "forced": validity_problem(&leaf, now).is_some() || !chain_warnings.is_empty(),
            "chain_warnings": chain_warnings,
            "certificate": keys::cert_summary(&leaf_der),
        }),
    })
}

/// The curve and public point of a PEM public key or certificate: the
/// audit key's public half, handed to an auditor as a file.
pub fn point_from_file(path: &Path) -> Result<(svs_hsm::Algorithm, Vec<u8>)> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ProvisionError::NotFound(format!("cannot read {}: {e}", path.display())))?;
    let algorithms = [svs_hsm::Algorithm::Sm2, svs_hsm::Algorithm::EcdsaP256];
    if text.contains("BEGIN CERTIFICATE") {
        let (der, _) = read_certificates(path)?.remove(0);
        return algorithms
            .into_iter()
            .find_map(|a| Some((a, cert_point(&der, a)?)))
            .ok_or_else(|| {
                ProvisionError::Certificate(format!(
                    "{}: not an SM2 or P-256 certificate",
                    path.display()
                ))
            });
    }
    let (label, der) = der::pem::decode_vec(text.trim().as_bytes()).map_err(|e| {
        ProvisionError::Usage(format!(
            "{}: not a PEM public key or certificate ({e})",
            path.display()
        ))
    })?;
    if label != "PUBLIC KEY" {
        return Err(ProvisionError::Usage(format!(
            "{}: a {label} block, expected PUBLIC KEY or CERTIFICATE",
            path.display()
        )));
    }
    algorithms
        .into_iter()
        .find_map(|a| Some((a, svs_hsm::keys::point_from_spki(&der, a)?)))
        .ok_or_else(|| {
            ProvisionError::Usage(format!(
                "{}: not an uncompressed SM2 or P-256 public key",
                path.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_files_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.pem");
        std::fs::write(
            &p,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = read_certificates(&p).unwrap_err();
        assert_eq!(e.exit_code(), 7);
        assert!(e.to_string().contains("bad.pem"), "{e}");
        std::fs::write(&p, "hello").unwrap();
        assert!(read_certificates(&p).is_err());
        std::fs::write(
            &p,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = read_certificates(&p).unwrap_err();
        assert!(e.to_string().contains("PRIVATE KEY"), "{e}");
        let e = read_certificates(&dir.path().join("missing.pem")).unwrap_err();
        assert_eq!(e.exit_code(), 3);
    }

    #[test]
    fn audit_key_files_name_their_curve() {
        let dir = tempfile::tempdir().unwrap();
        for (curve, algorithm) in [
            ("SM2", svs_hsm::Algorithm::Sm2),
            ("prime256v1", svs_hsm::Algorithm::EcdsaP256),
        ] {
            openssl(
                dir.path(),
                &format!("ecparam -name {curve} -genkey -noout -out {curve}.key"),
            );
            openssl(
                dir.path(),
                &format!("ec -in {curve}.key -pubout -out {curve}.pub"),
            );
            openssl(
                dir.path(),
                &format!(
                    "req -new -x509 -key {curve}.key -subj /CN=audit -days 1 -out {curve}.crt"
                ),
            );
            let (a, point) = point_from_file(&dir.path().join(format!("{curve}.pub"))).unwrap();
            assert_eq!((a, point.len(), point[0]), (algorithm, 65, 4));
            let from_cert = point_from_file(&dir.path().join(format!("{curve}.crt"))).unwrap();
            assert_eq!(from_cert, (algorithm, point));
        }
        openssl(
            dir.path(),
            "ecparam -name secp384r1 -genkey -noout -out p384.key",
        );
        openssl(dir.path(), "ec -in p384.key -pubout -out p384.pub");
        let e = point_from_file(&dir.path().join("p384.pub")).unwrap_err();
        assert!(
            e.to_string().contains("not an uncompressed SM2 or P-256"),
            "{e}"
        );
    }

    /// Runs openssl in `dir`; the tests that use it need it (as the
    /// enrollment tests do).
    fn openssl(dir: &Path, args: &str) {
        let st = std::process::Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(st.success(), "openssl {args}");
    }

    fn cert(dir: &Path, name: &str) -> Certificate {
        read_certificates(&dir.join(name)).unwrap().remove(0).1
    }

    fn chain(dir: &Path, names: &[&str]) -> Vec<(Vec<u8>, Certificate)> {
        names
            .iter()
            .flat_map(|n| read_certificates(&dir.join(n)).unwrap())
            .collect()
    }

    /// root (10 years) → inter (1 day) → leaf (30 days), all P-256; a
    /// second root with the same name but another key; an RSA root.
    fn pki(dir: &Path) {
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
        openssl(
            dir,
            &format!("req -x509 {ec} -keyout root.key -out root.pem -days 3650 -subj /CN=Root"),
        );
        openssl(
            dir,
            &format!("req -x509 {ec} -keyout fake.key -out fake.pem -days 3650 -subj /CN=Root"),
        );
        openssl(
            dir,
            "req -x509 -newkey rsa:2048 -nodes -keyout rsa.key -out rsa.pem -days 3650 -subj /CN=RsaRoot",
        );
        openssl(
            dir,
            &format!("req {ec} -keyout inter.key -out inter.csr -subj /CN=Inter"),
        );
        let ext = dir.join("ca.ext");
        std::fs::write(&ext, "basicConstraints=critical,CA:TRUE\n").unwrap();
        openssl(
            dir,
            "x509 -req -in inter.csr -CA root.pem -CAkey root.key -CAcreateserial -days 1 -extfile ca.ext -out inter.pem",
        );
        openssl(
            dir,
            "x509 -req -in inter.csr -CA rsa.pem -CAkey rsa.key -CAcreateserial -days 3650 -extfile ca.ext -out inter-rsa.pem",
        );
        openssl(
            dir,
            &format!("req {ec} -keyout leaf.key -out leaf.csr -subj /CN=Leaf"),
        );
        openssl(
            dir,
            "x509 -req -in leaf.csr -CA inter.pem -CAkey inter.key -CAcreateserial -days 30 -out leaf.pem",
        );
    }

    #[test]
    fn the_whole_chain_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        pki(d);
        let leaf = cert(d, "leaf.pem");
        let now = SystemTime::now();
        assert!(
            check_chain(&leaf, &chain(d, &["inter.pem", "root.pem"]), now, false)
                .unwrap()
                .is_empty()
        );
        // Beyond the direct issuer: the intermediate was not signed by this root.
        let e = check_chain(&leaf, &chain(d, &["inter.pem", "fake.pem"]), now, true).unwrap_err();
        assert!(e.to_string().contains("CN=Inter does not verify"), "{e}");
        // A chain certificate out of its validity period (the intermediate
        // lives one day; the leaf 30).
        let later = now + std::time::Duration::from_secs(3 * 86_400);
        let e =
            check_chain(&leaf, &chain(d, &["inter.pem", "root.pem"]), later, false).unwrap_err();
        assert!(
            e.to_string().contains("chain certificate CN=Inter expired"),
            "{e}"
        );
        assert_eq!(e.exit_code(), 7);
        let w = check_chain(&leaf, &chain(d, &["inter.pem", "root.pem"]), later, true).unwrap();
        assert_eq!(w.len(), 1, "{w:?}");
        // A signature that cannot be checked (RSA) is refused unless --force.
        let inter_rsa = cert(d, "inter-rsa.pem");
        let e = check_chain(&inter_rsa, &chain(d, &["rsa.pem"]), now, false).unwrap_err();
        assert!(e.to_string().contains("cannot be checked"), "{e}");
        let w = check_chain(&inter_rsa, &chain(d, &["rsa.pem"]), now, true).unwrap();
        assert!(w[0].contains("cannot be checked"), "{w:?}");
    }
}
