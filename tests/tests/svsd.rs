//! End-to-end tests: the real svsd binary on a `--dev` installation
//! (embedded soft token, dev PKI), driven over HTTPS with client certificates.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use svs_e2e::*;
use tokio::io::AsyncWriteExt;

const HELLO: &str = "aGVsbG8="; // "hello"

fn entity(name: &str, fp: &str, keys: &[&str], ops: &[&str], extra: &str) -> String {
    format!(
        "[[entity]]\nname = \"{name}\"\ncertificate_sha256 = \"{fp}\"\nkeys = {keys:?}\noperations = {ops:?}\n{extra}\n"
    )
}

/// Saves `issued` as client certificate `name`, the certificates of
/// `chain` (PEM) after it: the client sends them all.
fn with_chain(
    install: &Install,
    name: &str,
    issued: &svs_appliance::tls::devpki::Issued,
    chain: &[&str],
) -> ClientCert {
    let (cert, key) = svs_appliance::tls::devpki::save_issued(&install.dir, name, issued).unwrap();
    std::fs::write(&cert, format!("{}{}", issued.cert_pem, chain.concat())).unwrap();
    ClientCert {
        cert,
        key,
        sha256: String::new(),
    }
}

fn expose_other(install: &Install) {
    install.edit_config(|t| t.replace("[keys]\n", "[keys]\nother = { object = \"other\" }\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_and_every_bad_input() {
    let install = Install::new();
    install.edit_config(|t| {
        t.replace(
            "max_body_bytes = 1048576",
            "max_body_bytes = 4096\nheader_timeout_ms = 1000\nbody_timeout_ms = 1000",
        )
        .replace("max_batch_items = 256", "max_batch_items = 4")
    });
    let d = install.start().await;
    for h2 in [false, true] {
        let mut c = d.client(h2).await;
        // sign: data (DER default, raw), digest, custom id.
        let (s, _, v) = c
            .post("/v1/sign", &json!({"key":"demo","data":HELLO}))
            .await
            .unwrap();
        assert_eq!((s, v["encoding"].as_str()), (200, Some("der")), "{v}");
        let der_sig = v["signature"].as_str().unwrap().to_owned();
        let (s, _, v) = c
            .post(
                "/v1/sign",
                &json!({"key":"demo","data":HELLO,"encoding":"raw","id":"alice@example"}),
            )
            .await
            .unwrap();
        assert_eq!(s, 200);
        assert_eq!(unb64(v["signature"].as_str().unwrap()).len(), 64);
        let raw_alice = v["signature"].as_str().unwrap().to_owned();
        let (s, _, v) = c
            .post("/v1/sign", &json!({"key":"demo","digest":b64(&[7u8; 32])}))
            .await
            .unwrap();
        assert_eq!(s, 200, "{v}");
        let digest_sig = v["signature"].as_str().unwrap().to_owned();

        // verify: by key, by public key, true and false answers.
        let ok = |v: &Value| v["valid"].as_bool();
        let (s, _, v) = c
            .post(
                "/v1/verify",
                &json!({"key":"demo","data":HELLO,"signature":der_sig}),
            )
            .await
            .unwrap();
        assert_eq!((s, ok(&v)), (200, Some(true)));
        let (s, _, v) = c
            .post(
                "/v1/verify",
                &json!({"key":"demo","data":b64(b"hullo"),"signature":der_sig}),
            )
            .await
            .unwrap();
        assert_eq!((s, ok(&v)), (200, Some(false)));
        let (_, _, v) = c
            .post("/v1/verify", &json!({"key":"demo","data":HELLO,"id":"alice@example","encoding":"raw","signature":raw_alice}))
            .await
            .unwrap();
        assert_eq!(ok(&v), Some(true));
        let (_, _, v) = c
            .post(
                "/v1/verify",
                &json!({"key":"demo","digest":b64(&[7u8; 32]),"signature":digest_sig}),
            )
            .await
            .unwrap();
        assert_eq!(ok(&v), Some(true));
        let (s, _, k) = c.get("/v1/keys/demo").await.unwrap();
        assert_eq!(s, 200);
        let pem = k["public_key"].as_str().unwrap();
        let (_, _, v) = c
            .post(
                "/v1/verify",
                &json!({"public_key":pem,"data":HELLO,"signature":der_sig}),
            )
            .await
            .unwrap();
        assert_eq!(ok(&v), Some(true));

        // batches keep order; each item has its own answer or error.
        let (s, _, v) = c
            .post("/v1/sign/batch", &json!({"items":[{"key":"demo","data":HELLO},{"key":"nope","data":HELLO},{"key":"demo","digest":"AAAA"}]}))
            .await
            .unwrap();
        assert_eq!(s, 200);
        let r = v["results"].as_array().unwrap();
        assert!(r[0]["signature"].is_string());
        assert_eq!(r[1]["error"]["code"], "unknown_key");
        assert_eq!(r[2]["error"]["code"], "invalid_digest");
        let (s, _, v) = c
            .post("/v1/verify/batch", &json!({"items":[{"key":"demo","data":HELLO,"signature":der_sig},{"key":"demo","data":"AA==","signature":der_sig},{"key":"demo"}]}))
            .await
            .unwrap();
        assert_eq!(s, 200);
        let r = v["results"].as_array().unwrap();
        assert_eq!(
            (r[0]["valid"].as_bool(), r[1]["valid"].as_bool()),
            (Some(true), Some(false))
        );
        assert_eq!(r[2]["error"]["code"], "malformed_request");
        // A batch item with its fields by position is refused on its own.
        let (s, _, v) = c
            .post(
                "/v1/sign/batch",
                &json!({"items":[["demo", HELLO], {"key":"demo","data":HELLO}]}),
            )
            .await
            .unwrap();
        assert_eq!(s, 200);
        assert_eq!(v["results"][0]["error"]["code"], "malformed_request");
        assert!(v["results"][1]["signature"].is_string());

        // keys, probes.
        let (s, _, v) = c.get("/v1/keys").await.unwrap();
        assert_eq!((s, v["keys"][0]["name"].as_str()), (200, Some("demo")));
        assert_eq!(c.get("/healthz").await.unwrap().0, 200);
        assert_eq!(c.get("/readyz").await.unwrap().0, 200);

        // Bad input: each a clear 4xx with its code.
        let off_curve = {
            let mut spki = unb64(
                &pem.lines()
                    .filter(|l| !l.starts_with("-----"))
                    .collect::<String>(),
            );
            let n = spki.len();
            spki[n - 1] ^= 1;
            b64(&spki)
        };
        // A well-formed SPKI whose point is the SEC1 encoding of the point
        // at infinity (the single byte 0): the demo key's algorithm
        // identifier, then BIT STRING { unused bits 0, 0x00 }.
        let infinity = {
            let spki = unb64(
                &pem.lines()
                    .filter(|l| !l.starts_with("-----"))
                    .collect::<String>(),
            );
            assert_eq!((spki[0], spki[2]), (0x30, 0x30), "SPKI layout");
            let alg = &spki[2..4 + usize::from(spki[3])];
            let mut der = vec![0x30, u8::try_from(alg.len() + 4).unwrap()];
            der.extend_from_slice(alg);
            der.extend_from_slice(&[0x03, 0x02, 0x00, 0x00]);
            der
        };
        let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
            ("/v1/sign", b"{not json".to_vec(), 400, "malformed_request"),
            // Fields by position, not by name: not a request.
            (
                "/v1/sign",
                br#"["demo","aGVsbG8="]"#.to_vec(),
                400,
                "malformed_request",
            ),
            (
                "/v1/sign",
                br#"{"key":"demo","data":"aGVsbG8=","extra":1}"#.to_vec(),
                400,
                "malformed_request",
            ),
            (
                "/v1/sign",
                br#"{"key":"demo","data":"***"}"#.to_vec(),
                400,
                "invalid_base64",
            ),
            (
                "/v1/sign",
                br#"{"key":"demo","digest":"AAAA"}"#.to_vec(),
                400,
                "invalid_digest",
            ),
            (
                "/v1/sign",
                br#"{"key":"demo","data":"aGVsbG8=","encoding":"pem"}"#.to_vec(),
                400,
                "malformed_request",
            ),
            (
                "/v1/sign",
                br#"{"key":"nope","data":"aGVsbG8="}"#.to_vec(),
                404,
                "unknown_key",
            ),
            (
                "/v1/verify",
                json!({"key":"demo","data":HELLO,"signature":b64(&[1u8; 64])})
                    .to_string()
                    .into_bytes(),
                400,
                "invalid_signature",
            ),
            (
                "/v1/verify",
                json!({"public_key":off_curve,"data":HELLO,"signature":der_sig})
                    .to_string()
                    .into_bytes(),
                400,
                "invalid_public_key",
            ),
            (
                "/v1/verify",
                json!({"public_key":b64(&infinity),"data":HELLO,"signature":der_sig})
                    .to_string()
                    .into_bytes(),
                400,
                "invalid_public_key",
            ),
            (
                "/v1/verify",
                json!({"certificate":b64(b"garbage"),"data":HELLO,"signature":der_sig})
                    .to_string()
                    .into_bytes(),
                400,
                "invalid_certificate",
            ),
            (
                "/v1/verify",
                json!({"key":"demo","public_key":pem,"data":HELLO,"signature":der_sig})
                    .to_string()
                    .into_bytes(),
                400,
                "invalid_request",
            ),
            (
                "/v1/sign",
                json!({"key":"demo","data":b64(&[0u8; 8192])})
                    .to_string()
                    .into_bytes(),
                413,
                "body_too_large",
            ),
            (
                "/v1/sign/batch",
                json!({"items":[{},{},{},{},{}]}).to_string().into_bytes(),
                413,
                "batch_too_large",
            ),
            ("/v1/nothing", b"{}".to_vec(), 404, "not_found"),
            // A name given twice: a reader taking the first value would
            // see another request than a parser taking the last.
            (
                "/v1/sign",
                br#"{"key":"demo","data":"aGVsbG8=","data":"d29ybGQ="}"#.to_vec(),
                400,
                "malformed_request",
            ),
            (
                "/v1/sign",
                br#"{"key":"nope","key":"demo","data":"aGVsbG8="}"#.to_vec(),
                400,
                "malformed_request",
            ),
            (
                "/v1/sign/batch",
                br#"{"items":[{"key":"demo","data":"aGVsbG8=","encoding":"der","encoding":"raw"}]}"#
                    .to_vec(),
                400,
                "malformed_request",
            ),
            // A string is documented: no enum-as-map, no null for absent.
            (
                "/v1/sign",
                br#"{"key":"demo","data":"aGVsbG8=","encoding":{"raw":null}}"#.to_vec(),
                400,
                "malformed_request",
            ),
            (
                "/v1/sign",
                br#"{"key":"demo","data":"aGVsbG8=","id":null}"#.to_vec(),
                400,
                "malformed_request",
            ),
            (
                "/v1/verify",
                json!({"key":"demo","certificate":null,"data":HELLO,"signature":der_sig})
                    .to_string()
                    .into_bytes(),
                400,
                "malformed_request",
            ),
            // PEM with another label than the field's: not base64 trouble.
            (
                "/v1/verify",
                json!({"certificate":pem,"data":HELLO,"signature":der_sig})
                    .to_string()
                    .into_bytes(),
                400,
                "invalid_certificate",
            ),
            (
                "/v1/verify",
                json!({"public_key":pem.replace("PUBLIC KEY", "EC PUBLIC KEY"),"data":HELLO,"signature":der_sig})
                    .to_string()
                    .into_bytes(),
                400,
                "invalid_public_key",
            ),
            (
                "/v1/verify",
                json!({"certificate":"not base64!","data":HELLO,"signature":der_sig})
                    .to_string()
                    .into_bytes(),
                400,
                "invalid_base64",
            ),
        ];
        for (path, body, status, code) in cases {
            let (s, _, v) = c
                .request("POST", path, Some("application/json"), body)
                .await
                .unwrap();
            assert_eq!(
                (s, v["error"]["code"].as_str()),
                (status, Some(code)),
                "{path} {v}"
            );
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
        // The name given twice is said, its values are not.
        let (_, _, v) = c
            .request(
                "POST",
                "/v1/sign",
                Some("application/json"),
                br#"{"key":"demo","data":"aGVsbG8=","data":"d29ybGQ="}"#.to_vec(),
            )
            .await
            .unwrap();
        assert_eq!(
            v["error"]["message"],
            "malformed request: duplicate field `data`"
        );
        let (s, h, v) = c.get("/v1/sign").await.unwrap();
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (405, Some("method_not_allowed"))
        );
        assert_eq!(h["allow"], "POST");
        let (s, h, _) = c
            .request("DELETE", "/v1/keys/demo", None, Vec::new())
            .await
            .unwrap();
        assert_eq!((s, h["allow"].to_str().unwrap()), (405, "GET, HEAD"));
        let (s, _, v) = c
            .request("POST", "/v1/sign", Some("text/plain"), b"{}".to_vec())
            .await
            .unwrap();
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (415, Some("unsupported_media_type"))
        );
        // The connection is still good after all that.
        assert_eq!(c.get("/healthz").await.unwrap().0, 200);
    }

    // Certificates from the dev CA verify as certificate input (ECDSA → refused as not SM2).
    let mut c = d.client(false).await;
    let client_pem = std::fs::read_to_string(install.dir.join("client.pem")).unwrap();
    let (s, _, v) = c
        .post(
            "/v1/verify",
            &json!({"certificate":client_pem,"data":HELLO,"signature":b64(&[0x30, 0])}),
        )
        .await
        .unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_certificate")),
        "{v}"
    );

    // Slow clients: headers not finished in time → 408 or closed; body not finished → 408.
    let cfg = tls_config(&d.ca, Some(&d.client), false);
    let mut t = tls_stream(d.addr, cfg.clone()).await.unwrap();
    t.write_all(b"POST /v1/sign HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut t, &mut buf),
    )
    .await;
    assert!(
        r.is_ok(),
        "a client that never finishes its headers is cut off"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    let mut t = tls_stream(d.addr, cfg).await.unwrap();
    t.write_all(b"POST /v1/sign HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"key\"").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut t, &mut buf),
    )
    .await
    .unwrap()
    .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"));

    // A head hyper cannot parse is answered by hyper itself, before svsd
    // sees a request: a bare status, no JSON envelope (docs/svsd.md).
    let mut t = tls_stream(d.addr, tls_config(&d.ca, Some(&d.client), false))
        .await
        .unwrap();
    t.write_all(b"POST /v1/sign HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 99999999999999999999999\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    // Whether the close is clean does not matter here, only the answer.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut t, &mut buf),
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&buf).to_lowercase();
    assert!(
        text.starts_with("http/1.1 400") && text.contains("content-length: 0\r\n"),
        "{text}"
    );

    // Still alive and ready.
    let mut c = d.client(true).await;
    assert_eq!(c.get("/readyz").await.unwrap().0, 200);
    // The values of a name given twice went nowhere.
    let mut trail = String::new();
    for f in std::fs::read_dir(install.audit_dir()).unwrap() {
        trail += &std::fs::read_to_string(f.unwrap().path()).unwrap_or_default();
    }
    for text in [trail, d.log_text()] {
        assert!(!text.contains("d29ybGQ="), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorisation_matrix_and_unknown_clients() {
    let install = Install::new();
    expose_other(&install);
    let dev = install.dev_client();
    let signer = install.issue_client("signer");
    let verifier = install.issue_client("verifier");
    let stranger = install.issue_client("stranger");
    let by_subject = install.issue_client("by-subject");
    // by-subject's name under a forged CA name: a sub-CA named like the dev
    // CA, issued by a CA the client CA bundle trusts (the dev CA itself
    // here; another tenant's CA would do). The client sends it along, so
    // the chain ends at the dev CA and the handshake passes.
    let dev_ca =
        svs_appliance::tls::devpki::DevCa::load(&install.dir, svs_appliance::dev::DEV_CA_NAME)
            .unwrap();
    let forged_ca = dev_ca.sub_ca(svs_appliance::dev::DEV_CA_NAME).unwrap();
    let forged = with_chain(
        &install,
        "forged",
        &forged_ca.client("by-subject").unwrap(),
        &[&forged_ca.cert_pem],
    );
    // The genuine one may send the dev CA's certificate along.
    let by_subject_chained = with_chain(
        &install,
        "by-subject-chained",
        &dev_ca.client("by-subject").unwrap(),
        &[&dev_ca.cert_pem],
    );
    install.write_entities(&format!(
        "{}{}{}[[entity]]\nname = \"subj\"\nsubject = \"CN=by-subject,O=SVS development\"\nissuer = \"CN=SVS dev CA,O=SVS development\"\nkeys = [\"other\"]\noperations = [\"sign\"]\n",
        entity("dev-client", &dev.sha256, &["demo"], &["sign", "verify"], ""),
        entity("signer", &signer.sha256, &["demo"], &["sign"], ""),
        entity("verifier", &verifier.sha256, &["demo", "other"], &["verify"], ""),
    ));
    let d = install.start().await;
    let sig = {
        let mut c = d.client(false).await;
        c.post("/v1/sign", &json!({"key":"demo","data":HELLO}))
            .await
            .unwrap()
            .2["signature"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // (client, key, op) → expected status and error code
    const KEY: Option<&str> = Some("key_not_allowed");
    const OP: Option<&str> = Some("operation_not_allowed");
    let matrix: Vec<(&ClientCert, &str, &str, u16, Option<&str>)> = vec![
        (&dev, "demo", "sign", 200, None),
        (&dev, "demo", "verify", 200, None),
        (&dev, "other", "sign", 403, KEY),
        (&dev, "other", "verify", 403, KEY),
        (&dev, "missing", "sign", 404, Some("unknown_key")),
        (&signer, "demo", "sign", 200, None),
        (&signer, "demo", "verify", 403, OP),
        (&signer, "other", "sign", 403, KEY),
        (&verifier, "demo", "sign", 403, OP),
        (&verifier, "demo", "verify", 200, None),
        (&verifier, "other", "verify", 200, None),
        (&verifier, "other", "sign", 403, OP),
        (&by_subject, "other", "sign", 200, None),
        (&by_subject, "demo", "sign", 403, KEY),
        (&by_subject_chained, "other", "sign", 200, None),
        // Same subject, same issuer name, not issued by the dev CA: nobody.
        (&forged, "other", "sign", 401, Some("unauthenticated")),
        (&forged, "demo", "verify", 401, Some("unauthenticated")),
        (&stranger, "demo", "sign", 401, Some("unauthenticated")),
        (&stranger, "demo", "verify", 401, Some("unauthenticated")),
    ];
    for (who, key, op, want, code) in matrix {
        let mut c = Client::connect(d.addr, &d.ca, who, false).await.unwrap();
        let body = if op == "sign" {
            json!({"key":key,"data":HELLO})
        } else {
            json!({"key":key,"data":HELLO,"signature":sig})
        };
        let (s, _, v) = c.post(&format!("/v1/{op}"), &body).await.unwrap();
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (want, code),
            "{} {key} {op}: {v}",
            who.cert.display()
        );
    }
    // GET /v1/keys lists only the keys an entity may use.
    let mut c = Client::connect(d.addr, &d.ca, &verifier, true)
        .await
        .unwrap();
    let (_, _, v) = c.get("/v1/keys").await.unwrap();
    let names: Vec<_> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["demo", "other"]);
    let mut c = Client::connect(d.addr, &d.ca, &signer, true).await.unwrap();
    assert_eq!(c.get("/v1/keys/other").await.unwrap().0, 403);
    assert_eq!(c.get("/v1/keys/missing").await.unwrap().0, 404);

    // No client certificate, or one from another CA: the handshake refuses.
    let no_cert = tls_config(&d.ca, None, false);
    let refused = match Client::connect_with(d.addr, no_cert, false).await {
        Err(_) => true,
        Ok(mut c) => c.get("/healthz").await.is_err(),
    };
    assert!(refused, "a client without a certificate must be refused");
    let other_ca = svs_appliance::tls::devpki::DevCa::generate("Rogue CA").unwrap();
    let rogue = other_ca.client("dev-client").unwrap();
    let (cert, key) =
        svs_appliance::tls::devpki::save_issued(&install.dir, "rogue", &rogue).unwrap();
    let rogue = ClientCert {
        cert,
        key,
        sha256: String::new(),
    };
    let refused = match Client::connect(d.addr, &d.ca, &rogue, false).await {
        Err(_) => true,
        Ok(mut c) => c.get("/healthz").await.is_err(),
    };
    assert!(refused, "a certificate from another CA must be refused");

    // An issuer that is no certificate of the client CA bundle (an
    // intermediate below it, say) is refused on SIGHUP, the entity named;
    // the previous configuration keeps serving.
    install.write_entities(&format!(
        "{}[[entity]]\nname = \"below\"\nsubject = \"CN=by-subject,O=SVS development\"\nissuer = \"CN=Issuing CA,O=SVS development\"\nkeys = [\"other\"]\noperations = [\"sign\"]\n",
        entity("dev-client", &dev.sha256, &["demo"], &["sign", "verify"], ""),
    ));
    d.signal("HUP");
    let mut refused = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if d.log_text().contains("reload refused") {
            refused = true;
            break;
        }
    }
    let log = d.log_text();
    assert!(refused, "{log}");
    assert!(
        log.contains(r#"entity "below": issuer "CN=Issuing CA,O=SVS development""#),
        "{log}"
    );
    let mut c = Client::connect(d.addr, &d.ca, &by_subject, false)
        .await
        .unwrap();
    let (s, _, _) = c
        .post("/v1/sign", &json!({"key":"other","data":HELLO}))
        .await
        .unwrap();
    assert_eq!(s, 200);
}

/// Runs openssl in `dir`; its stdout.
fn openssl(dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_and_issuer_written_as_openssl_prints_them_match() {
    if !have_tool(Command::new("openssl").arg("version"), "openssl") {
        return;
    }
    let install = Install::new();
    let dir = install.dir.as_path();
    // A client CA with a Chinese name, and under it a client whose subject
    // has a Chinese O and a multi-valued RDN, as a using unit's CA makes
    // them (UTF8String).
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "cn-ca-key.pem",
            "-out",
            "cn-ca.pem",
            "-days",
            "30",
            "-utf8",
            "-subj",
            "/O=中国银行/CN=中国银行客户端CA",
        ],
    );
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "bank-m-key.pem",
            "-out",
            "bank-m.csr",
            "-utf8",
            "-multivalue-rdn",
            "-subj",
            "/O=中国银行/UID=42+CN=bank-m",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "bank-m.csr",
            "-CA",
            "cn-ca.pem",
            "-CAkey",
            "cn-ca-key.pem",
            "-CAcreateserial",
            "-days",
            "30",
            "-sha256",
            "-extfile",
            "client.ext",
            "-out",
            "bank-m.pem",
        ],
    );
    // The names exactly as the documentation says to get them.
    let printed = |what: &str| {
        let out = openssl(
            dir,
            &[
                "x509",
                "-in",
                "bank-m.pem",
                "-noout",
                what,
                "-nameopt",
                "RFC2253",
            ],
        );
        let (_, dn) = out.trim().split_once('=').unwrap();
        dn.to_owned()
    };
    let (subject, issuer) = (printed("-subject"), printed("-issuer"));
    assert_eq!(
        subject,
        r"UID=42+CN=bank-m,O=\E4\B8\AD\E5\9B\BD\E9\93\B6\E8\A1\8C"
    );
    assert!(issuer.starts_with(r"CN=\E4\B8\AD"), "{issuer}");
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
        std::fs::read_to_string(dir.join("cn-ca.pem")).unwrap()
    );
    std::fs::write(dir.join("clients.pem"), bundle).unwrap();
    install.edit_config(|t| t.replace("client_ca = \"ca.pem\"", "client_ca = \"clients.pem\""));
    let dev = install.dev_client();
    let dev_entity = entity(
        "dev-client",
        &dev.sha256,
        &["demo"],
        &["sign", "verify"],
        "",
    );
    let by_name = |name: &str, subject: &str, issuer: &str| {
        format!(
            "[[entity]]\nname = \"{name}\"\nsubject = '{subject}'\nissuer = '{issuer}'\nkeys = [\"demo\"]\noperations = [\"sign\"]\n"
        )
    };
    let check_config = || {
        let out = Command::new(svsd_bin())
            .args(["--check-config", "--allow-root", "--config"])
            .arg(&install.config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The same names in UTF-8 and another RDN order are the same client:
    // two entities claiming it are refused.
    install.write_entities(&format!(
        "{dev_entity}{}{}",
        by_name("bank-m", &subject, &issuer),
        by_name(
            "bank-m-raw",
            "CN=bank-m+UID=42,O=中国银行",
            "CN=中国银行客户端CA,O=中国银行"
        ),
    ));
    let (code, log) = check_config();
    assert_eq!(code, Some(78), "{log}");
    assert!(
        log.contains(r#"entities "bank-m" and "bank-m-raw" match the same client certificate"#),
        "{log}"
    );
    install.write_entities(&format!(
        "{dev_entity}{}",
        by_name("bank-m", &subject, &issuer)
    ));
    let (code, log) = check_config();
    assert_eq!(code, Some(0), "{log}");

    let d = install.start().await;
    let (cert, key) = (dir.join("bank-m.pem"), dir.join("bank-m-key.pem"));
    let bank_m = ClientCert {
        cert,
        key,
        sha256: String::new(),
    };
    let mut c = Client::connect(d.addr, &d.ca, &bank_m, false)
        .await
        .unwrap();
    let (s, _, v) = c
        .post("/v1/sign", &json!({"key":"demo","data":HELLO}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_suspension_and_refused_reload() {
    let install = Install::new();
    let dev = install.dev_client();
    let limited = install.issue_client("limited");
    let entities = |status: &str| {
        format!(
            "{}{}",
            entity(
                "dev-client",
                &dev.sha256,
                &["demo"],
                &["sign", "verify"],
                ""
            ),
            entity(
                "limited",
                &limited.sha256,
                &["demo"],
                &["sign"],
                &format!("status = \"{status}\"\nrate = {{ per_second = 1.0, burst = 3 }}")
            ),
        )
    };
    install.write_entities(&entities("active"));
    let d = install.start().await;
    let mut c = Client::connect(d.addr, &d.ca, &limited, false)
        .await
        .unwrap();
    let sign = json!({"key":"demo","data":HELLO});
    for _ in 0..3 {
        assert_eq!(c.post("/v1/sign", &sign).await.unwrap().0, 200);
    }
    let (s, h, v) = c.post("/v1/sign", &sign).await.unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("rate_limited"))
    );
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry));

    // Suspension takes effect on SIGHUP, on the existing connection too.
    install.write_entities(&entities("suspended"));
    d.signal("HUP");
    let mut suspended = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (s, h, v) = c.post("/v1/sign", &sign).await.unwrap();
        if s == 403 {
            assert_eq!(v["error"]["code"], "entity_suspended");
            // ...and the suspended entity's connection is closed.
            assert_eq!(h["connection"], "close");
            suspended = true;
            break;
        }
    }
    assert!(suspended);
    assert!(
        c.post("/v1/sign", &sign).await.is_err(),
        "connection closed"
    );
    let mut c = Client::connect(d.addr, &d.ca, &limited, false)
        .await
        .unwrap();
    let reloads = wait_for_reload_metrics(&install, (1, 0, 1)).await;
    assert!(reloads.contains("svs_config_reloads_total"), "{reloads}");
    // The suspension is in the trail and in the metrics, by name.
    let active =
        |page: &str, name: &str| sample(page, &format!("svs_entity_active{{entity=\"{name}\"}}"));
    assert_eq!(active(&reloads, "limited"), Some(0.0), "{reloads}");
    assert_eq!(active(&reloads, "dev-client"), Some(1.0), "{reloads}");
    assert_eq!(
        notes(&install, "reload"),
        ["2 entities; suspended: limited"]
    );
    // It names the entities file it read, by digest (svs-provision
    // confirms its edits by it).
    let read = audit_records(&install)
        .into_iter()
        .filter(|r| r["type"] == "reload")
        .map(|r| r["detail"].as_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    let file = std::fs::read(install.dir.join("entities.toml")).unwrap();
    assert_eq!(
        svs_appliance::reload::entities_sha256_of(&read[0]),
        Some(svs_hsm::keys::hex(&<sha2::Sha256 as sha2::Digest>::digest(&file)).as_str()),
        "{read:?}"
    );

    // An invalid new config is refused; the old one keeps serving, and
    // alerting sees it: the suspension it carried was not applied.
    install.write_entities("[[entity]]\nname = \"broken\"\nbogus = true\n");
    d.signal("HUP");
    let page = wait_for_reload_metrics(&install, (1, 1, 0)).await;
    assert_eq!(active(&page, "limited"), Some(0.0), "{page}");
    assert_eq!(notes(&install, "reload").len(), 1, "nothing recorded");
    let mut dc = d.client(false).await;
    assert_eq!(dc.post("/v1/sign", &sign).await.unwrap().0, 200);
    assert!(d.log_text().contains("reload refused"), "{}", d.log_text());
    assert_eq!(c.post("/v1/sign", &sign).await.unwrap().0, 403);

    // Fixed: the next reload is applied and the gauge is back at 1.
    install.write_entities(&entities("active"));
    d.signal("HUP");
    let page = wait_for_reload_metrics(&install, (2, 1, 1)).await;
    assert_eq!(active(&page, "limited"), Some(1.0), "{page}");
    assert_eq!(
        notes(&install, "reload"),
        [
            "2 entities; suspended: limited",
            "2 entities; resumed: limited"
        ]
    );
    let mut c = Client::connect(d.addr, &d.ca, &limited, false)
        .await
        .unwrap();
    // Active again; its bucket, carried over by name, may still be empty.
    let (s, _, v) = c.post("/v1/sign", &sign).await.unwrap();
    assert!(matches!(s, 200 | 429), "{s} {v}");
}

/// Polls the metrics page until `svs_config_reloads_total` applied and
/// refused and `svs_config_last_reload_successful` are `want`; returns
/// the page.
async fn wait_for_reload_metrics(install: &Install, want: (u64, u64, u64)) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let page = scrape_metrics(install.metrics_addr).await;
        let value = |series| sample(&page, series).map(|v| v as u64);
        let got = (
            value(r#"svs_config_reloads_total{result="applied"}"#),
            value(r#"svs_config_reloads_total{result="refused"}"#),
            value("svs_config_last_reload_successful"),
        );
        if got == (Some(want.0), Some(want.1), Some(want.2)) {
            return page;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reload metrics {got:?}, expected {want:?}:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connection slots, handshakes, idle and age limits, refused clients, and
/// connections that predate a reload of the client CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded_closed_when_idle_old_or_refused_and_rechecked_on_reload() {
    let install = Install::new();
    install.edit_config(|t| {
        t.replace(
            "max_batch_items = 256",
            "max_batch_items = 256\nmax_connections = 2\nidle_timeout_ms = 700\nmax_connection_age_ms = 2500",
        )
    });
    let dev = install.dev_client();
    let stranger = install.issue_client("stranger");
    let d = install.start().await;
    let sign = json!({"key":"demo","data":HELLO});

    // TCP clients that never start TLS hold no connection slot: with both
    // slots' worth of them open, a real client is served at once (before,
    // it waited for their 5 s handshake timeout).
    let mut idle_tcp = Vec::new();
    for _ in 0..3 {
        idle_tcp.push(tokio::net::TcpStream::connect(d.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = std::time::Instant::now();
    let mut c = tokio::time::timeout(
        Duration::from_secs(3),
        Client::connect(d.addr, &d.ca, &dev, true),
    )
    .await
    .expect("a slot for a client with a certificate")
    .unwrap();
    assert_eq!(c.post("/v1/sign", &sign).await.unwrap().0, 200);
    assert!(t.elapsed() < Duration::from_secs(3));
    drop(idle_tcp);
    drop(c);

    // A client no entity claims gets 401 and loses the connection, over
    // HTTP/1.1 and HTTP/2; it cannot sit on the slots.
    for h2 in [false, true] {
        for _ in 0..3 {
            let mut s = Client::connect(d.addr, &d.ca, &stranger, h2).await.unwrap();
            let (st, h, _) = s.post("/v1/sign", &sign).await.unwrap();
            assert_eq!(st, 401);
            if !h2 {
                assert_eq!(h["connection"], "close");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(s.get("/healthz").await.is_err(), "h2={h2}: still connected");
        }
    }

    // Idle connections are closed (HTTP/2 has no idle timer in hyper).
    for h2 in [false, true] {
        let mut c = d.client(h2).await;
        assert_eq!(c.post("/v1/sign", &sign).await.unwrap().0, 200);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(
            c.get("/healthz").await.is_err(),
            "h2={h2}: idle connection kept"
        );
    }

    // A busy connection is closed gracefully at its maximum age.
    let mut c = d.client(true).await;
    let t = std::time::Instant::now();
    let mut failed_at = None;
    while t.elapsed() < Duration::from_secs(5) {
        match c.get("/healthz").await {
            Ok((200, _, _)) => tokio::time::sleep(Duration::from_millis(100)).await,
            _ => {
                failed_at = Some(t.elapsed());
                break;
            }
        }
    }
    let failed_at = failed_at.expect("connection older than max_connection_age kept");
    assert!(failed_at >= Duration::from_millis(2000), "{failed_at:?}");

    // A connection made before a reload that replaces the client CA is
    // re-checked on its next request.
    let mut c = d.client(false).await;
    assert_eq!(c.post("/v1/sign", &sign).await.unwrap().0, 200);
    let other = svs_appliance::tls::devpki::DevCa::generate("Other CA").unwrap();
    std::fs::write(install.dir.join("other-ca.pem"), &other.cert_pem).unwrap();
    install.edit_config(|t| t.replace("client_ca = \"ca.pem\"", "client_ca = \"other-ca.pem\""));
    d.signal("HUP");
    // Requests keep the connection from going idle until the reload lands.
    let mut refused = None;
    for _ in 0..20 {
        match c.post("/v1/sign", &sign).await {
            Ok((200, _, _)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok((401, h, v)) => {
                assert_eq!(h["connection"], "close");
                refused = Some(v);
                break;
            }
            other => panic!("{other:?}\n{}", d.log_text()),
        }
    }
    let v = refused.expect("old connection still trusted after the client CA changed");
    assert_eq!(v["error"]["code"], "unauthenticated");
    assert!(d.log_text().contains("configuration reloaded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_under_load_fails_no_request() {
    let install = Install::new();
    let dev = install.dev_client();
    let late = install.issue_client("late");
    let dev_entity = entity(
        "dev-client",
        &dev.sha256,
        &["demo"],
        &["sign", "verify"],
        "",
    );
    install.write_entities(&dev_entity);
    let d = install.start().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = d.client(i % 2 == 0).await;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut bad) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c
                    .post("/v1/sign", &json!({"key":"demo","data":HELLO}))
                    .await
                {
                    Ok((200, _, _)) => ok += 1,
                    other => bad.push(format!("{other:?}")),
                }
            }
            (ok, bad)
        }));
    }
    for round in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Re-issue the server certificate too: new connections get it.
        let ca =
            svs_appliance::tls::devpki::DevCa::load(&install.dir, svs_appliance::dev::DEV_CA_NAME)
                .unwrap();
        let server = ca.server(&["localhost", "127.0.0.1"]).unwrap();
        svs_appliance::tls::devpki::save_issued(&install.dir, "server", &server).unwrap();
        // The last reload also adds an entity.
        if round == 4 {
            install.write_entities(&format!(
                "{dev_entity}{}",
                entity("late", &late.sha256, &["demo"], &["sign"], "")
            ));
        }
        d.signal("HUP");
        // New handshakes during the reloads.
        let (s, _, v) = d
            .client(round % 2 == 1)
            .await
            .post("/v1/sign", &json!({"key":"demo","data":HELLO}))
            .await
            .unwrap();
        assert_eq!(s, 200, "{v}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New connections work after the reloads, are served the certificate
    // written last, and the entity added by the last reload may sign.
    assert_eq!(d.client(false).await.get("/readyz").await.unwrap().0, 200);
    let pem = std::fs::read_to_string(install.dir.join("server.pem")).unwrap();
    let newest = unb64(
        &pem.lines()
            .skip_while(|l| !l.starts_with("-----BEGIN"))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect::<String>(),
    );
    let tls = tls_stream(d.addr, tls_config(&d.ca, Some(&dev), false))
        .await
        .unwrap();
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(
        served, newest,
        "the server still presents an older certificate"
    );
    let mut c = Client::connect(d.addr, &d.ca, &late, false).await.unwrap();
    let (s, _, v) = c
        .post("/v1/sign", &json!({"key":"demo","data":HELLO}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        let (ok, bad) = t.await.unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        total += ok;
    }
    assert!(total > 50, "only {total} requests");
    assert_eq!(
        d.log_text().matches("configuration reloaded").count(),
        5,
        "{}",
        d.log_text()
    );
    // Each reload's record names the new server certificate; the client
    // CA stayed.
    let reloads: Vec<String> = audit_records(&install)
        .into_iter()
        .filter(|r| r["type"] == "reload")
        .map(|r| r["detail"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(reloads.len(), 5, "{reloads:?}");
    for detail in &reloads {
        assert!(
            detail.contains("; tls changed: server certificate;"),
            "{detail}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight() {
    let install = Install::new();
    // Every C_Sign stalls 700 ms (after the self-tests' first signatures).
    let mut d = install
        .start_with_env(&[("SVS_SOFTTOKEN_FAULTS", "C_Sign:stall=700:after=2")])
        .await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut c = d.client(false).await;
        tasks.push(tokio::spawn(async move {
            c.post("/v1/sign", &json!({"key":"demo","data":HELLO}))
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.signal("TERM");
    // No new connections once draining: the listener closes within moments
    // of the signal (polled, since a loaded machine may take a while to
    // deliver it), while the stalled requests are still in flight.
    let refused_by = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        if Client::connect(d.addr, &d.ca, &d.client, false)
            .await
            .is_err()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < refused_by,
            "svsd still accepts connections 3 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in tasks {
        let (s, _, v) = t.await.unwrap().unwrap();
        assert_eq!(s, 200, "{v}");
    }
    let st = d.wait(Duration::from_secs(10)).expect("svsd did not exit");
    assert!(st.success());
    let r = svs_appliance::audit::verify_dir(&install.audit_dir(), None).unwrap();
    assert!(r.records >= 6);
}

/// svsd started with the soft token's faults read from a file (empty for
/// now: no faults); the file, for the test to write faults into.
async fn start_with_faults_file(install: &Install) -> (Daemon, std::path::PathBuf) {
    let faults = install.dir.join("faults");
    std::fs::write(&faults, "").unwrap();
    let d = install
        .start_with_env(&[("SVS_SOFTTOKEN_FAULTS_FILE", faults.to_str().unwrap())])
        .await;
    (d, faults)
}

/// SIGHUP, then SIGTERM while the reload waits on the HSM: svsd exits 0
/// within the grace period and the trail's close, not after the reload.
async fn sigterm_during_a_reload_stops_at_once(d: &mut Daemon) {
    d.signal("HUP");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let asked = std::time::Instant::now();
    d.signal("TERM");
    let st = d.wait(Duration::from_secs(20)).expect("svsd did not exit");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "svsd took {:?} to stop\n{}",
        asked.elapsed(),
        d.log_text()
    );
    assert!(st.success(), "{}", d.log_text());
}

/// The trail's records, checked to end with the `stop` record and to
/// verify.
fn the_trail_ends_with_the_stop(install: &Install) -> Vec<Value> {
    let records = audit_records(install);
    assert_eq!(records.last().unwrap()["type"], "stop", "{records:?}");
    svs_appliance::audit::verify_dir(&install.audit_dir(), None).unwrap();
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_a_reload_stuck_on_the_hsm() {
    let install = Install::new();
    // HSM calls may take 30 s before they time out: a reload that waits on
    // them would hold the stop that long.
    install.edit_config(|t| {
        t.replace("grace_period_ms = 5000", "grace_period_ms = 1000")
            .replace(
                "[hsm.pool]\nsize = 2\n",
                "[hsm.pool]\nsize = 2\nop_timeout_ms = 30000\n",
            )
    });
    let (mut d, faults) = start_with_faults_file(&install).await;
    // The reload must self-test a newly exposed key, and the HSM now takes
    // a minute for each signature.
    expose_other(&install);
    std::fs::write(&faults, "C_Sign:stall=60000").unwrap();
    sigterm_during_a_reload_stops_at_once(&mut d).await;
    assert!(
        !d.log_text().contains("configuration reloaded"),
        "the reload was not stuck: {}",
        d.log_text()
    );
    the_trail_ends_with_the_stop(&install);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_installed_before_sigterm_is_recorded_before_the_stop() {
    let install = Install::new();
    // Three sessions: the reload's re-run of the self-tests and a periodic
    // run may each hold one stuck, and the stop's anchor update needs one.
    install.edit_config(|t| {
        t.replace("grace_period_ms = 5000", "grace_period_ms = 1000")
            .replace(
                "[selftest]\ninterval_s = 300\n",
                "[selftest]\ninterval_s = 1\n",
            )
            .replace(
                "[hsm.pool]\nsize = 2\n",
                "[hsm.pool]\nsize = 3\nop_timeout_ms = 30000\n",
            )
    });
    let (mut d, faults) = start_with_faults_file(&install).await;
    std::fs::write(&faults, "C_Sign:device_error").unwrap();
    let mut c = d.client(false).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while c.get("/readyz").await.unwrap().0 != 503 {
        assert!(std::time::Instant::now() < deadline, "{}", d.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The reload is accepted and installed at once (nothing on the token
    // changed); the self-tests it runs again, since they failed, hang.
    std::fs::write(&faults, "C_Sign:stall=60000").unwrap();
    sigterm_during_a_reload_stops_at_once(&mut d).await;
    let records = the_trail_ends_with_the_stop(&install);
    let kinds: Vec<_> = records
        .iter()
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds[kinds.len() - 2..], ["reload", "stop"], "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_periodic_self_test_running_at_sigterm_is_not_recorded_after_the_stop() {
    let install = Install::new();
    install.edit_config(|t| {
        t.replace("grace_period_ms = 5000", "grace_period_ms = 1000")
            .replace(
                "[selftest]\ninterval_s = 300\n",
                "[selftest]\ninterval_s = 1\n",
            )
    });
    let (mut d, faults) = start_with_faults_file(&install).await;
    // The next periodic run waits 2 s on the HSM; the stop's anchor update
    // (which looks its object up) 3 s.
    std::fs::write(&faults, "C_Sign:stall=2000;C_FindObjects:stall=3000").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    d.signal("TERM");
    let st = d.wait(Duration::from_secs(20)).expect("svsd did not exit");
    assert!(st.success(), "{}", d.log_text());
    the_trail_ends_with_the_stop(&install);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_still_running_after_the_grace_period_are_not_recorded_after_the_stop() {
    let install = Install::new();
    install.edit_config(|t| t.replace("grace_period_ms = 5000", "grace_period_ms = 500"));
    // Every C_Sign after the start's self-tests stalls 2.5 s.
    let mut d = install
        .start_with_env(&[("SVS_SOFTTOKEN_FAULTS", "C_Sign:stall=2500:after=2")])
        .await;
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let mut c = d.client(false).await;
        tasks.push(tokio::spawn(async move {
            c.post("/v1/sign", &json!({"key":"demo","data":HELLO}))
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.signal("TERM");
    // Refused (503) or cut off at exit: never a signature the trail lacks.
    for t in tasks {
        if let Ok((s, _, v)) = t.await.unwrap() {
            assert_ne!(s, 200, "{v}");
        }
    }
    let st = d.wait(Duration::from_secs(20)).expect("svsd did not exit");
    assert!(st.success(), "{}", d.log_text());
    let records = the_trail_ends_with_the_stop(&install);
    assert!(records.iter().all(|r| r["outcome"] != "ok"), "{records:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_chain_survives_kill_9_and_holds_every_signature_handed_out() {
    let install = Install::new();
    let d = install.start().await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let mut c = d.client(i % 2 == 1).await;
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for n in 0.. {
                let data = format!("client {i} message {n}");
                match c
                    .post(
                        "/v1/sign",
                        &json!({"key":"demo","data":b64(data.as_bytes())}),
                    )
                    .await
                {
                    Ok((200, _, v)) => {
                        let sig = unb64(v["signature"].as_str().unwrap());
                        got.push((sm3_hex(data.as_bytes()), sm3_hex(&sig)));
                    }
                    _ => break,
                }
            }
            got
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    d.signal("KILL");
    let mut received = Vec::new();
    for t in tasks {
        received.extend(t.await.unwrap());
    }
    drop(d);
    assert!(received.len() > 20, "{}", received.len());
    // A restart cuts a torn tail (never acknowledged) and continues the chain.
    let d = install.start().await;
    drop(d);
    let report = svs_appliance::audit::verify_dir(&install.audit_dir(), None).unwrap();
    let mut in_trail = HashSet::new();
    for f in std::fs::read_dir(install.audit_dir()).unwrap() {
        let bytes = svs_appliance::audit::read_trail_file(&f.unwrap().path()).unwrap();
        for line in std::str::from_utf8(&bytes).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            if v["outcome"] == "ok" {
                in_trail.insert((
                    v["input_sm3"].as_str().unwrap().to_owned(),
                    v["output_sm3"].as_str().unwrap().to_owned(),
                ));
            }
        }
    }
    for r in &received {
        assert!(
            in_trail.contains(r),
            "signature handed out but not in the trail: {r:?}"
        );
    }
    println!(
        "{} signatures received, all in a trail of {} records",
        received.len(),
        report.records
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_never_reach_the_log_or_the_trail() {
    let install = Install::new();
    let d = install.start_with_env(&[("RUST_LOG", "trace")]).await;
    let secret = b"PASSPORT E12345678 ZHANG SAN";
    let mut c = d.client(false).await;
    let _ = c
        .post("/v1/sign", &json!({"key":"demo","data":b64(secret)}))
        .await
        .unwrap();
    let _ = c
        .post(
            "/v1/sign",
            &json!({"key":"demo","data":b64(secret),"bogus":"PASSPORT"}),
        )
        .await
        .unwrap();
    let _ = c
        .post(
            "/v1/verify",
            &json!({"key":"demo","data":b64(secret),"signature":"PASSPORT"}),
        )
        .await
        .unwrap();
    let _ = c
        .post("/v1/sign", &json!({"key":"demo","data":42424242}))
        .await
        .unwrap();
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = d.log_text();
    let mut trail = String::new();
    for f in std::fs::read_dir(install.audit_dir()).unwrap() {
        let bytes = svs_appliance::audit::read_trail_file(&f.unwrap().path()).unwrap();
        trail.push_str(std::str::from_utf8(&bytes).unwrap());
    }
    for haystack in [&log, &trail] {
        assert!(!haystack.contains("PASSPORT"));
        assert!(!haystack.contains("E12345678"));
        assert!(!haystack.contains(&b64(secret)));
        assert!(!haystack.contains("42424242"));
    }
    assert!(
        trail.contains(&sm3_hex(secret)),
        "the trail holds the SM3 of the input"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_with_openssl_and_gmssl() {
    let openssl = have_tool(Command::new("openssl").arg("version"), "openssl");
    let gmssl = have_tool(
        Command::new("python3").args(["-c", "import gmssl.sm2"]),
        "python3 gmssl",
    );
    if !openssl && !gmssl {
        return;
    }
    let install = Install::new();
    let d = install.start().await;
    let mut c = d.client(false).await;
    let work = install.dir.join("interop");
    std::fs::create_dir_all(&work).unwrap();
    let msg = b"interop message for SM2 with the default ID";
    std::fs::write(work.join("msg.bin"), msg).unwrap();
    let (_, _, k) = c.get("/v1/keys/demo").await.unwrap();
    std::fs::write(work.join("pub.pem"), k["public_key"].as_str().unwrap()).unwrap();
    let (_, _, v) = c
        .post("/v1/sign", &json!({"key":"demo","data":b64(msg)}))
        .await
        .unwrap();
    let der = unb64(v["signature"].as_str().unwrap());
    std::fs::write(work.join("sig.der"), &der).unwrap();
    if openssl {
        let st = openssl_sm2_verify(&work, "pub.pem", "msg.bin", "sig.der");
        assert!(
            st.status.success(),
            "openssl rejects the API's signature: {}",
            String::from_utf8_lossy(&st.stdout)
        );
        // The other way: OpenSSL signs, the API verifies.
        let ok = |args: &[&str]| {
            let o = Command::new("openssl")
                .args(args)
                .current_dir(&work)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        ok(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:SM2",
            "-out",
            "key.pem",
        ]);
        ok(&["pkey", "-in", "key.pem", "-pubout", "-out", "ossl-pub.pem"]);
        ok(&[
            "pkeyutl",
            "-sign",
            "-inkey",
            "key.pem",
            "-rawin",
            "-in",
            "msg.bin",
            "-digest",
            "sm3",
            "-pkeyopt",
            "distid:1234567812345678",
            "-out",
            "ossl.sig",
        ]);
        let pubpem = std::fs::read_to_string(work.join("ossl-pub.pem")).unwrap();
        let sig = std::fs::read(work.join("ossl.sig")).unwrap();
        let (s, _, v) = c
            .post(
                "/v1/verify",
                &json!({"public_key":pubpem,"data":b64(msg),"signature":b64(&sig)}),
            )
            .await
            .unwrap();
        assert_eq!((s, v["valid"].as_bool()), (200, Some(true)), "{v}");
        let (_, _, v) = c
            .post(
                "/v1/verify",
                &json!({"public_key":pubpem,"data":b64(b"other"),"signature":b64(&sig)}),
            )
            .await
            .unwrap();
        assert_eq!(v["valid"].as_bool(), Some(false));
        // The signer named by an SM2 certificate (OpenSSL's own, SM2-with-SM3).
        ok(&[
            "req",
            "-x509",
            "-new",
            "-key",
            "key.pem",
            "-sm3",
            "-sigopt",
            "distid:1234567812345678",
            "-subj",
            "/CN=interop",
            "-days",
            "1",
            "-out",
            "ossl-cert.pem",
        ]);
        let cert = std::fs::read_to_string(work.join("ossl-cert.pem")).unwrap();
        for (data, valid) in [(&msg[..], true), (&b"other"[..], false)] {
            let (s, _, v) = c
                .post(
                    "/v1/verify",
                    &json!({"certificate":cert,"data":b64(data),"signature":b64(&sig)}),
                )
                .await
                .unwrap();
            assert_eq!((s, v["valid"].as_bool()), (200, Some(valid)), "{v}");
        }
    }
    if gmssl {
        let (_, _, v) = c
            .post(
                "/v1/sign",
                &json!({"key":"demo","data":b64(msg),"encoding":"raw"}),
            )
            .await
            .unwrap();
        let raw = unb64(v["signature"].as_str().unwrap());
        let spki = unb64(
            &k["public_key"]
                .as_str()
                .unwrap()
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        );
        let point = &spki[spki.len() - 64..];
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let script = format!(
            "from gmssl import sm2\nc = sm2.CryptSM2(private_key='', public_key='{}')\nimport sys\nsys.exit(0 if c.verify_with_sm3('{}', bytes.fromhex('{}')) else 1)\n",
            hex(point),
            hex(&raw),
            hex(msg)
        );
        let st = Command::new("python3")
            .args(["-c", &script])
            .status()
            .unwrap();
        assert!(st.success(), "gmssl rejects the API's signature");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_mode_curl_commands_work_as_printed() {
    if !have_tool(Command::new("curl").arg("--version"), "curl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let metrics_port = free_port();
    let out_path = tmp.path().join("out.txt");
    let mut child = Command::new(svsd_bin())
        .args([
            "--dev",
            "--allow-root",
            "--dev-port",
            &port.to_string(),
            "--dev-metrics-port",
            &metrics_port.to_string(),
            "--dev-dir",
        ])
        .arg(tmp.path().join("dev"))
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut printed = String::new();
    let mut ready = false;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        printed = std::fs::read_to_string(&out_path).unwrap_or_default();
        if printed.contains("/v1/verify") {
            let st = Command::new("curl")
                .args(["-sk", &format!("https://127.0.0.1:{port}/healthz")])
                .status();
            // Without a client certificate curl fails the handshake; any answer means it listens.
            ready = st.is_ok() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            if ready {
                tokio::time::sleep(Duration::from_millis(300)).await;
                break;
            }
        }
    }
    assert!(ready, "{printed}");
    let sign: String = printed
        .lines()
        .find(|l| l.starts_with("curl") && l.contains("/v1/sign"))
        .unwrap()
        .into();
    let out = Command::new("sh").args(["-c", &sign]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["signature"].is_string(), "{v}");
    let block: Vec<&str> = printed
        .lines()
        .skip_while(|l| !l.starts_with("SIG="))
        .take(2)
        .collect();
    let out = Command::new("sh")
        .args(["-c", &block.join("\n")])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], true);
    let metrics = printed
        .lines()
        .find(|l| l.starts_with("curl") && l.ends_with("/metrics"))
        .unwrap();
    let out = Command::new("sh").args(["-c", metrics]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("svs_requests_total{entity=\"dev-client\",key=\"demo\",operation=\"sign\",outcome=\"ok\"} 2"),
        "{text}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_cap_answers_429_with_retry_after() {
    let install = Install::new();
    let dev = install.dev_client();
    install.write_entities(&entity(
        "dev-client",
        &dev.sha256,
        &["demo"],
        &["sign", "verify"],
        "max_concurrent = 1",
    ));
    // Every C_Sign after the self-tests' stalls 700 ms: the first request
    // holds the entity's only slot while the second arrives.
    let d = install
        .start_with_env(&[("SVS_SOFTTOKEN_FAULTS", "C_Sign:stall=700:after=2")])
        .await;
    let sign = json!({"key":"demo","data":HELLO});
    let mut first = d.client(false).await;
    let body = sign.clone();
    let held = tokio::spawn(async move { first.post("/v1/sign", &body).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut second = d.client(false).await;
    let (s, h, v) = second.post("/v1/sign", &sign).await.unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("too_many_concurrent_requests")),
        "{v}"
    );
    assert_eq!(h["retry-after"].to_str().unwrap(), "1");
    assert!(v.get("signature").is_none());
    let (s, _, v) = held.await.unwrap().unwrap();
    assert_eq!(s, 200, "{v}");
    // The slot is free again.
    assert_eq!(second.post("/v1/sign", &sign).await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svsd_refuses_to_run_as_root_unless_told() {
    let uid = std::process::Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        eprintln!("SKIP: not running as root");
        return;
    }
    let install = Install::new();
    let out = std::process::Command::new(svsd_bin())
        .arg("--config")
        .arg(&install.config)
        .output()
        .unwrap();
    // 78: systemd does not restart what a restart cannot fix.
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to run as root"), "{err}");
    // Refused before anything was touched: no trail was started.
    assert!(
        svs_appliance::audit::trail_files(&install.audit_dir())
            .unwrap_or_default()
            .is_empty()
    );
    // `--dev` asks before it makes its directory.
    let dev_dir = install.dir.join("dev-as-root");
    let out = std::process::Command::new(svsd_bin())
        .arg("--dev")
        .arg("--dev-dir")
        .arg(&dev_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(
        !dev_dir.exists(),
        "--dev made its directory before refusing"
    );
}

/// A tmpfs mounted over a directory for the life of the value.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = have_tool(
            std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir),
            "mounting a tmpfs (root)",
        );
        ok.then(|| SmallDisk(dir.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_audit_disk_stops_signing_and_loses_no_answered_record() {
    let install = Install::new();
    // 512 KiB for the trail: too small for the zero-filled file (svsd
    // writes it unfilled, with a warning), full after about a thousand
    // records.
    let Some(_disk) = SmallDisk::mount(&install.audit_dir(), "512k") else {
        return;
    };
    let mut d = install.start().await;
    let mut c = d.client(false).await;
    let sign = json!({"key":"demo","data":HELLO});
    let mut signed = 0u64;
    let refusal = loop {
        let (s, _, v) = c.post("/v1/sign", &sign).await.unwrap();
        if s != 200 {
            break (s, v);
        }
        signed += 1;
        assert!(signed < 100_000, "the trail never filled the disk");
    };
    assert_eq!(
        (refusal.0, refusal.1["error"]["code"].as_str()),
        (503, Some("audit_unavailable")),
        "{}",
        refusal.1
    );
    assert!(refusal.1.get("signature").is_none());
    assert!(
        signed > 100,
        "only {signed} signatures before the disk filled"
    );
    // It stays refused, says why on /readyz, and raises the alarm.
    let (s, _, v) = c.post("/v1/sign", &sign).await.unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (503, Some("audit_unavailable"))
    );
    let (s, _, v) = c.get("/readyz").await.unwrap();
    assert_eq!(s, 503, "{v}");
    assert!(v.to_string().contains("audit"), "{v}");
    assert!(d.log_text().contains("ALARM audit trail cannot be written"));
    // Every signature handed out is in the trail, and the chain holds.
    d.signal("KILL");
    d.wait(Duration::from_secs(10)).expect("svsd did not exit");
    let files = svs_appliance::audit::trail_files(&install.audit_dir()).unwrap();
    let mut sign_records = 0u64;
    for (_, path) in &files {
        let text = svs_appliance::audit::read_trail_file(path).unwrap();
        sign_records += String::from_utf8_lossy(&text)
            .lines()
            .filter(|l| l.contains("\"op\":\"sign\"") && l.contains("\"outcome\":\"ok\""))
            .count() as u64;
    }
    assert!(
        sign_records >= signed,
        "{signed} signatures answered, {sign_records} in the trail"
    );
    let report = svs_appliance::audit::verify_dir(&install.audit_dir(), None).unwrap();
    assert!(report.records >= signed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_periodic_self_test_stops_signing_until_it_passes_again() {
    let install = Install::new();
    install.edit_config(|t| {
        assert!(t.contains("[selftest]\ninterval_s = 300\n"));
        t.replace(
            "[selftest]\ninterval_s = 300\n",
            "[selftest]\ninterval_s = 1\n",
        )
    });
    let (d, faults) = start_with_faults_file(&install).await;
    let mut c = d.client(false).await;
    let sign = json!({"key":"demo","data":HELLO});
    assert_eq!(c.post("/v1/sign", &sign).await.unwrap().0, 200);
    assert!(
        scrape_metrics(install.metrics_addr)
            .await
            .contains("\nsvs_selftest_ok 1\n")
    );

    // The HSM starts failing every signature: the next periodic run fails.
    std::fs::write(&faults, "C_Sign:device_error").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let why = loop {
        let (s, _, v) = c.get("/readyz").await.unwrap();
        if s == 503 && v.to_string().contains("self-test") {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "still {s} {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (s, _, v) = c.post("/v1/sign", &sign).await.unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (503, Some("not_ready")),
        "{v} ({why})"
    );
    assert!(d.log_text().contains("ALARM self-test failed"));
    let page = scrape_metrics(install.metrics_addr).await;
    assert!(page.contains("\nsvs_selftest_ok 0\n"), "{page}");
    assert!(!page.contains("\nsvs_selftest_failures_total 0\n"));

    // Repaired: the next run passes, and signing resumes without a restart.
    std::fs::write(&faults, "").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while c.get("/readyz").await.unwrap().0 != 200 {
        assert!(std::time::Instant::now() < deadline, "not ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.post("/v1/sign", &sign).await.unwrap().0, 200);
    assert!(
        scrape_metrics(install.metrics_addr)
            .await
            .contains("\nsvs_selftest_ok 1\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_reloading_stopping_and_watchdog_pings() {
    let install = Install::new();
    let path = install.dir.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let heard = std::sync::Arc::new(std::sync::Mutex::new(
        Vec::<(std::time::Instant, String)>::new(),
    ));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = {
        let (heard, stop) = (heard.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    heard.lock().unwrap().push((std::time::Instant::now(), msg));
                }
            }
        })
    };
    // A 400 ms watchdog: svsd pings at half the period.
    let mut d = install
        .start_with_env(&[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ])
        .await;
    let has = |m: &str, key: &str| m.lines().any(|l| l == key);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let ready_at = loop {
        let ready = heard
            .lock()
            .unwrap()
            .iter()
            .find(|(_, m)| has(m, "READY=1"))
            .map(|(t, _)| *t);
        if let Some(t) = ready {
            break t;
        }
        assert!(std::time::Instant::now() < deadline, "no READY=1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let pings = heard
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, m)| *t > ready_at && has(m, "WATCHDOG=1"))
        .count();
    assert!(
        pings >= 3,
        "{pings} watchdog pings in 1.2 s at a 400 ms period"
    );

    d.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let msgs: Vec<String> = heard
            .lock()
            .unwrap()
            .iter()
            .map(|(_, m)| m.clone())
            .collect();
        if let Some(i) = msgs.iter().position(|m| has(m, "RELOADING=1")) {
            assert!(
                msgs[i].lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
                "{}",
                msgs[i]
            );
            if msgs[i + 1..].iter().any(|m| has(m, "READY=1")) {
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "{msgs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    d.signal("TERM");
    d.wait(Duration::from_secs(10)).expect("svsd did not exit");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    listener.join().unwrap();
    assert!(
        heard
            .lock()
            .unwrap()
            .iter()
            .any(|(_, m)| has(m, "STOPPING=1")),
        "no STOPPING=1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_clients_are_served_and_still_need_a_certificate() {
    use tokio::io::AsyncReadExt;
    let install = Install::new();
    let d = install.start().await;
    let tls12 = &[&rustls::version::TLS12];
    let mut tls = tls_stream(d.addr, tls_config_for(&d.ca, Some(&d.client), false, tls12))
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    tls.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Without a client certificate the TLS 1.2 handshake is refused too.
    let refused = match tls_stream(d.addr, tls_config_for(&d.ca, None, false, tls12)).await {
        Err(_) => true,
        // TLS 1.2 may report the refusal on the first read instead.
        Ok(mut s) => {
            let _ = s
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.is_err() || buf.is_empty()
        }
    };
    assert!(refused, "a TLS 1.2 client without a certificate was served");
}

/// A flood of refused requests from one entity (the review's case: an
/// HTTP/2 client sending as fast as it can into an empty token bucket)
/// writes at most its refusal-record burst plus the bucket's rate of
/// records, and one count a second for the rest: the trail accounts for
/// every refusal the client received, other entities' signatures are all
/// in it, and the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_is_counted_not_recorded_one_by_one() {
    let install = Install::new();
    let dev = install.dev_client();
    let flooder = install.issue_client("flooder");
    install.write_entities(&format!(
        "{}{}",
        entity("dev-client", &dev.sha256, &["demo"], &["sign"], ""),
        entity(
            "flooder",
            &flooder.sha256,
            &["demo"],
            &["sign"],
            "rate = { per_second = 1.0, burst = 1 }"
        ),
    ));
    // [audit] refusal_records left at its default: 20 a second, burst 100.
    let mut d = install.start().await;
    let sign = json!({"key":"demo","data":HELLO});
    let started = std::time::Instant::now();
    let mut flood = Vec::new();
    for _ in 0..8 {
        let mut c = Client::connect(d.addr, &d.ca, &flooder, true)
            .await
            .unwrap();
        let body = sign.clone();
        flood.push(tokio::spawn(async move {
            let (mut refused, mut signed) = (0u64, 0u64);
            for _ in 0..300 {
                match c.post("/v1/sign", &body).await.unwrap() {
                    (429, _, v) => {
                        assert_eq!(v["error"]["code"], "rate_limited");
                        refused += 1;
                    }
                    (200, _, _) => signed += 1,
                    (s, _, v) => panic!("{s} {v}"),
                }
            }
            (refused, signed)
        }));
    }
    // Another tenant signs meanwhile: every answer it gets is recorded.
    let mut dc = d.client(true).await;
    let mut handed_out = HashSet::new();
    for n in 0..50 {
        let data = format!("tenant message {n}");
        let (s, _, v) = dc
            .post(
                "/v1/sign",
                &json!({"key":"demo","data":b64(data.as_bytes())}),
            )
            .await
            .unwrap();
        assert_eq!(s, 200, "{v}");
        let sig = unb64(v["signature"].as_str().unwrap());
        handed_out.insert((sm3_hex(data.as_bytes()), sm3_hex(&sig)));
    }
    let (mut refused, mut flooder_signed) = (0u64, 0u64);
    for t in flood {
        let (r, s) = t.await.unwrap();
        refused += r;
        flooder_signed += s;
    }
    let flood_secs = started.elapsed().as_secs_f64();
    assert!(refused >= 2000, "{refused}");
    // The metric counts each refusal held back at once (the last second's
    // may not be in a note yet).
    let metrics = scrape_metrics(install.metrics_addr).await;
    let held_back: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                r#"svs_audit_refusals_suppressed_total{code="rate_limited",entity="flooder"} "#,
            )
        })
        .unwrap_or_else(|| panic!("no suppressed-refusal series in:\n{metrics}"))
        .parse()
        .unwrap();
    // SIGTERM: the counts not yet in a note are written before `stop`.
    d.signal("TERM");
    assert!(d.wait(Duration::from_secs(15)).unwrap().success());

    let report = svs_appliance::audit::verify_dir(&install.audit_dir(), None).unwrap();
    let (mut one_by_one, mut summed, mut summaries, mut tenant_ok) = (0u64, 0u64, 0u64, 0u64);
    let mut in_trail = HashSet::new();
    let mut bytes_total = 0;
    for (_, f) in svs_appliance::audit::trail_files(&install.audit_dir()).unwrap() {
        let bytes = svs_appliance::audit::read_trail_file(&f).unwrap();
        bytes_total += bytes.len();
        for line in std::str::from_utf8(&bytes).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            match (v["type"].as_str().unwrap(), v["entity"].as_str()) {
                ("op", Some("flooder")) if v["outcome"] == "rate_limited" => one_by_one += 1,
                ("op", Some("dev-client")) if v["outcome"] == "ok" => {
                    tenant_ok += 1;
                    in_trail.insert((
                        v["input_sm3"].as_str().unwrap().to_owned(),
                        v["output_sm3"].as_str().unwrap().to_owned(),
                    ));
                }
                ("refusals_suppressed", _) => {
                    let detail = v["detail"].as_str().unwrap();
                    let mut words = detail.split(' ');
                    assert_eq!(words.next(), Some("entity=flooder"), "{detail}");
                    let total: u64 = words
                        .next()
                        .and_then(|w| w.strip_prefix("suppressed="))
                        .unwrap()
                        .parse()
                        .unwrap();
                    let parts: Vec<_> = words.collect();
                    assert_eq!(parts, [format!("sign:rate_limited={total}")], "{detail}");
                    summed += total;
                    summaries += 1;
                }
                _ => {}
            }
        }
    }
    println!(
        "{refused} refusals in {flood_secs:.2} s ({flooder_signed} signed): {one_by_one} recorded one by one, {summed} counted in {summaries} notes; trail {} records, {bytes_total} bytes",
        report.records
    );
    // Bounded: the burst, plus the bucket's rate over the flood.
    let bound = 100 + (20.0 * (flood_secs + 1.0)).ceil() as u64;
    assert!(one_by_one <= bound, "{one_by_one} > {bound}");
    assert!(summaries >= 1 && summed > 0);
    // The flood was over before the scrape: the metric and the notes agree.
    assert_eq!(summed, held_back);
    // Every refusal received is accounted for.
    assert_eq!(one_by_one + summed, refused);
    // Every signature handed out is in the trail.
    assert_eq!(tenant_ok, 50);
    assert_eq!(in_trail, handed_out);
}

/// A flood of connections that are not TLS at all (the review's case: a
/// loop of plain-TCP connections, no certificate needed, made 13,000 log
/// lines a second) on both TLS listeners: every one is counted in
/// `svs_tls_handshake_failures_total`, the log has at most about one line
/// a second per listener and reason, and those lines' `held_back` counts
/// account for every connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_tls_handshakes_are_all_counted_but_logged_at_most_once_a_second() {
    const FLOOD: Duration = Duration::from_secs(3);
    let install = Install::new();
    install.enable_metrics_tls();
    let d = install.start().await;
    let listeners = [("api", d.addr), ("metrics", install.metrics_addr)];
    let started = std::time::Instant::now();
    let mut flood = Vec::new();
    for (listener, addr) in listeners.iter().cycle().take(8).copied() {
        flood.push(tokio::spawn(async move {
            let mut sent = 0u64;
            while started.elapsed() < FLOOD {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
                // Closed once the server has given up on it (and counted it).
                let mut answer = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut answer).await;
                sent += 1;
            }
            (listener, sent)
        }));
    }
    let mut sent = std::collections::BTreeMap::new();
    for t in flood {
        let (listener, n) = t.await.unwrap();
        *sent.entry(listener).or_insert(0u64) += n;
    }
    // The tails are reported once their second is over.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let log = d.log_text();
    let secs = started.elapsed().as_secs_f64().ceil() as usize;

    let scrape = {
        let config = tls_config(&d.ca, Some(&d.client), false);
        let mut s = tls_stream(install.metrics_addr, config).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut page = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut s, &mut page)
            .await
            .unwrap();
        page
    };
    for (listener, _) in listeners {
        let n = sent[listener];
        let counted = sample(
            &scrape,
            &format!(
                r#"svs_tls_handshake_failures_total{{listener="{listener}",reason="refused"}}"#
            ),
        );
        assert_eq!(counted, Some(n as f64), "{listener}:\n{scrape}");
        for other in ["timeout", "no_slot"] {
            let series = format!(
                r#"svs_tls_handshake_failures_total{{listener="{listener}",reason="{other}"}}"#
            );
            assert!(
                matches!(sample(&scrape, &series), None | Some(0.0)),
                "{series}"
            );
        }
        // Every line is one connection plus those it says were held back.
        let tag = format!("listener=\"{listener}\"");
        let (mut lines, mut accounted) = (0usize, 0u64);
        for line in log.lines().filter(|l| l.contains(&tag)) {
            let held_back: u64 = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("held_back="))
                .unwrap_or_else(|| panic!("no held_back in {line}"))
                .parse()
                .unwrap();
            if line.contains("TLS handshake refused") {
                accounted += 1 + held_back;
            } else {
                assert!(line.contains("failed TLS handshakes left out"), "{line}");
                accounted += held_back;
            }
            lines += 1;
        }
        println!("{listener}: {n} garbage connections in {FLOOD:?}, {lines} log lines");
        assert!(n >= 200, "{listener}: only {n} connections");
        assert_eq!(accounted, n, "{listener}:\n{log}");
        // A refused-handshake line and a tail line a second at most.
        assert!(lines <= 2 * (secs + 1), "{lines} lines in {secs} s:\n{log}");
    }
    // The listeners still serve.
    let mut c = d.client(false).await;
    assert_eq!(c.get("/readyz").await.unwrap().0, 200);
}

/// Checkpoints verify with OpenSSL, as an auditor outside SVS would check
/// them: the audit key's public half (read from the token) verifies each
/// checkpoint's signature over the text rebuilt from the record's fields,
/// `SVS audit checkpoint v2\nseq=<head_seq>\nhead=<head>\ntime=<signed_at>\n
/// interval_s=<interval_s>\n`, with the default ID; each signed head is the
/// hash of the record with that seq, and the same checkpoint with another
/// head or another time does not verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_checkpoints_verify_with_openssl() {
    if !have_tool(Command::new("openssl").arg("version"), "openssl") {
        return;
    }
    let install = Install::new();
    install.edit_config(|t| t.replace("checkpoint_interval_s = 60", "checkpoint_interval_s = 1"));
    let d = install.start().await;
    let mut c = d.client(false).await;
    for _ in 0..3 {
        let (s, _, v) = c
            .post("/v1/sign", &json!({"key":"demo","data":HELLO}))
            .await
            .unwrap();
        assert_eq!(s, 200, "{v}");
    }
    let records = || -> Vec<Value> {
        let dir = install.audit_dir();
        let mut out = Vec::new();
        for (_, f) in svs_appliance::audit::trail_files(&dir).unwrap() {
            let text = std::fs::read_to_string(f).unwrap();
            out.extend(
                text.lines()
                    .filter(|l| l.starts_with('{'))
                    .map(|l| serde_json::from_str::<Value>(l).unwrap()),
            );
        }
        out
    };
    let last_op = records()
        .iter()
        .filter(|r| r["type"] == "op")
        .filter_map(|r| r["seq"].as_u64())
        .max()
        .unwrap();
    // Wait for a checkpoint that covers the signatures.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let trail = loop {
        let r = records();
        if r.iter()
            .any(|r| r["type"] == "checkpoint" && r["head_seq"].as_u64() >= Some(last_op))
        {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "no checkpoint");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    d.signal("TERM");
    drop(d);

    // The auditor's way to the audit key's public half: no PIN needed.
    let work = install.dir.join("checkpoints");
    std::fs::create_dir_all(&work).unwrap();
    let out = Command::new(svs_provision_bin())
        .arg("--config")
        .arg(&install.config)
        .args(["key", "export-public", "--label", "svs-audit", "--out"])
        .arg(work.join("audit-pub.pem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let unhex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    let openssl_verifies = |message: &[u8], der: &[u8]| -> bool {
        std::fs::write(work.join("msg"), message).unwrap();
        std::fs::write(work.join("sig.der"), der).unwrap();
        openssl_sm2_verify(&work, "audit-pub.pem", "msg", "sig.der")
            .status
            .success()
    };
    let hash_of = |seq: u64| {
        trail
            .iter()
            .find(|r| r["seq"].as_u64() == Some(seq))
            .map(|r| r["hash"].as_str().unwrap().to_owned())
    };
    let mut checked = 0;
    for cp in trail.iter().filter(|r| r["type"] == "checkpoint") {
        let seq = cp["head_seq"].as_u64().unwrap();
        let head = cp["head"].as_str().unwrap();
        assert_eq!(cp["key"], "svs-audit");
        assert_eq!(hash_of(seq).as_deref(), Some(head), "{cp}");
        let der = unhex(cp["signature"].as_str().unwrap());
        let at = cp["signed_at"].as_str().unwrap();
        assert_eq!(cp["interval_s"], 1, "{cp}");
        // Signed once the head was read, written after: never later than
        // the record that carries it.
        assert!(at <= cp["time"].as_str().unwrap(), "{cp}");
        let text = |head: &str, at: &str| {
            format!("SVS audit checkpoint v2\nseq={seq}\nhead={head}\ntime={at}\ninterval_s=1\n")
        };
        assert!(openssl_verifies(text(head, at).as_bytes(), &der), "{cp}");
        let forged = text(&"0".repeat(64), at);
        assert!(!openssl_verifies(forged.as_bytes(), &der), "{cp}");
        let redated = text(head, "2099-01-01T00:00:00.000000Z");
        assert!(!openssl_verifies(redated.as_bytes(), &der), "{cp}");
        checked += 1;
    }
    assert!(checked >= 2, "{checked} checkpoints");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_or_rolled_back_trail_is_refused_at_start_until_the_anchor_is_reset() {
    let install = Install::new();
    let audit = install.audit_dir();
    let copy_of = |to: &std::path::Path| {
        std::fs::create_dir_all(to).unwrap();
        for (_, f) in svs_appliance::audit::trail_files(&audit).unwrap() {
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
    };
    let install = &install;
    let run = |signatures: usize| async move {
        let mut d = install.start().await;
        let mut c = d.client(false).await;
        for _ in 0..signatures {
            let (s, _, v) = c
                .post("/v1/sign", &json!({"key":"demo","data":HELLO}))
                .await
                .unwrap();
            assert_eq!(s, 200, "{v}");
        }
        d.signal("TERM");
        assert!(
            d.wait(Duration::from_secs(15)).unwrap().success(),
            "{}",
            d.log_text()
        );
        assert!(!d.log_text().contains("ALARM"), "{}", d.log_text());
    };
    run(2).await;
    let older = install.dir.join("older");
    copy_of(&older);
    run(3).await;
    let kept = install.dir.join("kept");
    copy_of(&kept);
    let last_seq = svs_appliance::audit::verify_dir(&audit, None)
        .unwrap()
        .last_seq;

    // What the security officer sees: the clean stop's head.
    let pin = install.pin_file();
    let provision = |args: &[&str]| {
        Command::new(svs_provision_bin())
            .arg("--config")
            .arg(&install.config)
            .args(["--pin-file", &pin, "--json"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = provision(&["audit", "anchor"]);
    assert!(out.status.success(), "{out:?}");
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["seq"].as_u64(), Some(last_seq), "{shown}");

    // Refused, naming why, writing nothing: the directory emptied, then an
    // older copy put back.
    let refused = |want: String| {
        let out = Command::new(svsd_bin())
            .arg("--config")
            .arg(&install.config)
            .arg("--allow-root")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{log}");
        assert!(
            log.contains(&want) && log.contains("svs-provision audit anchor --reset"),
            "{log}"
        );
    };
    std::fs::remove_dir_all(&audit).unwrap();
    refused(format!(
        "ends at seq 0, but the token's audit anchor shows it reached seq {last_seq}"
    ));
    assert!(
        svs_appliance::audit::trail_files(&audit)
            .unwrap()
            .is_empty()
    );
    std::fs::remove_dir_all(&audit).unwrap();
    std::fs::rename(&older, &audit).unwrap();
    let files = || -> Vec<(u64, Vec<u8>)> {
        svs_appliance::audit::trail_files(&audit)
            .unwrap()
            .into_iter()
            .map(|(seq, f)| (seq, std::fs::read(f).unwrap()))
            .collect()
    };
    let before = files();
    refused(format!(
        "but the token's audit anchor shows it reached seq {last_seq}"
    ));
    assert!(files() == before, "the older copy is left as it was");

    // The real trail back: svsd starts and the chain goes on.
    std::fs::remove_dir_all(&audit).unwrap();
    std::fs::rename(&kept, &audit).unwrap();
    run(1).await;
    let r = svs_appliance::audit::verify_dir(&audit, None).unwrap();
    assert!(r.last_seq > last_seq, "{r:?}");

    // A new trail on purpose: the officer resets the anchor; the next
    // start begins at seq 1.
    std::fs::remove_dir_all(&audit).unwrap();
    let out = provision(&["audit", "anchor", "--reset", "--yes"]);
    assert!(out.status.success(), "{out:?}");
    let out = provision(&["audit", "anchor", "--reset", "--yes"]);
    assert_eq!(out.status.code(), Some(3), "nothing left to reset: {out:?}");
    run(1).await;
    let r = svs_appliance::audit::verify_dir(&audit, None).unwrap();
    assert!(r.last_seq < last_seq, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_deleted_by_an_officer_stops_signing_in_the_running_svsd() {
    let install = Install::new();
    let d = install.start().await;
    let mut c = d.client(false).await;
    let sign = json!({"key":"demo","data":HELLO});
    let (s, _, v) = c.post("/v1/sign", &sign).await.unwrap();
    assert_eq!(s, 200, "{v}");
    let pin = install.pin_file();
    // Without --config: svs-provision would refuse a key svsd exposes.
    let token_conf = install.dir.join("softtoken.toml");
    let out = Command::new(svs_provision_bin())
        .env("SVS_SOFTTOKEN_CONF", &token_conf)
        .args(["--token", "svs-dev", "--pin-file", &pin])
        .args(["key", "delete", "--label", "demo", "--yes"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // The soft token looks at its store at most every 100 ms while signing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..20 {
        let (s, _, v) = c.post("/v1/sign", &sign).await.unwrap();
        // Not the client's doing: 503, and nothing about the token object.
        assert_eq!(s, 503, "{v}");
        assert_eq!(v["error"]["code"], "hsm_unavailable", "{v}");
        assert!(!v.to_string().contains("id:"), "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_hsm_makes_svsd_not_ready_until_it_answers_again() {
    let install = Install::new();
    install.edit_config(|t| t.replace("[hsm.pool]\n", "[hsm.pool]\nop_timeout_ms = 1000\n"));
    let (d, faults) = start_with_faults_file(&install).await;
    let mut probe = d.client(false).await;
    std::fs::write(&faults, "C_Sign:stall=5000\n").unwrap();
    // The token re-reads the file within a moment; one request per worker.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut hung = Vec::new();
    for _ in 0..2 {
        let mut c = d.client(false).await;
        hung.push(tokio::spawn(async move {
            c.post("/v1/sign", &json!({"key":"demo","data":HELLO}))
                .await
        }));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    loop {
        let (s, _, v) = probe.get("/readyz").await.unwrap();
        if s == 503 {
            assert_eq!(v["error"]["code"], "not_ready", "{v}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still ready: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(&faults, "").unwrap();
    for t in hung {
        let (s, _, v) = t.await.unwrap().unwrap();
        assert_eq!(s, 504, "{v}");
    }
    // Ready again once the stalled calls return.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while probe.get("/readyz").await.unwrap().0 != 200 {
        assert!(std::time::Instant::now() < deadline, "not ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, _, v) = probe
        .post("/v1/sign", &json!({"key":"demo","data":HELLO}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_generated_after_start_is_exposed_by_sighup_and_a_failed_key_refresh_keeps_the_keys()
{
    let install = Install::new();
    let (d, faults) = start_with_faults_file(&install).await;
    // svs-provision's part (operations.md §3.6), done while svsd runs: a new
    // key on the token, exposed in [keys], granted to the entity, SIGHUP.
    let token = install.open_token(1).await;
    token.generate_key("fresh", None).await.unwrap();
    drop(token);
    install.edit_config(|t| t.replace("[keys]\n", "[keys]\nfresh = { object = \"fresh\" }\n"));
    let dev = install.dev_client();
    install.write_entities(&entity(
        "dev-client",
        &dev.sha256,
        &["demo", "fresh"],
        &["sign", "verify"],
        "",
    ));
    d.signal("HUP");
    let log = wait_for_log(&d, "configuration reloaded", 1).await;
    assert!(!log.contains("reload refused"), "{log}");
    let mut c = d.client(false).await;
    let sign = json!({"key":"fresh","data":HELLO});
    let (s, _, v) = c.post("/v1/sign", &sign).await.unwrap();
    assert_eq!(s, 200, "{v}");
    let (s, _, v) = c
        .post(
            "/v1/verify",
            &json!({"key":"fresh","data":HELLO,"signature":v["signature"]}),
        )
        .await
        .unwrap();
    assert_eq!((s, &v["valid"]), (200, &json!(true)), "{v}");

    // The token cannot list its objects: the reload is refused and the
    // keys svsd knows stay usable once the token is back.
    std::fs::write(&faults, "C_FindObjectsInit:device_error").unwrap();
    // The soft token looks at the file's modification time at most every
    // 20 ms.
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.signal("HUP");
    let log = wait_for_log(&d, "reload refused", 1).await;
    assert!(log.contains("re-reading the token's keys"), "{log}");
    std::fs::write(&faults, "").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (s, _, v) = c.post("/v1/sign", &sign).await.unwrap();
        if s == 200 {
            break;
        }
        // The pool may still be recovering its sessions; an unknown key
        // would mean the failed refresh emptied the list.
        assert_eq!(s, 503, "{v}");
        assert!(std::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every record of the installation's audit trail, in order.
fn audit_records(install: &Install) -> Vec<Value> {
    let mut out = Vec::new();
    for (_, f) in svs_appliance::audit::trail_files(&install.audit_dir()).unwrap() {
        let bytes = svs_appliance::audit::read_trail_file(&f).unwrap();
        for line in std::str::from_utf8(&bytes).unwrap().lines() {
            out.push(serde_json::from_str(line).unwrap());
        }
    }
    out
}

/// The `detail` of every audit record of type `kind`, without the digest
/// of the entities file a `reload` record ends with.
fn notes(install: &Install, kind: &str) -> Vec<String> {
    audit_records(install)
        .into_iter()
        .filter(|r| r["type"] == kind)
        .map(|r| {
            let detail = r["detail"].as_str().unwrap_or_default();
            match svs_appliance::reload::entities_sha256_of(detail) {
                Some(digest) => detail.replace(
                    &format!("; {} {digest}", svs_appliance::reload::ENTITIES_SHA256),
                    "",
                ),
                None => detail.to_owned(),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_re_created_on_the_token_serves_only_after_an_accepted_reload_tested_it() {
    let install = Install::new();
    let d = install.start().await;
    // A connection per request: the steps between them (svs-provision,
    // reloads) may outlast keep-alive.
    let sign = async || {
        d.client(false)
            .await
            .post("/v1/sign", &json!({"key":"demo","data":HELLO}))
            .await
            .unwrap()
    };
    let served_key = async || {
        let (s, _, v) = d.client(false).await.get("/v1/keys/demo").await.unwrap();
        assert_eq!(s, 200, "{v}");
        v["public_key"].as_str().unwrap().to_owned()
    };
    // Whether `signature` over HELLO verifies with the public key `pem`.
    let verifies = async |pem: &str, signature: &Value| {
        let body = json!({"public_key": pem, "data": HELLO, "signature": signature});
        let (s, _, v) = d
            .client(false)
            .await
            .post("/v1/verify", &body)
            .await
            .unwrap();
        assert_eq!(s, 200, "{v}");
        v["valid"] == json!(true)
    };
    let old = served_key().await;
    let (s, _, v) = sign().await;
    assert_eq!(s, 200, "{v}");
    assert!(verifies(&old, &v["signature"]).await);

    // A security officer replaces `demo` on the token while svsd runs,
    // with the token named directly: with `--config` svs-provision refuses
    // to delete a key svsd exposes, but nothing stops another tool.
    let pin = install.pin_file();
    let provision = |args: &[&str]| {
        let out = Command::new(svs_provision_bin())
            .env("SVS_SOFTTOKEN_CONF", install.dir.join("softtoken.toml"))
            .args(["--token", "svs-dev", "--pin-file", &pin, "--json"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    provision(&["key", "delete", "--label", "demo", "--yes"]);
    provision(&["key", "generate", "--label", "demo"]);

    // A reload svsd refuses ([keys] names an object not on the token)
    // changes nothing: the old key is still the one served, no test ran,
    // nothing was recorded. Gone from the token, it can sign no more.
    install.edit_config(|t| t.replace("[keys]\n", "[keys]\nghost = { object = \"ghost\" }\n"));
    d.signal("HUP");
    let log = wait_for_log(&d, "reload refused", 1).await;
    assert!(log.contains("\"ghost\" not found"), "{log}");
    assert_eq!(served_key().await, old);
    let (s, _, v) = sign().await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (503, Some("hsm_unavailable")),
        "{v}"
    );
    assert_eq!(notes(&install, "selftest").len(), 1, "the start's only");
    assert!(notes(&install, "reload").is_empty());

    // Accepted: the new key passes its pairwise test, then serves.
    install.edit_config(|t| t.replace("ghost = { object = \"ghost\" }\n", ""));
    d.signal("HUP");
    wait_for_log(&d, "configuration reloaded", 1).await;
    let new = served_key().await;
    assert_ne!(new, old);
    let (s, _, v) = sign().await;
    assert_eq!(s, 200, "{v}");
    assert!(verifies(&new, &v["signature"]).await);
    assert!(!verifies(&old, &v["signature"]).await);
    let reloads = notes(&install, "reload");
    assert_eq!(
        reloads,
        ["1 entities; keys re-keyed: demo; pairwise test passed: demo"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_status_follows_readiness_when_a_periodic_self_test_fails_and_recovers() {
    let install = Install::new();
    install.edit_config(|t| {
        t.replace(
            "[selftest]\ninterval_s = 300\n",
            "[selftest]\ninterval_s = 1\n",
        )
    });
    let faults = install.dir.join("faults");
    std::fs::write(&faults, "").unwrap();
    let path = install.dir.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let d = install
        .start_with_env(&[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("SVS_SOFTTOKEN_FAULTS_FILE", faults.to_str().unwrap()),
        ])
        .await;
    // The STATUS= lines heard until `wanted` is one of them.
    let until_status = |wanted: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut heard = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = socket.recv(&mut buf) {
                heard.extend(
                    String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .filter_map(|l| l.strip_prefix("STATUS="))
                        .map(str::to_owned),
                );
                if heard.iter().any(|s| s == wanted) {
                    return heard;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no STATUS={wanted}: heard {heard:?}\n{}",
                d.log_text()
            );
        }
    };
    until_status("ready");
    let mut c = d.client(false).await;
    assert_eq!(c.get("/readyz").await.unwrap().0, 200);

    std::fs::write(&faults, "C_Sign:device_error").unwrap();
    until_status("not ready: self-tests failed");
    let (s, _, v) = c.get("/readyz").await.unwrap();
    assert_eq!(s, 503, "{v}");
    // A 503 from /readyz is its answer, not a failed request: the journal
    // has the alarm, not a line per probe.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(c.get("/readyz").await.unwrap().0, 503);
    }
    let log = d.log_text();
    assert!(log.contains("ALARM self-test failed"), "{log}");
    assert!(!log.contains("request failed"), "{log}");

    std::fs::write(&faults, "").unwrap();
    until_status("ready");
    assert_eq!(c.get("/readyz").await.unwrap().0, 200);
}

/// `openssl pkeyutl -verify` of an SM2-with-SM3 signature (DER) over a
/// message with the default ID, files relative to `dir`.
fn openssl_sm2_verify(
    dir: &std::path::Path,
    public_key: &str,
    message: &str,
    signature: &str,
) -> std::process::Output {
    Command::new("openssl")
        .args([
            "pkeyutl", "-verify", "-pubin", "-inkey", public_key, "-rawin", "-in",
        ])
        .arg(message)
        .args(["-sigfile", signature, "-digest", "sm3"])
        .args(["-pkeyopt", "distid:1234567812345678"])
        .current_dir(dir)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_pin_locked_while_svsd_runs_raises_an_alarm_and_signing_goes_on() {
    let install = Install::new();
    let d = install.start().await;
    let page = scrape_metrics(install.metrics_addr).await;
    assert_eq!(
        sample(&page, r#"svs_hsm_user_pin{state="locked"}"#),
        Some(0.0),
        "{page}"
    );
    // Someone types wrong PINs at the token until it locks.
    let wrong = install.dir.join("wrong-pin");
    std::fs::write(&wrong, "not-the-pin\n").unwrap();
    // Five wrong PINs lock the dev token; the run that finds it locked
    // exits 6 (the fifth or, depending on how svs-provision reads the
    // token's flags, a sixth).
    let mut codes = Vec::new();
    while codes.last() != Some(&Some(6)) {
        assert!(codes.len() < 6, "never locked: {codes:?}");
        let out = Command::new(svs_provision_bin())
            .env("SVS_SOFTTOKEN_CONF", install.dir.join("softtoken.toml"))
            .args(["--token", "svs-dev", "--pin-file"])
            .arg(&wrong)
            .args(["key", "list", "--login"])
            .output()
            .unwrap();
        codes.push(out.status.code());
    }
    let log = wait_for_log(&d, "ALARM the token's user PIN is locked", 1).await;
    assert!(!log.contains("not-the-pin"), "{log}");
    let page = scrape_metrics(install.metrics_addr).await;
    assert_eq!(
        sample(&page, r#"svs_hsm_user_pin{state="locked"}"#),
        Some(1.0),
        "{page}"
    );
    // The sessions svsd logged in before keep signing; readiness stays.
    assert_eq!(sample(&page, "svs_ready"), Some(1.0), "{page}");
    let (s, _, v) = d
        .client(false)
        .await
        .post("/v1/sign", &json!({"key":"demo","data":HELLO}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
}
