//! `selftest`: the checks svsd runs before it serves (SM3 known answer, and
//! for each key a sign-through-the-token / verify-in-software pairwise test
//! with a negative check), plus the token's random number generator.

use serde_json::json;
use svs_hsm::selftest::{PAIRWISE_MESSAGE, check_pairwise, sm3_known_answer};

use crate::Report;
use crate::error::{ProvisionError, Result};
use crate::keys;
use crate::pin::PinReader;
use crate::token::Opened;

/// Runs the tests on `labels` (every key with a private key when empty).
pub fn run(opened: &Opened, pins: &mut PinReader, labels: &[String]) -> Result<Report> {
    let mut results: Vec<(String, std::result::Result<(), String>)> = Vec::new();
    results.push((
        "SM3 known answer (GB/T 32905 \"abc\")".into(),
        sm3_known_answer(),
    ));
    let session = opened.user_session(pins)?;
    let rng = (|| {
        let a = session.generate_random_vec(32).map_err(|e| e.to_string())?;
        let b = session.generate_random_vec(32).map_err(|e| e.to_string())?;
        if a == b || a.iter().all(|x| *x == 0) {
            Err("the token's RNG repeats itself or returns zeros".to_string())
        } else {
            Ok(())
        }
    })();
    results.push(("token random number generator".into(), rng));
    let all = keys::discover(&session, &opened.profile)?;
    let chosen: Vec<&keys::Key> = if labels.is_empty() {
        all.iter().filter(|k| k.private == Some(true)).collect()
    } else {
        let mut v = Vec::new();
        for l in labels {
            v.push(all.iter().find(|k| &k.label == l).ok_or_else(|| {
                ProvisionError::NotFound(format!(
                    "no key labelled '{l}' on token '{}'",
                    opened.label
                ))
            })?);
        }
        v
    };
    let verifier = svs_hsm::signature::SoftwareVerifier::new();
    for k in chosen {
        let outcome = (|| {
            let digest = keys::digest_for(k, PAIRWISE_MESSAGE).map_err(|e| e.to_string())?;
            let raw = keys::sign_digest(&session, &opened.profile, k, &digest)
                .map_err(|e| e.to_string())?;
            check_pairwise(&verifier, k.algorithm, &k.point, &digest, &raw)
        })();
        results.push((format!("key '{}' pairwise sign/verify", k.label), outcome));
    }
    let mut text = String::new();
    let mut failed = Vec::new();
    for (name, r) in &results {
        match r {
            Ok(()) => text.push_str(&format!("PASS  {name}\n")),
            Err(e) => {
                text.push_str(&format!("FAIL  {name}: {e}\n"));
                failed.push(name.clone());
            }
        }
    }
    if !failed.is_empty() {
        return Err(ProvisionError::SelftestFailed(format!(
            "{text}self-test FAILED ({}); do not put this token into service: check the module and the token with the vendor",
            failed.join("; ")
        )));
    }
    Ok(Report {
        text,
        json: json!({
            "passed": true,
            "tests": results.iter().map(|(n, _)| json!({"name": n, "passed": true})).collect::<Vec<_>>(),
        }),
    })
}
