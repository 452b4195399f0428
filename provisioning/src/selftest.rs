//! `selftest`: the checks svsd runs before it serves (SM3 known answer, and
//! for each key a sign-through-the-token / verify-in-software pairwise test
//! with a negative check), plus the token's random number generator.

use serde_json::json;
use sm3::{Digest, Sm3};

use crate::Report;
use crate::error::{ProvisionError, Result};
use crate::keys;
use crate::pin::PinReader;
use crate::token::Opened;

/// GB/T 32905 example 1: SM3("abc").
const SM3_ABC: [u8; 32] = [
    0x66, 0xc7, 0xf0, 0xf4, 0x62, 0xee, 0xed, 0xd9, 0xd1, 0xf2, 0xd4, 0x6b, 0xdc, 0x10, 0xe4, 0xe2,
    0x41, 0x67, 0xc4, 0x87, 0x5c, 0xf2, 0xf7, 0xa2, 0x29, 0x7d, 0xa0, 0x2b, 0x8f, 0x4b, 0xa8, 0xe0,
];

/// Runs the tests on `labels` (every key with a private key when empty).
pub fn run(opened: &Opened, pins: &mut PinReader, labels: &[String]) -> Result<Report> {
    let mut results: Vec<(String, std::result::Result<(), String>)> = Vec::new();
    let sm3_ok = <[u8; 32]>::from(Sm3::digest(b"abc")) == SM3_ABC;
    results.push((
        "SM3 known answer (GB/T 32905 \"abc\")".into(),
        if sm3_ok {
            Ok(())
        } else {
            Err("wrong digest".into())
        },
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
    let message = b"SVS self-test: SM2 pairwise consistency";
    for k in chosen {
        let outcome = (|| {
            let digest = keys::digest_for(k, message).map_err(|e| e.to_string())?;
            // sign_digest verifies the token's signature in software.
            let raw = keys::sign_digest(&session, &opened.profile, k, &digest)
                .map_err(|e| e.to_string())?;
            let mut wrong = digest;
            wrong[0] ^= 1;
            if svs_hsm::signature::SoftwareVerifier::new()
                .verify_digest(k.algorithm, &k.point, &wrong, &raw)
                .is_ok()
            {
                return Err("verification accepts a wrong digest".to_string());
            }
            Ok(())
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
