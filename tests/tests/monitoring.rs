//! svsd's metrics listener and the shipped monitoring assets
//! (appliance/monitoring/), against the real binary, promtool and a real
//! Prometheus server. Tests needing promtool or prometheus (Debian package
//! `prometheus`) print SKIP without them, and fail under CI.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use svs_e2e::{
    Client, Install, b64, free_port, have_tool, sample, tls_config, tls_stream, wait_for_log,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../appliance/monitoring")
}

fn have_promtool() -> bool {
    have_tool(Command::new("promtool").arg("--version"), "promtool")
}

/// GET over plain HTTP/1.0 (the server closes after the answer).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    split_response(&raw)
}

fn split_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

fn sign_body(key: &str) -> Value {
    json!({"key": key, "data": b64(b"monitoring test")})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened_with_bounded_labels_and_pass_promtool() {
    let install = Install::new();
    let stranger = install.issue_client("stranger");
    let d = install.start().await;
    let mut c = d.client(false).await;
    for _ in 0..3 {
        let (st, _, _) = c.post("/v1/sign", &sign_body("demo")).await.unwrap();
        assert_eq!(st, 200);
    }
    // A key name the client made up must not become a label value.
    let (st, _, _) = c
        .post("/v1/sign", &sign_body("made-up-key-x9"))
        .await
        .unwrap();
    assert_eq!(st, 404);
    let mut s = Client::connect(d.addr, &d.ca, &stranger, false)
        .await
        .unwrap();
    let (st, _, _) = s.post("/v1/sign", &sign_body("demo")).await.unwrap();
    assert_eq!(st, 401);

    let started = Instant::now();
    let (st, text) = http_get(install.metrics_addr, "/metrics").await;
    let scrape = started.elapsed();
    assert_eq!(st, 200, "{text}");
    eprintln!("scrape: {} bytes in {scrape:?}", text.len());
    let ok = r#"svs_requests_total{entity="dev-client",key="demo",operation="sign",outcome="ok"}"#;
    assert_eq!(sample(&text, ok), Some(3.0), "{text}");
    let unknown_key = r#"svs_requests_total{entity="dev-client",key="_unknown",operation="sign",outcome="unknown_key"}"#;
    assert_eq!(sample(&text, unknown_key), Some(1.0), "{text}");
    let unauthenticated = r#"svs_requests_total{entity="_unknown",key="_none",operation="sign",outcome="unauthenticated"}"#;
    assert_eq!(sample(&text, unauthenticated), Some(1.0), "{text}");
    assert!(!text.contains("made-up-key-x9"));
    // The server certificate's expiry, as the file says.
    let server = std::fs::read(install.dir.join("server.pem")).unwrap();
    let der =
        <rustls_pki_types::CertificateDer as rustls_pki_types::pem::PemObject>::from_pem_slice(
            &server,
        )
        .unwrap();
    let not_after = svs_appliance::metrics::certificate_not_after(&der).unwrap();
    let expiry = r#"svs_tls_certificate_expiry_timestamp_seconds{certificate="api_server"}"#;
    assert_eq!(sample(&text, expiry), Some(not_after), "{text}");
    assert!(
        !text.contains("stranger"),
        "no certificate names in metrics"
    );
    assert_eq!(
        sample(
            &text,
            r#"svs_key_operations_total{key="demo",operation="sign"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"svs_http_requests_total{code="200",operation="sign"}"#
        ),
        Some(3.0)
    );
    // The latency of the three served; the 404 and the 401 are counted
    // above, not timed.
    assert_eq!(
        sample(
            &text,
            r#"svs_request_duration_seconds_count{operation="sign"}"#
        ),
        Some(3.0)
    );
    for (series, value) in [
        ("svs_ready", 1.0),
        ("svs_selftest_ok", 1.0),
        ("svs_audit_writable", 1.0),
        ("svs_hsm_logged_in", 1.0),
        (r#"svs_hsm_health{state="up"}"#, 1.0),
        (r#"svs_hsm_health{state="down"}"#, 0.0),
        (r#"svs_hsm_sessions{state="idle"}"#, 2.0),
        (r#"svs_hsm_sessions{state="in_use"}"#, 0.0),
        (
            r#"svs_entity_anomaly{check="rate",entity="dev-client"}"#,
            0.0,
        ),
        ("svs_entities", 1.0),
        ("svs_build_info{version=\"0.1.0\"}", 1.0),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }
    // Self-test and the 3 signatures went through the pool with the soft
    // token's sign-digest mechanism.
    assert!(
        sample(
            &text,
            r#"svs_hsm_operation_duration_seconds_count{mechanism="0x80008104",operation="sign"}"#
        )
        .unwrap()
            >= 4.0,
        "{text}"
    );
    assert!(sample(&text, "svs_audit_records_total").unwrap() >= 5.0);
    assert!(sample(&text, "svs_audit_fsync_duration_seconds_count").unwrap() >= 1.0);
    assert!(sample(&text, "process_resident_memory_bytes").unwrap() > 0.0);
    assert!(
        sample(&text, "svs_selftest_last_run_timestamp_seconds").unwrap() > 1.7e9,
        "a Unix time"
    );
    let (st, _) = http_get(install.metrics_addr, "/other").await;
    assert_eq!(st, 404);
    let mut s = tokio::net::TcpStream::connect(install.metrics_addr)
        .await
        .unwrap();
    s.write_all(b"POST /metrics HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.0 405") && head.contains("\r\nallow: get, head\r\n"),
        "{head}"
    );

    // Every svs_ metric the shipped rules and dashboard use is exported
    // (some appear only after their event: listed).
    let after_event = [
        "svs_key_certificate_expiry_timestamp_seconds",
        "svs_hsm_errors_total",
        "svs_hsm_recoveries_total",
    ];
    for file in ["alerts.yml", "grafana-dashboard.json"] {
        let assets = std::fs::read_to_string(monitoring_dir().join(file)).unwrap();
        for name in metric_names(&assets) {
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            let exported = text.contains(&format!("# TYPE {base} "))
                || after_event.contains(&base)
                || text.contains(&format!("# HELP {base} "));
            assert!(exported, "{file} uses {name}, which svsd does not export");
        }
    }

    if !have_promtool() {
        return;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check metrics: {said}");
    assert!(said.trim().is_empty(), "promtool lint: {said}");
}

/// `svs_…` and `process_…` metric names in a text (rules, dashboard).
fn metric_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = text[i..].starts_with("svs_") || text[i..].starts_with("process_");
        let boundary = i == 0
            || !(bytes[i - 1].is_ascii_alphanumeric()
                || bytes[i - 1] == b'_'
                || bytes[i - 1] == b':');
        if starts && boundary {
            let end = text[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(text.len(), |e| i + e);
            out.push(text[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    out.sort();
    out.dedup();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_scrapers_do_not_stall_signing() {
    let install = Install::new();
    let d = install.start().await;
    let metrics = install.metrics_addr;
    let signing_done = Arc::new(AtomicBool::new(false));
    // Scrapers that read the answer one byte per 100 ms, with a tiny receive
    // buffer so the server's writes really wait on them.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let done = signing_done.clone();
        slow.push(tokio::spawn(async move {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.set_recv_buffer_size(1024).unwrap();
            let mut s = sock.connect(metrics).await.unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .await
                .unwrap();
            let mut got = 0usize;
            let mut byte = [0u8; 1];
            while !done.load(Ordering::Relaxed) {
                if s.read(&mut byte).await.unwrap() == 0 {
                    break;
                }
                got += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            got
        }));
    }
    // And one that sends its request one byte per 100 ms.
    let done = signing_done.clone();
    let slowloris = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(metrics).await.unwrap();
        for b in b"GET /metrics HTTP/1.1\r\nHost: l".iter().cycle() {
            if done.load(Ordering::Relaxed) || s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let signed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let mut c = d.client(false).await;
        let signed = signed.clone();
        workers.push(tokio::spawn(async move {
            for _ in 0..50 {
                let (st, _, v) = c.post("/v1/sign", &sign_body("demo")).await.unwrap();
                assert_eq!(st, 200, "{v}");
                signed.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // A hang guard, not a speed assertion.
    tokio::time::timeout(Duration::from_secs(60), async {
        for w in workers {
            w.await.unwrap();
        }
    })
    .await
    .expect("signing stalled while scrapers were slow");
    assert_eq!(signed.load(Ordering::Relaxed), 200);
    // Another scraper is served meanwhile too.
    let (st, text) = http_get(metrics, "/metrics").await;
    assert_eq!(st, 200);
    let ok = r#"svs_requests_total{entity="dev-client",key="demo",operation="sign",outcome="ok"}"#;
    assert_eq!(sample(&text, ok), Some(200.0));
    signing_done.store(true, Ordering::Relaxed);
    for s in slow {
        let got = s.await.unwrap();
        // Still reading when signing had finished: the scrape was truly slow.
        assert!(got > 0 && got < text.len(), "slow scraper read {got} bytes");
    }
    slowloris.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listener_with_tls_and_client_certificates() {
    let install = Install::new();
    install.enable_metrics_tls();
    let d = install.start().await;
    let ca = install.dir.join("ca.pem");
    let metrics = install.metrics_addr;
    let get = |client: Option<svs_e2e::ClientCert>| {
        let ca = ca.clone();
        async move {
            let mut s = tls_stream(metrics, tls_config(&ca, client.as_ref(), false))
                .await
                .map_err(|e| e.to_string())?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .await
                .map_err(|e| e.to_string())?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(split_response(&raw))
        }
    };
    let (st, text) = get(Some(d.client.clone())).await.unwrap();
    assert_eq!(st, 200);
    assert!(text.contains("# TYPE svs_ready gauge"), "{text}");
    // Without a client certificate the handshake (or the first read) fails.
    assert!(get(None).await.is_err());
    // Plain HTTP gets no HTTP answer from a TLS listener.
    let mut s = tokio::net::TcpStream::connect(metrics).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await;
    assert!(
        !raw.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
}

/// A metrics certificate renewed in place is served from the next reload
/// on, like the API's (before, only from a restart, and no reload said
/// so); renewed files that are wrong leave the listener serving the
/// certificate it has, with an alarm, and do not hold up the rest of the
/// reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_metrics_certificate_is_served_after_a_reload() {
    let install = Install::new();
    install.enable_metrics_tls();
    // Files of its own, so that only the metrics listener's change.
    let dir = &install.dir;
    std::fs::copy(dir.join("server.pem"), dir.join("metrics.pem")).unwrap();
    std::fs::copy(dir.join("server-key.pem"), dir.join("metrics-key.pem")).unwrap();
    install.edit_config(|t| {
        t.replace(
            "[metrics.tls]\ncertificate = \"server.pem\"\nprivate_key = \"server-key.pem\"",
            "[metrics.tls]\ncertificate = \"metrics.pem\"\nprivate_key = \"metrics-key.pem\"",
        )
    });
    let d = install.start().await;
    let served = async || {
        let config = tls_config(&d.ca, Some(&d.client), false);
        let s = tls_stream(install.metrics_addr, config).await.unwrap();
        s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    let first = served().await;
    let ca = svs_appliance::tls::devpki::DevCa::load(dir, svs_appliance::dev::DEV_CA_NAME).unwrap();
    let renewed = ca.server(&["localhost", "127.0.0.1"]).unwrap();
    svs_appliance::tls::devpki::save_issued(dir, "metrics", &renewed).unwrap();
    assert_eq!(served().await, first, "served before the reload");
    d.signal("HUP");
    wait_for_log(&d, "configuration reloaded", 1).await;
    assert_eq!(served().await, renewed.cert_der);

    // Half renewed: the rest of the reload (here, the entity suspended) is
    // applied, the metrics listener keeps its certificate, and says why.
    std::fs::write(dir.join("metrics-key.pem"), "not a key").unwrap();
    let entities = dir.join("entities.toml");
    let text = std::fs::read_to_string(&entities).unwrap();
    let suspended = text.replace(
        "name = \"dev-client\"",
        "name = \"dev-client\"\nstatus = \"suspended\"",
    );
    assert_ne!(suspended, text);
    std::fs::write(&entities, suspended).unwrap();
    d.signal("HUP");
    let log = wait_for_log(&d, "configuration reloaded", 2).await;
    // The error's list of files follows on the next lines.
    let at = log
        .find("ALARM the [metrics.tls] files cannot be used")
        .unwrap_or_else(|| panic!("no alarm: {log}"));
    let alarm: String = log[at..].lines().take(3).collect();
    assert!(alarm.contains("metrics-key.pem"), "{alarm}");
    assert!(!log.contains("reload refused"), "{log}");
    assert_eq!(served().await, renewed.cert_der);
    let mut c = Client::connect(d.addr, &d.ca, &d.client, false)
        .await
        .unwrap();
    let (st, _, v) = c
        .post("/v1/sign", &json!({"key": "demo", "data": "aGk="}))
        .await
        .unwrap();
    assert_eq!((st, &v["error"]["code"]), (403, &json!("entity_suspended")));
}

#[test]
fn shipped_rules_pass_promtool_check_and_unit_tests() {
    if !have_promtool() {
        return;
    }
    let dir = monitoring_dir();
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dashboard: Value =
        serde_json::from_slice(&std::fs::read(dir.join("grafana-dashboard.json")).unwrap())
            .unwrap();
    assert!(dashboard["panels"].as_array().unwrap().len() > 10);
}

/// A Prometheus server in a temporary directory; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second, with the shipped
    /// rules, their `for:` durations cut to 0 (a test copy: the detector's
    /// short window already gives the verdict its evidence).
    async fn start(dir: &Path, target: SocketAddr) -> Prometheus {
        let rules = std::fs::read_to_string(monitoring_dir().join("alerts.yml")).unwrap();
        let rules: String = rules
            .lines()
            .map(|l| match l.split_once("for: ") {
                Some((indent, _)) if indent.trim().is_empty() => format!("{indent}for: 0s\n"),
                _ => format!("{l}\n"),
            })
            .collect();
        std::fs::write(dir.join("alerts.yml"), rules).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files: [alerts.yml]\n\
                 scrape_configs:\n  - job_name: svsd\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let p = Prometheus { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Ok((200, _))) = tokio::time::timeout(Duration::from_secs(2), async {
                tokio::net::TcpStream::connect(addr).await?;
                Ok::<_, std::io::Error>(http_get(addr, "/-/ready").await)
            })
            .await
            {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready: {}",
                std::fs::read_to_string(&p.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn api(&self, path: &str) -> Value {
        let (st, body) = http_get(self.addr, path).await;
        assert_eq!(st, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The instant vector of a PromQL query.
    async fn query(&self, q: &str) -> Vec<Value> {
        let v = self
            .api(&format!("/api/v1/query?query={}", url_encode(q)))
            .await;
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Firing alerts named `name`.
    async fn firing(&self, name: &str) -> Vec<Value> {
        let v = self.api("/api/v1/alerts").await;
        v["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a["labels"]["alertname"] == name && a["state"] == "firing")
            .collect()
    }
}

/// Signs as `client` at about `per_second` (0 = as fast as it can) until `stop`.
async fn load(
    d_addr: SocketAddr,
    ca: PathBuf,
    client: svs_e2e::ClientCert,
    per_second: u64,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) {
    let mut c = Client::connect(d_addr, &ca, &client, false).await.unwrap();
    let gap = (per_second > 0).then(|| Duration::from_micros(1_000_000 / per_second));
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let (st, _, v) = c.post("/v1/sign", &sign_body("demo")).await.unwrap();
        assert_eq!(st, 200, "{v}");
        count.fetch_add(1, Ordering::Relaxed);
        if let Some(gap) = gap {
            next += gap;
            tokio::time::sleep_until(next.into()).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_the_request_rate_and_the_anomaly_alert_of_the_bursting_entity_only() {
    let t0 = Instant::now();
    if !have_tool(Command::new("prometheus").arg("--version"), "prometheus") {
        return;
    }
    let install = Install::new();
    let steady = install.issue_client("steady");
    let burst = install.issue_client("burst");
    let dev = install.dev_client();
    let entity = |name: &str, sha: &str| {
        format!(
            "[[entity]]\nname = \"{name}\"\ncertificate_sha256 = \"{sha}\"\nkeys = [\"demo\"]\noperations = [\"sign\", \"verify\"]\n"
        )
    };
    install.write_entities(&format!(
        "{}{}{}",
        entity("dev-client", &dev.sha256),
        entity("steady", &steady.sha256),
        entity("burst", &burst.sha256)
    ));
    // Short windows so the test stays short; the model is the same.
    install.edit_config(|t| {
        t.replace(
            "[anomaly]\nenforce = false\n",
            "[anomaly]\nshort_window_s = 3\nlong_window_s = 60\nwarmup_s = 3\nrate_factor = 3.0\nmin_rate = 2.0\nmin_requests = 10\n",
        )
    });
    let d = install.start().await;
    let prom_dir = tempfile::tempdir().unwrap();
    let prom = Prometheus::start(prom_dir.path(), install.metrics_addr).await;

    let stop = Arc::new(AtomicBool::new(false));
    let stop_burst = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in [steady.clone(), burst.clone()] {
        tasks.push(tokio::spawn(load(
            d.addr,
            d.ca.clone(),
            c,
            8,
            stop.clone(),
            count.clone(),
        )));
    }

    // The request rate, through Prometheus.
    let deadline = Instant::now() + Duration::from_secs(20);
    let rate = loop {
        let r = prom
            .query(r#"sum(rate(svs_requests_total{operation="sign",outcome="ok"}[5s]))"#)
            .await;
        let v = r
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
        if v > 5.0 {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no request rate in Prometheus: {r:?}; {}",
            std::fs::read_to_string(&prom.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("request rate seen by Prometheus: {rate:.1}/s");
    assert!(prom.firing("SvsEntityTrafficAnomaly").await.is_empty());
    // Past the warm-up, steady traffic is normal.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(prom.firing("SvsEntityTrafficAnomaly").await.is_empty());

    // A burst from one entity: 4 connections as fast as they go.
    for _ in 0..4 {
        tasks.push(tokio::spawn(load(
            d.addr,
            d.ca.clone(),
            burst.clone(),
            0,
            stop_burst.clone(),
            count.clone(),
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let alerts = loop {
        let a = prom.firing("SvsEntityTrafficAnomaly").await;
        if !a.is_empty() {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "no anomaly alert; svsd log:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let entities: Vec<&str> = alerts
        .iter()
        .map(|a| a["labels"]["entity"].as_str().unwrap_or(""))
        .collect();
    assert!(entities.iter().all(|e| *e == "burst"), "{alerts:?}");
    assert_eq!(alerts[0]["labels"]["check"], "rate");
    // The flip is in the log and the audit trail.
    assert!(d.log_text().contains("ALARM abnormal traffic from entity"));
    let trail: String = std::fs::read_dir(install.audit_dir())
        .unwrap()
        .map(|e| {
            let bytes = svs_appliance::audit::read_trail_file(&e.unwrap().path()).unwrap();
            String::from_utf8(bytes).unwrap()
        })
        .collect();
    assert!(
        trail.contains("\"type\":\"anomaly\"")
            && trail.contains("entity=burst check=rate state=abnormal"),
        "{trail}"
    );
    assert!(!trail.contains("entity=steady check=rate state=abnormal"));
    stop_burst.store(true, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    eprintln!(
        "{} signatures; test took {:?}",
        count.load(Ordering::Relaxed),
        t0.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_secs(60));
}
