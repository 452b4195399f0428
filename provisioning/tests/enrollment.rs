//! The whole enrollment on the built-in SM2 soft token, as a security
//! officer does it, against the real svsd: generate → csr → an OpenSSL SM2
//! CA issues the certificate → cert import → entity add → svsd serves and
//! signs with the key → audit verify; then tampering with the trail is
//! located, and every refused input leaves the token unchanged.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{DISTID, key_state, prov, sh, sm2_ca, sm2_issue};
use serde_json::json;
use svs_e2e::{Client, Install, b64, unb64};

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, l: &[String]) {
    std::fs::write(path, l.join("\n") + "\n").unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_flow_with_svsd_and_audit_verification() {
    let install = Install::new();
    let dir = install.dir.clone();
    let work = install.tmp.path().to_path_buf();
    let config = install.config.to_str().unwrap().to_owned();
    let pin = dir.join("pin");
    let pin = pin.to_str().unwrap();
    let base = ["--config", config.as_str(), "--pin-file", pin];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |extra: &[&str]| {
        let args = with(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        prov(&args, &[], "")
    };

    // Generate: SM2, with an id and a public key.
    let gen_out = run(&["--json", "key", "generate", "--label", "enrolled"])
        .ok()
        .json();
    assert_eq!(gen_out["algorithm"], "SM2");
    assert_eq!(gen_out["id"].as_str().unwrap().len(), 32);
    assert!(
        gen_out["public_key"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PUBLIC KEY-----")
    );

    // CSR signed through the token, checked by OpenSSL with the default ID.
    let req = work.join("req.pem");
    run(&[
        "csr",
        "--label",
        "enrolled",
        "--subject",
        "CN=enrolled,O=Test Unit,C=CN",
        "--san",
        "DNS:signer.example",
        "--key-usage",
        "digitalSignature,nonRepudiation",
        "--out",
        req.to_str().unwrap(),
    ])
    .ok();
    let text = sh(
        &work,
        "openssl",
        &[
            "req", "-in", "req.pem", "-verify", "-noout", "-text", "-vfyopt", DISTID,
        ],
    );
    assert!(
        text.contains("verify OK") || text.contains("self-signature verify OK"),
        "{text}"
    );
    assert!(text.contains("SM2-with-SM3"), "{text}");
    assert!(text.contains("DNS:signer.example"), "{text}");

    // An SM2 CA made with the OpenSSL CLI issues it; also an expired one,
    // and one for a key that is not the token's.
    sm2_ca(&work);
    sm2_issue(&work, "req.pem", "cert.pem", "30");
    sm2_issue(&work, "req.pem", "expired.pem", "-1");
    sh(
        &work,
        "openssl",
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:SM2",
            "-out",
            "stranger.key",
        ],
    );
    sh(
        &work,
        "openssl",
        &[
            "req",
            "-new",
            "-key",
            "stranger.key",
            "-sm3",
            "-sigopt",
            DISTID,
            "-subj",
            "/CN=stranger",
            "-out",
            "stranger.csr",
        ],
    );
    sm2_issue(&work, "stranger.csr", "stranger.pem", "30");
    std::fs::write(
        work.join("malformed.pem"),
        "-----BEGIN CERTIFICATE-----\nMIIB!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(work.join("wrong-pin"), "not-the-pin\n").unwrap();

    // Refused inputs: each a clear message, its exit code, token unchanged.
    let before = key_state(&base, &[]);
    let p = |f: &str| work.join(f).to_str().unwrap().to_owned();
    run(&[
        "cert",
        "import",
        "--label",
        "enrolled",
        "--file",
        &p("expired.pem"),
    ])
    .fails(7, "expired at");
    run(&[
        "cert",
        "import",
        "--label",
        "enrolled",
        "--file",
        &p("stranger.pem"),
    ])
    .fails(7, "is for another key");
    run(&[
        "cert",
        "import",
        "--label",
        "enrolled",
        "--file",
        &p("malformed.pem"),
    ])
    .fails(7, "malformed.pem");
    run(&[
        "cert",
        "import",
        "--label",
        "nosuch",
        "--file",
        &p("cert.pem"),
    ])
    .fails(3, "no key labelled 'nosuch'");
    run(&["key", "generate", "--label", "enrolled"]).fails(
        4,
        &format!("`svs-provision -c {config} key delete --label enrolled`"),
    );
    run(&["csr", "--label", "nosuch", "--subject", "CN=x"]).fails(3, "keys present:");
    run(&["csr", "--label", "enrolled", "--subject", "garbage"]).fails(2, "RFC 4514");
    prov(
        &[
            "--config",
            &config,
            "--pin-file",
            &p("wrong-pin"),
            "key",
            "generate",
            "--label",
            "x",
        ],
        &[],
        "",
    )
    .fails(5, "user PIN is wrong");
    prov(
        &["--config", &config, "--token", "nosuch", "key", "list"],
        &[],
        "",
    )
    .fails(
        3,
        "token 'nosuch' not found in the built-in soft token; tokens present: 'svs-dev' (slot 0)",
    );
    assert_eq!(
        key_state(&base, &[]),
        before,
        "refused commands changed the token"
    );

    // Import with the chain; svsd will serve both.
    let imported = run(&[
        "--json",
        "cert",
        "import",
        "--label",
        "enrolled",
        "--file",
        &p("cert.pem"),
        "--chain",
        &p("ca.pem"),
    ])
    .ok()
    .json();
    assert_eq!(imported["chain_stored"], 1);
    let listed = key_state(&base, &[]);
    let k = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["label"] == "enrolled")
        .unwrap()
        .clone();
    assert_eq!(k["certificate"]["subject"], "CN=enrolled,O=Test Unit,C=CN");
    run(&[
        "cert",
        "import",
        "--label",
        "enrolled",
        "--file",
        &p("cert.pem"),
    ])
    .ok();
    run(&["key", "delete", "--label", "svs-audit", "--yes"]).fails(2, "audit checkpoint key");
    assert_eq!(key_state(&base, &[])["keys"].as_array().unwrap().len(), 4);
    let pubkey = work.join("pub.pem");
    run(&[
        "key",
        "export-public",
        "--label",
        "enrolled",
        "--out",
        pubkey.to_str().unwrap(),
    ])
    .ok();

    // Expose the key (svsd.toml is the lead's), frequent checkpoints, then the entity.
    install.edit_config(|t| {
        t.replace("[keys]\n", "[keys]\nenrolled = { object = \"enrolled\" }\n")
            .replace("checkpoint_interval_s = 60", "checkpoint_interval_s = 1")
    });
    let app = install.issue_client("app1");
    // Officers annotate entities; every `entity` command keeps their words.
    let note = "# dev-client: the README's curl client; owner ops, ticket OPS-1234\n";
    let trailing = "  # the demo key only\n";
    let text = std::fs::read_to_string(dir.join("entities.toml")).unwrap();
    let text = text
        .replacen("[[entity]]\n", &format!("{note}[[entity]]\n"), 1)
        .replacen("]\noperations", &format!("]{trailing}operations"), 1);
    assert!(text.contains(note) && text.contains(trailing), "{text}");
    std::fs::write(dir.join("entities.toml"), &text).unwrap();
    let entities_before = std::fs::read_to_string(dir.join("entities.toml")).unwrap();
    run(&[
        "entity",
        "add",
        "--name",
        "app1",
        "--cert",
        app.cert.to_str().unwrap(),
        "--keys",
        "nosuch",
        "--ops",
        "sign",
        "--no-reload",
    ])
    .fails(3, "not exposed by svsd");
    run(&[
        "entity",
        "add",
        "--name",
        "dev-client",
        "--cert",
        app.cert.to_str().unwrap(),
        "--keys",
        "enrolled",
        "--ops",
        "sign",
        "--no-reload",
    ])
    .fails(4, "exists already");
    run(&[
        "entity",
        "add",
        "--name",
        "app1",
        "--cert",
        &p("malformed.pem"),
        "--keys",
        "enrolled",
        "--ops",
        "sign",
        "--no-reload",
    ])
    .fails(7, "malformed.pem");
    // A certificate svsd's handshake would refuse (another CA issued it) is
    // not bound: the officer hears it now, not from the application.
    use svs_appliance::tls::devpki::{DevCa, save_issued};
    let other_ca = DevCa::generate("Other CA").unwrap();
    let (foreign, _) = save_issued(&dir, "foreign", &other_ca.client("app1").unwrap()).unwrap();
    run(&[
        "entity",
        "add",
        "--name",
        "app1",
        "--cert",
        foreign.to_str().unwrap(),
        "--keys",
        "enrolled",
        "--ops",
        "sign",
        "--no-reload",
    ])
    .fails(7, "TLS handshake would refuse");
    // svsd's loader refuses the name; the message names the entities file,
    // not the temporary file the edit was checked in (deleted by then).
    let r = run(&[
        "entity",
        "add",
        "--name",
        "bad name",
        "--cert",
        app.cert.to_str().unwrap(),
        "--keys",
        "enrolled",
        "--ops",
        "sign",
        "--no-reload",
    ])
    .fails(8, "entity \"bad name\": name must be");
    let named = format!(
        "{} entity \"bad name\"",
        dir.join("entities.toml").display()
    );
    assert!(
        r.stderr.contains(&named) && !r.stderr.contains(".entities-"),
        "{}",
        r.stderr
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("entities.toml")).unwrap(),
        entities_before
    );
    run(&[
        "entity",
        "add",
        "--name",
        "app1",
        "--cert",
        app.cert.to_str().unwrap(),
        "--keys",
        "enrolled",
        "--ops",
        "sign,verify",
        "--rate",
        "100/s",
        "--no-reload",
    ])
    .ok();
    // A suspend or resume that changes nothing writes nothing and needs
    // no svsd to reload.
    let entities_file = || std::fs::metadata(dir.join("entities.toml")).unwrap().ino();
    let unchanged = entities_file();
    let r = run(&["entity", "resume", "--name", "app1"]).ok();
    assert!(
        r.stdout
            .contains("entity \"app1\" is already active; nothing was changed"),
        "{}",
        r.stdout
    );
    assert_eq!(entities_file(), unchanged);
    run(&["entity", "suspend", "--name", "app1", "--no-reload"]).ok();
    let suspended = entities_file();
    assert_ne!(suspended, unchanged);
    let r = run(&["entity", "suspend", "--name", "app1"]).ok();
    assert!(r.stdout.contains("is already suspended"), "{}", r.stdout);
    assert_eq!(entities_file(), suspended);
    run(&["entity", "resume", "--name", "app1", "--no-reload"]).ok();
    // How `entity list --json` shows an entity.
    let listed = |name: &str| {
        let ents = run(&["--json", "entity", "list"]).ok().json();
        ents["entities"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap()
            .clone()
    };
    let a = listed("app1");
    assert_eq!(
        a["client"]["certificate_sha256"],
        app.sha256.replace(':', "").to_lowercase()
    );
    assert_eq!(a["rate"]["per_second"], 100.0);

    // svsd serves the key and its chain, and signs with it for app1.
    let daemon = install.start().await;
    let mut c = Client::connect(daemon.addr, &daemon.ca, &app, false)
        .await
        .unwrap();
    let (st, _, body) = c.get("/v1/keys/enrolled").await.unwrap();
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        body["public_key"].as_str().unwrap().trim(),
        std::fs::read_to_string(&pubkey).unwrap().trim()
    );
    let chain = body["certificate_chain"].as_str().unwrap();
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2, "{chain}");
    let msg = b"enrolled and signing";
    let (st, _, body) = c
        .post("/v1/sign", &json!({"key": "enrolled", "data": b64(msg)}))
        .await
        .unwrap();
    assert_eq!(st, 200, "{body}");
    std::fs::write(work.join("msg.bin"), msg).unwrap();
    std::fs::write(
        work.join("sig.der"),
        unb64(body["signature"].as_str().unwrap()),
    )
    .unwrap();
    sh(
        &work,
        "openssl",
        &[
            "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin", "-in", "msg.bin",
            "-sigfile", "sig.der", "-digest", "sm3", "-pkeyopt", DISTID,
        ],
    );
    // The chain as svsd gave it verifies by its first (leaf) certificate.
    let (st, _, body) = c
        .post(
            "/v1/verify",
            &json!({"certificate": chain, "data": b64(msg), "signature": body["signature"]}),
        )
        .await
        .unwrap();
    assert_eq!((st, body["valid"].as_bool()), (200, Some(true)), "{body}");

    // Suspend through SIGHUP to svsd's pid: refused at once after the reload.
    let pid = daemon.child.id().to_string();
    run(&["entity", "suspend", "--name", "app1", "--pid", &pid]).ok();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Client::connect(daemon.addr, &daemon.ca, &app, false)
            .await
            .unwrap();
        let (st, _, body) = c
            .post("/v1/sign", &json!({"key": "enrolled", "data": b64(msg)}))
            .await
            .unwrap();
        if st == 403 {
            assert_eq!(body["error"]["code"], "entity_suspended");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "suspension not applied: {st} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run(&["entity", "resume", "--name", "app1", "--pid", &pid]).ok();
    // A pid or pid file that names no svsd is refused before the edit:
    // nothing changes, and the corrected command can simply be run again.
    let entities_before = std::fs::read_to_string(dir.join("entities.toml")).unwrap();
    run(&["entity", "suspend", "--name", "app1", "--pid", "1"]).fails(2, "not svsd");
    // Half through a server certificate renewal (a new key, its certificate
    // not issued yet), svsd would refuse the reload: so is the edit.
    let key = dir.join("server-key.pem");
    let live_key = std::fs::read(&key).unwrap();
    let other_key = install.issue_client("renewal-in-progress").key;
    std::fs::copy(&other_key, &key).unwrap();
    run(&["entity", "suspend", "--name", "app1", "--pid", &pid])
        .fails(8, "svsd would refuse the reload: [tls]")
        .fails(8, "is not the key of the certificate");
    std::fs::write(&key, live_key).unwrap();
    // An svsd started with another configuration would not read this one.
    let other = dir.join("svsd-copy.toml");
    std::fs::copy(dir.join("svsd.toml"), &other).unwrap();
    prov(
        &[
            "--config",
            other.to_str().unwrap(),
            "entity",
            "suspend",
            "--name",
            "app1",
            "--pid",
            &pid,
        ],
        &[],
        "",
    )
    .fails(2, "runs with the configuration");
    std::fs::remove_file(&other).unwrap();
    let missing = work.join("nonexistent.pid");
    run(&[
        "entity",
        "suspend",
        "--name",
        "app1",
        "--pid-file",
        missing.to_str().unwrap(),
    ])
    .fails(2, "cannot be read");
    assert_eq!(
        std::fs::read_to_string(dir.join("entities.toml")).unwrap(),
        entities_before
    );
    // A reload svsd refuses (it exposes a key the token lacks) is not
    // reported as done: svsd writes no reload record for it.
    let ghost = "ghost = { object = \"no-such-object\" }\n";
    install.edit_config(|t| t.replace("[keys]\n", &format!("[keys]\n{ghost}")));
    run(&["entity", "suspend", "--name", "app1", "--pid", &pid]).fails(14, "did not confirm");
    install.edit_config(|t| t.replace(ghost, ""));
    run(&["entity", "resume", "--name", "app1", "--pid", &pid]).ok();

    // `entity update`: a key granted and a renewed certificate, in place,
    // without a remove and add (which cut the application off between).
    let sign_with = async |cert: &svs_e2e::ClientCert, key: &str| {
        let mut c = Client::connect(daemon.addr, &daemon.ca, cert, false)
            .await
            .unwrap();
        let (st, _, body) = c
            .post("/v1/sign", &json!({"key": key, "data": b64(msg)}))
            .await
            .unwrap();
        (st, body["error"]["code"].as_str().map(str::to_owned))
    };
    assert_eq!(
        sign_with(&app, "demo").await,
        (403, Some("key_not_allowed".into()))
    );
    let before = std::fs::read_to_string(dir.join("entities.toml")).unwrap();
    // `entity update --name app1` with `extra`.
    let update_app1 = |extra: &[&str]| {
        let mut args = vec!["entity", "update", "--name", "app1"];
        args.extend_from_slice(extra);
        run(&args)
    };
    update_app1(&["--no-reload"]).fails(2, "nothing to change");
    run(&[
        "entity",
        "update",
        "--name",
        "app9",
        "--ops",
        "sign",
        "--no-reload",
    ])
    .fails(3, "no entity named \"app9\"");
    update_app1(&["--keys", "enrolled,nosuch", "--no-reload"]).fails(3, "not exposed by svsd");
    update_app1(&["--cert", foreign.to_str().unwrap(), "--no-reload"])
        .fails(7, "Nothing was changed");
    // Another tenant's certificate, given by mistake: svsd would take it for
    // that tenant no longer (the most specific match wins), so it is refused,
    // as `add` of it matched by key instead of whole certificate is.
    let dev_cert = install.dev_client().cert;
    update_app1(&[
        "--cert",
        dev_cert.to_str().unwrap(),
        "--match-key",
        "--no-reload",
    ])
    .fails(
        4,
        "already recognises this certificate as entity \"dev-client\"",
    );
    run(&[
        "entity",
        "add",
        "--name",
        "app2",
        "--cert",
        dev_cert.to_str().unwrap(),
        "--match-key",
        "--ops",
        "verify",
        "--no-reload",
    ])
    .fails(4, "already recognises this certificate");
    assert_eq!(
        std::fs::read_to_string(dir.join("entities.toml")).unwrap(),
        before
    );
    let grant_demo = || update_app1(&["--keys", "enrolled,demo", "--pid", &pid]).ok();
    let r = grant_demo();
    assert!(r.stdout.contains("keys [enrolled,demo]"), "{}", r.stdout);
    assert_eq!(sign_with(&app, "demo").await, (200, None));
    // The same again changes nothing: no write, no reload.
    let unchanged = entities_file();
    let r = grant_demo();
    assert!(r.stdout.contains("nothing was changed"), "{}", r.stdout);
    // A key named twice is written once: the same again.
    let r = update_app1(&["--keys", "enrolled,demo,demo", "--pid", &pid]).ok();
    assert!(r.stdout.contains("nothing was changed"), "{}", r.stdout);
    update_app1(&["--max-concurrent", "0", "--no-reload"]).fails(2, "at least 1");
    assert_eq!(entities_file(), unchanged);
    let renewed = install.issue_client("app1-renewed");
    update_app1(&["--cert", renewed.cert.to_str().unwrap(), "--pid", &pid]).ok();
    assert_eq!(sign_with(&renewed, "enrolled").await, (200, None));
    assert_eq!(
        sign_with(&app, "enrolled").await,
        (401, Some("unauthenticated".into()))
    );
    let a = listed("app1");
    assert_eq!(
        a["client"]["certificate_sha256"],
        renewed.sha256.as_str(),
        "{a}"
    );
    // Settings not named stay: its rate limit and its operations.
    assert_eq!(a["rate"]["per_second"], 100.0, "{a}");
    assert_eq!(a["operations"], json!(["sign", "verify"]), "{a}");

    // An emergency: every entity suspended in one edit and one reload.
    let r = run(&["entity", "suspend", "--all", "--pid", &pid]).ok();
    assert!(
        r.stdout.contains("suspended: dev-client, app1"),
        "{}",
        r.stdout
    );
    assert_eq!(
        sign_with(&renewed, "enrolled").await,
        (403, Some("entity_suspended".into()))
    );
    assert_eq!(
        sign_with(&install.dev_client(), "demo").await,
        (403, Some("entity_suspended".into()))
    );
    let r = run(&["entity", "suspend", "--all", "--no-reload"]).ok();
    assert!(r.stdout.contains("already suspended"), "{}", r.stdout);
    run(&["entity", "suspend", "--no-reload"]).fails(2, "--name");
    for name in ["dev-client", "app1"] {
        run(&["entity", "resume", "--name", name, "--pid", &pid]).ok();
    }
    assert_eq!(sign_with(&renewed, "enrolled").await, (200, None));
    let entities = std::fs::read_to_string(dir.join("entities.toml")).unwrap();
    assert!(
        entities.contains(note) && entities.contains(trailing),
        "comments lost after add/suspend/resume:\n{entities}"
    );
    // Let at least one checkpoint be written, then stop svsd.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    daemon.signal("TERM");
    drop(daemon);

    // The auditor: no PIN; audit key's public half read from the token.
    let audit_dir = install.audit_dir();
    let v = prov(&["--config", &config, "--json", "audit", "verify"], &[], "")
        .ok()
        .json();
    assert_eq!(v["intact"], true);
    assert!(v["checkpoints"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["records"].as_u64().unwrap() >= 5, "{v}");
    let shown = prov(
        &[
            "--config", &config, "--json", "audit", "show", "--entity", "app1", "--key", "enrolled",
        ],
        &[],
        "",
    )
    .ok()
    .json();
    assert!(
        shown["records"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["entity"] == "app1" && r["key"] == "enrolled")
    );
    assert!(!shown["records"].as_array().unwrap().is_empty());
    // The wrong key for checkpoints is a break too.
    prov(
        &["--config", &config, "audit", "verify", "--key", "enrolled"],
        &[],
        "",
    )
    .fails(10, "bad_checkpoint");

    // Tampering, deleting, reordering: detected and located.
    let file = svs_appliance::audit::trail_files(&audit_dir).unwrap()[0]
        .1
        .clone();
    let name = file.file_name().unwrap().to_owned();
    let original = lines(&file);
    assert!(original.len() >= 5);
    let case = |what: &str, f: &dyn Fn(&mut Vec<String>)| {
        let d = work.join(what);
        copy_dir(&audit_dir, &d);
        let mut l = original.clone();
        f(&mut l);
        write_lines(&d.join(&name), &l);
        prov(
            &[
                "--config",
                &config,
                "audit",
                "verify",
                "--dir",
                d.to_str().unwrap(),
            ],
            &[],
            "",
        )
    };
    let r = case("tampered", &|l| {
        // One byte inside record 3's time.
        let mut b = l[2].clone().into_bytes();
        let i = l[2].find("\"time\":\"").unwrap() + 9;
        b[i] = if b[i] == b'1' { b'2' } else { b'1' };
        l[2] = String::from_utf8(b).unwrap();
    });
    let r = r.fails(10, "the record was altered");
    assert!(
        r.stderr
            .contains(&format!("{}:3 (seq 3)", name.to_str().unwrap())),
        "{}",
        r.stderr
    );
    let r = case("deleted", &|l| {
        l.remove(2);
    })
    .fails(10, "record 3 is missing");
    assert!(r.stderr.contains(":3 (seq 4)"), "{}", r.stderr);
    case("reordered", &|l| l.swap(2, 3)).fails(10, "out of order");
}
