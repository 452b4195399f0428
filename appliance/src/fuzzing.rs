//! Entry points for the fuzz targets in `appliance/fuzz/` (and the unit
//! test that runs them over fixed inputs): every parser of outside input in
//! svsd, reachable without a listener or an HSM. None of these may panic.

use std::path::Path;
use std::time::{Duration, SystemTime};

use svs_hsm::Algorithm;
use svs_hsm::signature::SoftwareVerifier;

use crate::api::{self, Encoding, Input, SignRequest, VerifyRequest};
use crate::audit::{self, Checkpoint, CheckpointKey, VerifyOptions};
use crate::config::{self, Config, KeyExposure};
use crate::dn::DistinguishedName;
use crate::error::SvsError;
use crate::policy::ClientIdentity;

/// An SM2 public point (the generator) standing for an exposed key.
const SOME_POINT: [u8; 65] = {
    let mut p = [0u8; 65];
    p[0] = 4;
    let x = *b"\x32\xc4\xae\x2c\x1f\x19\x81\x19\x5f\x99\x04\x46\x6a\x39\xc9\x94\x8f\xe3\x0b\xbf\xf2\x66\x0b\xe1\x71\x5a\x45\x89\x33\x4c\x74\xc7";
    let y = *b"\xbc\x37\x36\xa2\xf4\xf6\x77\x9c\x59\xbd\xce\xe3\x6b\x69\x21\x53\xd0\xa9\x87\x7c\xc6\x2a\x47\x40\x02\xdf\x32\xe5\x21\x39\xf0\xa0";
    let mut i = 0;
    while i < 32 {
        p[1 + i] = x[i];
        p[33 + i] = y[i];
        i += 1;
    }
    p
};

/// What svsd does with an error it answers: its status, code and message.
fn answer(e: &SvsError) {
    let _ = e.wire();
    let _ = e.to_json();
    let _ = e.is_clients_doing();
}

/// A request body of `/v1/sign`, `/v1/verify` or their batch forms (the
/// first byte chooses: even a single request, odd a batch), decoded as
/// svsd's handlers decode it, each item as both a sign and a verify
/// request, down to the software verification of a decoded signature.
/// Returns how many items decoded as a sign and as a verify request.
pub fn api_body(data: &[u8]) -> (usize, usize) {
    let Some((choice, body)) = data.split_first() else {
        return (0, 0);
    };
    let items = if choice % 2 == 0 {
        api::request_value(body).map(|v| vec![v])
    } else {
        api::batch_items(body, 64)
    };
    let items = match items {
        Ok(items) => items,
        Err(e) => {
            answer(&e);
            return (0, 0);
        }
    };
    let verifier = SoftwareVerifier::new();
    let mut decoded = (0, 0);
    for item in items {
        match sign_item(&verifier, item.clone()) {
            Ok(()) => decoded.0 += 1,
            Err(e) => answer(&e),
        }
        match verify_item(&verifier, item) {
            Ok(()) => decoded.1 += 1,
            Err(e) => answer(&e),
        }
    }
    decoded
}

fn input_digest(
    verifier: &SoftwareVerifier,
    point: &[u8],
    input: &Input,
) -> Result<[u8; 32], SvsError> {
    let _ = input.audit_digest();
    Ok(match input {
        Input::Digest(d) => *d,
        Input::Data { data, id } => verifier
            .digest(Algorithm::Sm2, point, id, data)
            .map_err(SvsError::from)?,
    })
}

fn sign_item(verifier: &SoftwareVerifier, item: serde_json::Value) -> Result<(), SvsError> {
    let req: SignRequest = api::from_value(item)?;
    let input = req.input()?;
    input_digest(verifier, &SOME_POINT, &input)?;
    let _ = api::encode_signature(&[1; 64], req.encoding.unwrap_or_default());
    Ok(())
}

fn verify_item(verifier: &SoftwareVerifier, item: serde_json::Value) -> Result<(), SvsError> {
    let req: VerifyRequest = api::from_value(item)?;
    let point = match (&req.key, &req.public_key, &req.certificate) {
        (Some(_), None, None) => SOME_POINT.to_vec(),
        (None, Some(pk), None) => api::public_key_field(pk)?,
        (None, None, Some(c)) => api::certificate_field(c)?,
        _ => return Err(SvsError::InvalidRequest("no signer".into())),
    };
    let input = req.input()?;
    let raw = api::decode_signature(&req.signature, req.encoding.unwrap_or(Encoding::Der))?;
    let digest = input_digest(verifier, &point, &input)?;
    let _ = verifier.verify_digest(Algorithm::Sm2, &point, &digest, &raw);
    Ok(())
}

/// svsd's configuration file, and an entities file, as text (relative
/// paths in it name nothing). Returns whether each was accepted.
pub fn config_text(data: &[u8]) -> (bool, bool) {
    let Ok(text) = std::str::from_utf8(data) else {
        return (false, false);
    };
    let path = Path::new("/nonexistent/svs-fuzz/svsd.toml");
    let config = Config::from_toml(text, path).map_err(|e| e.to_string());
    let keys = [(
        "demo".to_string(),
        KeyExposure {
            object: "demo".into(),
        },
    )]
    .into_iter()
    .collect();
    let entities = config::entities_from_toml(text, path, &keys).map_err(|e| e.to_string());
    (config.is_ok(), entities.is_ok())
}

/// An RFC 4514 distinguished name as written in the configuration (an
/// entity's `subject`/`issuer`): parsed, and what svsd writes of it (in
/// messages and `entity list`) parsed back. Returns whether it parsed.
pub fn distinguished_name(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(dn) = DistinguishedName::parse(text) else {
        return false;
    };
    let _ = dn.quoted();
    let again = DistinguishedName::parse(&dn.to_string());
    assert!(
        again.as_ref() == Ok(&dn),
        "{text:?} written as {dn} reads back as {again:?}"
    );
    true
}

/// A client certificate as the TLS handshake hands it over (DER).
/// Returns whether it was read.
pub fn client_certificate(data: &[u8]) -> bool {
    let Ok(id) = ClientIdentity::from_der(data) else {
        return false;
    };
    let _ = id.check_valid_at(SystemTime::UNIX_EPOCH);
    let _ = id.subject.quoted();
    true
}

/// An audit trail file as svsd finds it at start (`dir` is emptied and
/// holds it as the only file): checked by `audit verify`, with and without
/// the audit key, then recovered as start-up recovers it. And, split at
/// NUL bytes, the audit anchor's values as read from the token. Returns
/// whether `audit verify` found the file intact.
pub fn audit_trail(dir: &Path, data: &[u8]) -> bool {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    if std::fs::write(dir.join("audit-00000000000000000001.jsonl"), data).is_err() {
        return false;
    }
    // The verifier reads a damaged newest file twice more, 20 ms apart (a
    // copy racing svsd's writes may be torn): the same damage is checked
    // once here, and the rest only when there is none.
    if audit::newest_shape(audit::without_zero_tail(data), 1).is_err() {
        let _ = audit::recover(dir);
        return false;
    }
    let intact = audit::verify_dir(dir, None).is_ok();
    let _ = audit::verify_dir_with(
        dir,
        &VerifyOptions {
            key: Some(CheckpointKey::sm2(&SOME_POINT)),
            checkpoint_interval: Some(Duration::from_secs(60)),
            from_seq: None,
            live_at: Some(SystemTime::now()),
        },
    );
    let _ = audit::recover(dir);
    let values: Vec<Vec<u8>> = data.split(|b| *b == 0).map(<[u8]>::to_vec).collect();
    let _ = audit::anchor_head(&values);
    let _ = Checkpoint::parse_message(data);
    intact
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPKI: &str = "MFkwEwYHKoZIzj0CAQYIKoEcz1UBgi0DQgAEMsSuLB8ZgRlfmQRGajnJlI/jC7/yZgvhcVpFiTNMdMe8Nzai9PZ3nFm9zuNraSFT0KmHfMYqR0AC3zLlITnwoA==";

    /// The fuzz entry points reach their deep paths with typical inputs
    /// and refuse broken ones.
    #[test]
    fn fuzz_entry_points_decode_typical_inputs_and_refuse_broken_ones() {
        let zeros = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        let sig = "MAYCAQECAQE=";
        let cases: [(String, (usize, usize)); 6] = [
            (r#"{"key":"demo","data":"aGk="}"#.into(), (1, 0)),
            (
                format!(r#"{{"key":"demo","data":"aGk=","signature":"{sig}"}}"#),
                (0, 1),
            ),
            (
                format!(r#"{{"public_key":"{SPKI}","digest":"{zeros}","signature":"{sig}"}}"#),
                (0, 1),
            ),
            (
                format!(r#"{{"public_key":"{SPKI}","digest":"AA==","signature":"{sig}"}}"#),
                (0, 0),
            ),
            ("{\"key\":".into(), (0, 0)),
            ("\u{feff}".into(), (0, 0)),
        ];
        for (body, decoded) in cases {
            let mut single = vec![0u8];
            single.extend_from_slice(body.as_bytes());
            assert_eq!(api_body(&single), decoded, "{body}");
        }
        let batch = format!(
            r#"{{"items":[{{"key":"demo","digest":"{zeros}"}},{{"certificate":"-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----","digest":"{zeros}","signature":"{sig}"}}]}}"#
        );
        assert_eq!(api_body(format!("\x01{batch}").as_bytes()), (1, 0));
        assert_eq!(api_body(b"\x01{\"items\":["), (0, 0));
        assert_eq!(api_body(b""), (0, 0));

        let entity = "[[entity]]\nname = \"a\"\nsubject = \"CN=a\"\nissuer = \"CN=ca\"\nkeys = [\"demo\"]\noperations = [\"sign\"]\n";
        assert_eq!(config_text(entity.as_bytes()), (false, true));
        assert_eq!(config_text(b"[[entity]\n"), (false, false));
        // A device or FIFO named as the entities file is refused, not read
        // until memory runs out.
        assert_eq!(
            config_text(b"entities_file = \"/dev/zero\"\n"),
            (false, false)
        );

        assert!(distinguished_name(br"CN=a\, b+O=x,C=CN"));
        assert!(distinguished_name(b"CN=#0c03616263"));
        assert!(!distinguished_name(br"CN=\E4\B8"));
        assert!(!distinguished_name(b"="));
        assert!(!client_certificate(&[0x30, 0x03, 0x02, 0x01, 0x01]));

        // A trail svsd wrote verifies; the same with a byte changed does not.
        let trail_dir = tempfile::tempdir().unwrap();
        let config =
            crate::config::AuditConfig::without_token(trail_dir.path().to_path_buf(), 1 << 20);
        let trail = audit::AuditTrail::open(&config, None).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(trail.note("fuzz", "a start".into()))
            .unwrap();
        trail.close();
        drop(trail);
        let (_, file) = audit::trail_files(trail_dir.path()).unwrap().remove(0);
        let written = audit::read_trail_file(&file).unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert!(audit_trail(dir.path(), &written));
        let mut changed = written.clone();
        changed[20] ^= 1;
        assert!(!audit_trail(dir.path(), &changed));
        assert!(!audit_trail(dir.path(), b"\x01garbage\n\0\0\0"));
    }
}
