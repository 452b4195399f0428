//! First boot and fatal start-up errors: svsd on an installation that is
//! not provisioned yet stays up not-ready and starts on SIGHUP; an invalid
//! configuration or a PIN the token refuses ends it with status 78.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use svs_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Starts svsd on `install` without waiting for it to be ready.
fn spawn(install: &Install, env: &[(&str, &str)]) -> Daemon {
    install.spawn_with(env, None)
}

/// Adds a plain-HTTP probe listener to the installation; returns its address.
fn add_health_listen(install: &Install) -> SocketAddr {
    let health = SocketAddr::from(([127, 0, 0, 1], free_port()));
    install.edit_config(|t| {
        t.replace(
            "grace_period_ms = 5000",
            &format!("grace_period_ms = 5000\nhealth_listen = \"{health}\""),
        )
    });
    health
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprovisioned_svsd_waits_not_ready_and_starts_on_sighup() {
    let install = Install::new();
    let health = add_health_listen(&install);
    // The production layout before svs-provision ran: the configuration
    // names TLS files and a PIN file that do not exist yet.
    let prod = install.dir.join("prod");
    std::fs::create_dir(&prod).unwrap();
    install.edit_config(|t| {
        t.replace("\"server.pem\"", "\"prod/server.pem\"")
            .replace("\"server-key.pem\"", "\"prod/server-key.pem\"")
            .replace("\"ca.pem\"", "\"prod/ca.pem\"")
            .replace(
                &format!("{}\"", install.dir.join("pin").display()),
                &format!("{}\"", prod.join("pin").display()),
            )
    });
    let text = std::fs::read_to_string(&install.config).unwrap();
    assert!(text.contains("prod/pin"), "{text}");
    let d = spawn(&install, &[]);

    let body = wait_for(&d, health, "/readyz", 503).await;
    assert_eq!(body["error"]["code"], "not_ready");
    assert_eq!(
        body["error"]["message"],
        "not provisioned: TLS files, HSM PIN missing \u{2014} provision the appliance (docs/operations.md §3)"
    );
    let (status, alive) = probe_get(health, "/healthz").await.unwrap();
    assert_eq!((status, alive), (200, json!({"status": "alive"})));
    // Prometheus sees a daemon that is up and says why it is not ready
    // (SvsNotReady), not a target that is down, and nothing of the parts
    // that do not run yet: `svs_audit_writable 0` would be a false alarm.
    let page = scrape_metrics(install.metrics_addr).await;
    assert!(page.starts_with("HTTP/1.0 200"), "{page}");
    assert_eq!(sample(&page, "svs_ready"), Some(0.0), "{page}");
    assert_eq!(
        sample(&page, r#"svs_not_ready_reason{reason="not_provisioned"}"#),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, r#"svs_not_ready_reason{reason="hsm_unavailable"}"#),
        Some(0.0),
        "{page}"
    );
    assert!(page.contains("\nprocess_resident_memory_bytes "), "{page}");
    assert!(!page.contains("svs_audit_writable"), "{page}");
    // Retries do not repeat the reason in the log, and nothing else is served.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(probe_get(health, "/v1/keys").await.unwrap().0, 404);
    let mut d = d;
    assert!(d.wait(Duration::from_millis(10)).is_none(), "svsd exited");
    let log = d.log_text();
    assert_eq!(
        log.matches("not ready: not provisioned").count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("prod/server.pem"),
        "details belong in the log: {log}"
    );

    // An officer suspends an entity before svsd has started: svsd, waiting,
    // writes no reload record, and svs-provision says what that means
    // instead of "did not confirm" (exit 14).
    let entity = |command: &str| {
        Command::new(svs_provision_bin())
            .arg("--config")
            .arg(&install.config)
            .args(["entity", command, "--name", "dev-client", "--pid"])
            .arg(d.child.id().to_string())
            .output()
            .unwrap()
    };
    for command in ["suspend", "resume"] {
        let out = entity(command);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(
            stdout.contains("is waiting to start (not provisioned: TLS files, HSM PIN missing"),
            "{stdout}"
        );
    }

    // The officer puts the files in place; the next `entity` command's
    // reload makes svsd start, and its `start` record, which read the
    // edited entities file, confirms the edit.
    for f in ["server.pem", "server-key.pem", "ca.pem", "pin"] {
        std::fs::copy(install.dir.join(f), prod.join(f)).unwrap();
    }
    let out = entity("suspend");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("reloaded (confirmed by its audit record"),
        "{stdout}"
    );
    let out = entity("resume");
    assert!(out.status.success(), "{out:?}");
    let body = wait_for(&d, health, "/readyz", 200).await;
    assert_eq!(body, json!({"status": "ready"}));
    // The same metrics port now serves everything, all reasons 0.
    let page = scrape_metrics(install.metrics_addr).await;
    assert_eq!(sample(&page, "svs_ready"), Some(1.0), "{page}");
    assert_eq!(
        sample(&page, r#"svs_not_ready_reason{reason="not_provisioned"}"#),
        Some(0.0),
        "{page}"
    );
    assert_eq!(sample(&page, "svs_audit_writable"), Some(1.0), "{page}");
    let mut c = d.client(false).await;
    let (status, _, sig) = c
        .post("/v1/sign", &json!({"key": "demo", "data": "aGVsbG8="}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{sig}");
    assert!(sig["signature"].is_string(), "{sig}");

    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(15)).unwrap().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_waiting_exits_0_and_keys_missing_is_a_reason() {
    let install = Install::new();
    let health = add_health_listen(&install);
    keys_missing(&install);
    // As under systemd with WatchdogSec=1s: the waiting daemon must keep
    // pinging, or systemd would kill an appliance that is only unprovisioned.
    let notify_path = install.dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut d = spawn(
        &install,
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let body = wait_for(&d, health, "/readyz", 503).await;
    assert_eq!(
        body["error"]["message"],
        "not provisioned: keys missing \u{2014} provision the appliance (docs/operations.md §3)"
    );
    let mut pings = 0;
    let until = Instant::now() + Duration::from_millis(2500);
    let mut buf = [0u8; 512];
    while Instant::now() < until {
        if let Ok(n) = notify.recv(&mut buf) {
            pings += String::from_utf8_lossy(&buf[..n])
                .lines()
                .filter(|l| *l == "WATCHDOG=1")
                .count();
        }
    }
    assert!(
        pings >= 3,
        "only {pings} watchdog pings in 2.5 s while waiting"
    );
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(15)).unwrap().code(), Some(0));
}

fn exit_status(install: &Install, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut d = spawn(install, env);
    let st = d.wait(Duration::from_secs(30)).expect("svsd did not exit");
    (st.code(), d.log_text())
}

#[test]
fn tls_files_that_are_there_but_wrong_end_svsd_while_the_pin_is_still_missing() {
    let install = Install::new();
    // The officer's TLS step went wrong (another key than the
    // certificate's); the PIN credential is not there yet.
    std::fs::copy(
        install.dir.join("client-key.pem"),
        install.dir.join("server-key.pem"),
    )
    .unwrap();
    std::fs::remove_file(install.dir.join("pin")).unwrap();
    let (code, log) = exit_status(&install, &[]);
    assert_eq!(code, Some(78), "{log}");
    assert!(
        log.contains("server-key.pem") || log.contains("private_key"),
        "{log}"
    );
    assert!(!log.contains("not ready: not provisioned"), "{log}");
}

#[test]
fn a_refused_pin_exits_78_at_once_and_says_so_once() {
    let install = Install::new();
    std::fs::write(install.dir.join("pin"), "00000000\n").unwrap();
    let (code, log) = exit_status(&install, &[]);
    assert_eq!(code, Some(78), "{log}");
    assert_eq!(log.matches("refused the PIN").count(), 1, "{log}");
    assert!(log.contains("CKR_PIN_INCORRECT"), "{log}");
    // Where the PIN came from and what to do, never the PIN.
    let pin_file = install.dir.join("pin");
    assert!(
        log.contains(&format!(
            "the PIN in the file {} is not the token's user PIN",
            pin_file.display()
        )),
        "{log}"
    );
    assert!(log.contains("docs/operations.md §4"), "{log}");
    assert!(!log.contains("00000000"), "{log}");
    // stderr is a file here: no colour codes.
    assert!(!log.contains('\u{1b}'), "{log}");
}

#[test]
fn an_invalid_configuration_exits_78_and_journald_lines_carry_their_priority_not_a_timestamp() {
    let install = Install::new();
    install.edit_config(|t| t.replace("max_batch_items = 256", "max_batch_items = 0"));
    let (code, log) = exit_status(&install, &[("JOURNAL_STREAM", "8:1234")]);
    assert_eq!(code, Some(78), "{log}");
    assert_eq!(log.matches("max_batch_items").count(), 1, "{log}");
    // Every line, continuation lines of a multi-line error included,
    // starts with its syslog priority, which journald takes off.
    let errors: Vec<_> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(!errors.is_empty(), "{log}");
    for line in errors {
        assert!(line.starts_with("<3>ERROR"), "{line}");
    }
    let detail = log.lines().find(|l| l.contains("max_batch_items")).unwrap();
    assert!(detail.starts_with("<3>"), "{detail}");
    for line in log.lines().filter(|l| l.contains("INFO")) {
        assert!(line.starts_with("<6>INFO"), "{line}");
    }
    let st = Command::new(svsd_bin())
        .arg("--check-config")
        .arg("--config")
        .arg(&install.config)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(78));
    assert!(Path::new(&install.config).exists());
}

#[test]
fn check_config_reports_every_error_at_once() {
    let install = Install::new();
    install.edit_config(|t| {
        t.replace("max_batch_items = 256", "max_batch_items = 0")
            .replace("[selftest]\ninterval_s = 300", "[selftest]\ninterval_s = 0")
            .replace("checkpoint_key = \"svs-audit\"\n", "")
    });
    let out = Command::new(svsd_bin())
        .arg("--check-config")
        .arg("--config")
        .arg(&install.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    for wanted in [
        "max_batch_items must be > 0",
        "[selftest] interval_s must be 1-604800",
        "checkpoints need checkpoint_key",
    ] {
        assert!(err.contains(wanted), "{wanted:?} not in {err}");
    }
    assert!(out.stdout.is_empty(), "said valid: {out:?}");
}

#[test]
fn check_config_checks_the_tls_files_and_notes_missing_ones() {
    let install = Install::new();
    let check = || {
        Command::new(svsd_bin())
            .arg("--check-config")
            .arg("--config")
            .arg(&install.config)
            .output()
            .unwrap()
    };
    let out = check();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(": valid"));
    // A server certificate that is not the private key's.
    let server = install.dir.join("server.pem");
    let saved = std::fs::read(&server).unwrap();
    std::fs::copy(install.dev_client().cert, &server).unwrap();
    let out = check();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("[tls]"),
        "{out:?}"
    );
    // Not there yet (not provisioned): valid, with a note; svsd would wait.
    std::fs::remove_file(&server).unwrap();
    let out = check();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not provisioned yet") && err.contains("server.pem"),
        "{err}"
    );
    std::fs::write(&server, saved).unwrap();
    assert_eq!(check().status.code(), Some(0));
}

#[test]
fn check_config_names_every_entity_whose_issuer_is_no_client_ca_certificate() {
    let install = Install::new();
    let check = || {
        Command::new(svsd_bin())
            .arg("--check-config")
            .arg("--config")
            .arg(&install.config)
            .output()
            .unwrap()
    };
    let by_subject = |name: &str, issuer: &str| {
        format!(
            "[[entity]]\nname = \"{name}\"\nsubject = \"CN={name},O=SVS development\"\nissuer = \"{issuer}\"\nkeys = [\"demo\"]\noperations = [\"sign\"]\n"
        )
    };
    let named = by_subject("named", "CN=SVS dev CA,O=SVS development");
    install.write_entities(&named);
    let out = check();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    install.write_entities(&format!(
        "{}{named}{}",
        by_subject("other", "CN=Other CA,O=SVS development"),
        by_subject("below", "CN=Issuing CA,O=SVS development"),
    ));
    let out = check();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for wanted in [
        r#"[tls]: entity "other": issuer "CN=Other CA,O=SVS development""#,
        r#"[tls]: entity "below": issuer "CN=Issuing CA,O=SVS development""#,
    ] {
        assert!(err.contains(wanted), "{wanted:?} not in {err}");
    }
    assert!(!err.contains("\"named\""), "{err}");
    assert!(out.stdout.is_empty(), "said valid: {out:?}");
}

#[test]
fn check_config_checks_the_tls_files_when_the_pin_cannot_be_read() {
    let install = Install::new();
    let check = || {
        Command::new(svsd_bin())
            .arg("--check-config")
            .arg("--config")
            .arg(&install.config)
            .env_remove("CREDENTIALS_DIRECTORY")
            .output()
            .unwrap()
    };
    let pin_line = format!(
        "pin = {{ file = \"{}\" }}",
        install.dir.join("pin").display()
    );
    // The production unit's PIN, run from a shell: no $CREDENTIALS_DIRECTORY.
    install.edit_config(|t| {
        assert!(t.contains(&pin_line), "{t}");
        t.replace(&pin_line, "pin = { credential = \"svs-hsm-pin\" }")
    });
    let out = check();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"svs-hsm-pin\"") && err.contains("cannot be checked here"),
        "{err}"
    );
    // A server certificate that is not the private key's is still found.
    let server = install.dir.join("server.pem");
    std::fs::copy(install.dev_client().cert, &server).unwrap();
    let out = check();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[tls]") && err.contains("cannot be checked here"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "said valid: {out:?}");
    // The same with a PIN file that cannot be read (a directory here).
    let unreadable = install.dir.join("pin-dir");
    std::fs::create_dir(&unreadable).unwrap();
    install.edit_config(|t| {
        t.replace(
            "pin = { credential = \"svs-hsm-pin\" }",
            &format!("pin = {{ file = \"{}\" }}", unreadable.display()),
        )
    });
    let out = check();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[tls]") && err.contains("pin-dir"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_tls_file_is_waited_for_not_fatal() {
    let install = Install::new();
    let health = add_health_listen(&install);
    let server = install.dir.join("server.pem");
    let whole = std::fs::read_to_string(&server).unwrap();
    // svs-provision caught mid-write: the certificate's first lines only.
    let cut: String = whole.lines().take(3).map(|l| format!("{l}\n")).collect();
    std::fs::write(&server, &cut).unwrap();
    let d = spawn(&install, &[]);
    let body = wait_for(&d, health, "/readyz", 503).await;
    assert_eq!(
        body["error"]["message"],
        "not provisioned: TLS files missing \u{2014} provision the appliance (docs/operations.md §3)"
    );
    assert!(
        d.log_text().contains("server.pem is incomplete"),
        "{}",
        d.log_text()
    );
    std::fs::write(&server, whole).unwrap();
    d.signal("HUP");
    wait_for(&d, health, "/readyz", 200).await;
    let mut d = d;
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(15)).unwrap().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_side_ports_answer_while_the_first_start_attempt_hangs_and_sigterm_ends_it() {
    let install = Install::new();
    let health = add_health_listen(&install);
    let faults = install.dir.join("faults");
    // A network HSM that does not answer: the login never returns (for
    // ten minutes).
    std::fs::write(&faults, "C_Login:stall=600000").unwrap();
    let mut d = spawn(
        &install,
        &[("SVS_SOFTTOKEN_FAULTS_FILE", faults.to_str().unwrap())],
    );
    let body = wait_for(&d, health, "/readyz", 503).await;
    assert_eq!(body["error"]["message"], "starting", "{body}");
    let page = scrape_metrics(install.metrics_addr).await;
    assert_eq!(
        sample(&page, r#"svs_not_ready_reason{reason="starting"}"#),
        Some(1.0),
        "{page}"
    );
    assert_eq!(sample(&page, "svs_ready"), Some(0.0), "{page}");
    assert_eq!(
        wait_for(&d, health, "/healthz", 200).await["status"],
        "alive"
    );
    sigterm_ends_the_start_attempt(&mut d);
    // Nothing reached the trail: the attempt never got that far.
    assert!(audit_is_empty(&install));
}

/// SIGTERM during a start attempt: svsd exits 0 at once, saying so.
fn sigterm_ends_the_start_attempt(d: &mut Daemon) {
    d.signal("TERM");
    let st = d.wait(Duration::from_secs(20));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", d.log_text());
    assert!(
        d.log_text().contains("stopped during a start attempt"),
        "{}",
        d.log_text()
    );
}

/// No record in the installation's trail (or no trail at all).
fn audit_is_empty(install: &Install) -> bool {
    if !install.audit_dir().exists() {
        return true;
    }
    svs_appliance::audit::trail_files(&install.audit_dir())
        .unwrap()
        .iter()
        .all(|(_, f)| svs_appliance::audit::read_trail_file(f).unwrap().is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_while_waiting_is_announced_and_its_hanging_attempt_keeps_the_probes_answering() {
    let install = Install::new();
    let health = add_health_listen(&install);
    keys_missing(&install);
    let faults = install.dir.join("faults");
    std::fs::write(&faults, "").unwrap();
    let notify_path = install.dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut d = spawn(
        &install,
        &[
            ("SVS_SOFTTOKEN_FAULTS_FILE", faults.to_str().unwrap()),
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
        ],
    );
    let waiting = wait_for(&d, health, "/readyz", 503).await;
    // The next login never returns (for ten minutes).
    std::fs::write(&faults, "C_Login:stall=600000").unwrap();
    while notify.recv(&mut [0u8; 512]).is_ok() {}
    d.signal("HUP");
    // systemd (Type=notify-reload) waits for READY=1 after RELOADING=1.
    let mut heard = Vec::new();
    let until = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 512];
    while !heard.iter().any(|l: &String| l == "READY=1") && Instant::now() < until {
        if let Ok(n) = notify.recv(&mut buf) {
            heard.extend(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_owned),
            );
        }
    }
    let reloading = heard.iter().position(|l| l == "RELOADING=1");
    let ready = heard.iter().position(|l| l == "READY=1");
    assert!(
        reloading.is_some() && reloading < ready,
        "heard {heard:?}\n{}",
        d.log_text()
    );
    // The attempt the reload started hangs on the login; the probe goes on
    // answering with the reason svsd waits for.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let answer = tokio::time::timeout(Duration::from_secs(1), probe_get(health, "/readyz"))
            .await
            .unwrap_or_else(|_| panic!("the probe hangs during the attempt: {}", d.log_text()));
        assert_eq!(answer, Some((503, waiting.clone())));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sigterm_ends_the_start_attempt(&mut d);
}

/// An installation whose keys are not on the token yet: svsd waits.
fn keys_missing(install: &Install) {
    install.edit_config(|t| {
        t.replace(
            "demo = { object = \"demo\" }",
            "demo = { object = \"later\" }",
        )
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_connection_opened_while_waiting_is_answered_across_retries() {
    let install = Install::new();
    let health = add_health_listen(&install);
    keys_missing(&install);
    let mut d = spawn(&install, &[]);
    let waiting = wait_for(&d, health, "/readyz", 503).await;
    // Connected now, asked after the next retries (at 1 and 3 s).
    let mut s = tokio::net::TcpStream::connect(health).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    s.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.starts_with("HTTP/1.0 503"),
        "{text:?}\n{}",
        d.log_text()
    );
    let body: Value = serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body, waiting);
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(15)).unwrap().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_while_waiting_may_swap_the_probe_and_metrics_ports() {
    let install = Install::new();
    let health = add_health_listen(&install);
    keys_missing(&install);
    let mut d = spawn(&install, &[]);
    wait_for(&d, health, "/readyz", 503).await;
    let metrics = install.metrics_addr;
    install.edit_config(|t| {
        t.replace(&format!("\"{health}\""), "\"HEALTH\"")
            .replace(&format!("\"{metrics}\""), &format!("\"{health}\""))
            .replace("\"HEALTH\"", &format!("\"{metrics}\""))
    });
    d.signal("HUP");
    // The probe now answers on the metrics port, and the metrics page is
    // served on the probe's.
    wait_for(&d, metrics, "/readyz", 503).await;
    let page = scrape_metrics(health).await;
    assert_eq!(sample(&page, "svs_ready"), Some(0.0), "{page}");
    d.signal("TERM");
    let st = d.wait(Duration::from_secs(15));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", d.log_text());
}

#[test]
fn a_taken_api_port_ends_svsd_before_the_trail_records_a_start() {
    let install = Install::new();
    let _taken = std::net::TcpListener::bind(install.addr).unwrap();
    let (code, log) = exit_status(&install, &[]);
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains(&install.addr.to_string()), "{log}");
    assert!(audit_is_empty(&install), "{log}");
}
