//! svsd's answers conform to docs/openapi.json, as judged by a third-party
//! tool: Schemathesis (PyPI, pinned in .ci/run) runs against the real svsd
//! on a `--dev` installation (127.0.0.1, the dev client certificate), with
//! a fixed number of examples per operation in deterministic mode. The run
//! must pass every check, and its HAR report must show that the handlers
//! were reached: 2xx answers on every route, signatures in batches, a
//! verification that succeeds (the document's sign → verify link) and one
//! that fails, throttled answers with their Retry-After.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use svs_appliance::app::Route;
use svs_e2e::*;

/// The checks every answer must pass (`response_headers_conformance`:
/// required headers such as Retry-After on 429 and Allow on 405;
/// `unsupported_method`: other methods get 405 with Allow).
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_schema_conformance,response_headers_conformance,unsupported_method";

/// One answer from the HAR report.
#[derive(Debug)]
struct Exchange {
    method: String,
    path: String,
    status: u16,
    headers: BTreeMap<String, String>,
    body: Value,
}

impl Exchange {
    /// The route's metric name (`sign`, `key`, …), or `other`.
    fn route(&self) -> &'static str {
        Route::parse(&self.method, &self.path).map_or("other", |r| r.metric_name())
    }
}

/// Runs schemathesis on `d` with `extra` arguments; returns its output and
/// the exchanges it recorded. Fails the test when schemathesis fails.
fn schemathesis(d: &Daemon, dir: &Path, name: &str, extra: &[&str]) -> (String, Vec<Exchange>) {
    let doc = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let har = dir.join(format!("{name}.har"));
    let mut cmd = Command::new("schemathesis");
    cmd.arg("run")
        .arg(doc)
        .arg("--url")
        .arg(format!("https://127.0.0.1:{}", d.addr.port()))
        .arg("--tls-verify")
        .arg(&d.ca)
        .arg("--request-cert")
        .arg(&d.client.cert)
        .arg("--request-cert-key")
        .arg(&d.client.key)
        .args(["--checks", CHECKS])
        .arg("--generation-deterministic")
        .args(["--workers", "1", "--request-timeout", "10", "--no-color"])
        .args(["--report", "har", "--report-har-path"])
        .arg(&har)
        .args(extra)
        .current_dir(dir);
    println!("{cmd:?}");
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis failed (a disagreement between svsd and docs/openapi.json, or a bad run):\n{text}\n\
         svsd log:\n{}",
        d.log_text()
    );
    let har: Value = serde_json::from_str(&std::fs::read_to_string(&har).unwrap()).unwrap();
    let entries = har["log"]["entries"].as_array().unwrap();
    let exchanges = entries
        .iter()
        .map(|e| {
            let url = e["request"]["url"].as_str().unwrap();
            let path = url
                .split_once("://")
                .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
                .unwrap_or("/");
            let path = path.split('?').next().unwrap().to_owned();
            let headers = e["response"]["headers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| {
                    (
                        h["name"].as_str().unwrap().to_ascii_lowercase(),
                        h["value"].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            let body = e["response"]["content"]["text"]
                .as_str()
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or(Value::Null);
            Exchange {
                method: e["request"]["method"].as_str().unwrap().to_owned(),
                path,
                status: e["response"]["status"].as_u64().unwrap() as u16,
                headers,
                body,
            }
        })
        .collect();
    (text, exchanges)
}

/// `(route, status)` → count.
fn tally(exchanges: &[Exchange]) -> BTreeMap<(&'static str, u16), usize> {
    let mut t = BTreeMap::new();
    for e in exchanges {
        *t.entry((e.route(), e.status)).or_insert(0) += 1;
    }
    t
}

/// "N generated" from the summary.
fn generated(text: &str) -> usize {
    text.lines()
        .find_map(|l| l.trim().split_once(" generated,"))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no test case count in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svsd_conforms_to_its_openapi_document() {
    if !have_tool(
        Command::new("schemathesis").arg("--version"),
        "schemathesis",
    ) {
        return;
    }
    let version = Command::new("schemathesis")
        .arg("--version")
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&version.stdout).trim());

    // Every phase: the document's examples, its boundaries (coverage),
    // generated and schema-violating input (fuzzing), and chains along
    // its links (stateful).
    let install = Install::new();
    let d = install.start().await;
    let (text, ex) = schemathesis(&d, &install.dir, "all", &["--max-examples", "20"]);
    let t = tally(&ex);
    println!("{t:?}");
    assert!(generated(&text) >= 300, "{text}");
    for route in [
        "sign",
        "sign_batch",
        "verify",
        "verify_batch",
        "keys",
        "key",
        "healthz",
        "readyz",
    ] {
        let ok = t.get(&(route, 200)).copied().unwrap_or(0);
        assert!(ok > 0, "no 200 on {route}: {t:?}");
    }
    for route in ["sign", "sign_batch", "verify", "verify_batch"] {
        for status in [400, 415] {
            assert!(
                t.contains_key(&(route, status)),
                "no {status} on {route}: {t:?}"
            );
        }
    }
    assert!(t.contains_key(&("sign", 404)), "no unknown key: {t:?}");
    assert!(ex.iter().all(|e| e.status < 500), "{t:?}");
    let results = |route: &str, field: &str| {
        ex.iter()
            .filter(|e| e.route() == route && e.status == 200)
            .flat_map(|e| e.body["results"].as_array().cloned().unwrap_or_default())
            .filter(|r| r.get(field).is_some())
            .count()
    };
    assert!(results("sign_batch", "signature") > 0, "{t:?}");
    assert!(results("verify_batch", "valid") > 0, "{t:?}");
    let verdicts = |valid: bool| {
        ex.iter()
            .filter(|e| e.route() == "verify" && e.status == 200)
            .filter(|e| e.body["valid"] == valid)
            .count()
    };
    assert!(verdicts(true) > 0, "no signature verified: {t:?}");
    assert!(verdicts(false) > 0, "no wrong signature answered: {t:?}");
    let not_allowed: Vec<_> = ex.iter().filter(|e| e.status == 405).collect();
    assert!(!not_allowed.is_empty());
    for e in not_allowed {
        let allow = e.headers.get("allow").map(String::as_str);
        assert!(
            matches!(allow, Some("POST" | "GET, HEAD")),
            "{} {}: {allow:?}",
            e.method,
            e.path
        );
    }
    drop(d);

    // Throttled: an entity allowed one request in ten seconds; every 429 must
    // carry the Retry-After the document requires.
    let install = Install::new();
    let client = install.dev_client();
    install.write_entities(&format!(
        "[[entity]]\nname = \"dev-client\"\ncertificate_sha256 = \"{}\"\nkeys = [\"demo\"]\n\
         operations = [\"sign\", \"verify\"]\nrate = {{ per_second = 0.1, burst = 2 }}\n",
        client.sha256
    ));
    let d = install.start().await;
    let (_, ex) = schemathesis(
        &d,
        &install.dir,
        "throttled",
        &[
            "--max-examples",
            "5",
            "--include-method",
            "POST",
            "--phases",
            "examples,fuzzing",
        ],
    );
    let t = tally(&ex);
    println!("{t:?}");
    let throttled: Vec<_> = ex.iter().filter(|e| e.status == 429).collect();
    assert!(throttled.len() >= 10, "{t:?}");
    for e in throttled {
        let secs = e.headers.get("retry-after").map(|v| v.parse::<u64>());
        assert!(matches!(secs, Some(Ok(1..))), "{} {secs:?}", e.path);
        assert_eq!(e.body["error"]["code"], "rate_limited");
    }
}
