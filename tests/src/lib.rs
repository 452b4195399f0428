//! Harness for end-to-end tests and the benchmark: builds and starts the
//! real `svsd` binary on a `--dev` installation (soft token, dev PKI), and
//! talks to it over HTTPS with client certificates (HTTP/1.1 or HTTP/2).

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use svs_appliance::dev::DEV_CA_NAME;
use svs_appliance::tls::devpki::{DevCa, save_issued};
use svs_appliance::tls::sha256_hex;

/// The svsd binary, built once per test process (a no-op when up to date).
pub fn svsd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SVSD_BIN") {
        return PathBuf::from(p);
    }
    workspace_bin("svsd")
}

/// The svs-provision binary, built once per test process.
pub fn svs_provision_bin() -> PathBuf {
    workspace_bin("svs-provision")
}

/// A binary of the workspace in this test's profile, built on first use.
fn workspace_bin(name: &'static str) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<std::collections::BTreeMap<&str, PathBuf>>> =
        OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(p) = built.get(name) {
        return p.clone();
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let release = dir.ends_with("release");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // `--workspace`, not `-p <package>`: features resolve as in
    // `cargo test --workspace`, so nothing is rebuilt. Resolved for one
    // package, shared crates get other features, and svs-softtoken's
    // rlib (a cdylib crate: no hash in its file name) is rebuilt in
    // place under the running test build, whose later steps (doc
    // tests) then fail with "can't find crate".
    cmd.args(["build", "-q", "--workspace", "--bin", name]);
    if release {
        cmd.arg("--release");
    }
    let st = cmd
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(st.success(), "building {name} failed");
    let path = dir.join(name);
    built.insert(name, path.clone());
    path
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A client certificate on disk.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// Certificate PEM path.
    pub cert: PathBuf,
    /// Key PEM path.
    pub key: PathBuf,
    /// SHA-256 of the DER certificate, hex.
    pub sha256: String,
}

/// A `--dev` installation in a temporary directory.
#[derive(Debug)]
pub struct Install {
    /// Keeps the directory alive.
    pub tmp: tempfile::TempDir,
    /// The installation directory.
    pub dir: PathBuf,
    /// svsd.toml.
    pub config: PathBuf,
    /// HTTPS address.
    pub addr: SocketAddr,
    /// Metrics address (plain HTTP).
    pub metrics_addr: SocketAddr,
}

impl Install {
    /// Creates an installation with `svsd --dev --dev-init-only`.
    pub fn new() -> Install {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dev");
        let port = free_port();
        let metrics_port = free_port();
        let out = Command::new(svsd_bin())
            .args(["--dev", "--dev-init-only", "--allow-root", "--dev-port"])
            .arg(port.to_string())
            .arg("--dev-metrics-port")
            .arg(metrics_port.to_string())
            .arg("--dev-dir")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = dir.canonicalize().unwrap();
        Install {
            config: dir.join("svsd.toml"),
            dir,
            tmp,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], metrics_port)),
        }
    }

    /// The dev client's certificate.
    pub fn dev_client(&self) -> ClientCert {
        let der = CertificateDer::from_pem_file(self.dir.join("client.pem")).unwrap();
        ClientCert {
            cert: self.dir.join("client.pem"),
            key: self.dir.join("client-key.pem"),
            sha256: sha256_hex(&der),
        }
    }

    /// Issues a client certificate with common name `cn` from the dev CA.
    pub fn issue_client(&self, cn: &str) -> ClientCert {
        let ca = DevCa::load(&self.dir, DEV_CA_NAME).unwrap();
        let issued = ca.client(cn).unwrap();
        let (cert, key) = save_issued(&self.dir, cn, &issued).unwrap();
        ClientCert {
            cert,
            key,
            sha256: sha256_hex(&issued.cert_der),
        }
    }

    /// Replaces the entities file.
    pub fn write_entities(&self, toml: &str) {
        std::fs::write(self.dir.join("entities.toml"), toml).unwrap();
    }

    /// Edits svsd.toml.
    pub fn edit_config(&self, f: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(&self.config, f(text)).unwrap();
    }

    /// Serves the metrics listener over TLS with the dev server
    /// certificate, client certificates from the dev CA required.
    pub fn enable_metrics_tls(&self) {
        self.edit_config(|t| {
            t.replace(
                "\n[anomaly]",
                "\n[metrics.tls]\ncertificate = \"server.pem\"\nprivate_key = \"server-key.pem\"\nclient_ca = \"ca.pem\"\n\n[anomaly]",
            )
        });
    }

    /// The audit directory.
    pub fn audit_dir(&self) -> PathBuf {
        self.dir.join("audit")
    }

    /// This installation's soft token, linked into the calling executable
    /// and logged in as svsd is (an `svs-hsm` pool of `pool_size`
    /// sessions): the same keys, another process. One installation per
    /// process: the linked-in token reads its configuration at the
    /// process's first C_Initialize, and svs-hsm never finalises a module
    /// (its users share it), so a second installation's store would not
    /// be seen. A test binary with more than one test that opens a token
    /// must give them one installation; this panics otherwise.
    pub async fn open_token(&self, pool_size: usize) -> svs_hsm::Hsm {
        static FIRST: OnceLock<PathBuf> = OnceLock::new();
        let first = FIRST.get_or_init(|| self.dir.clone());
        assert_eq!(
            first, &self.dir,
            "this process already linked in another installation's token"
        );
        self.open_token_now(pool_size).await
    }

    /// The user PIN's file, as svsd.toml names it.
    pub fn pin_file(&self) -> String {
        std::fs::read_to_string(&self.config)
            .unwrap()
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("pin = { file = \"")?
                    .strip_suffix("\" }")
            })
            .unwrap()
            .to_owned()
    }

    async fn open_token_now(&self, pool_size: usize) -> svs_hsm::Hsm {
        let token_conf = self.dir.join("softtoken.toml");
        let pin = self.pin_file();
        let cfg = svs_hsm::HsmConfig::from_toml(&format!(
            "module = \"embedded\"\ntoken_label = \"svs-dev\"\npin = {{ file = \"{pin}\" }}\n[pool]\nsize = {pool_size}\n"
        ))
        .unwrap();
        // The same soft token as svsd's, linked into this executable.
        std::hint::black_box(svs_softtoken::C_GetFunctionList as *const ());
        tokio::task::spawn_blocking(move || {
            svs_softtoken::set_config_path(Some(token_conf));
            svs_hsm::Hsm::open(&cfg, Arc::new(svs_hsm::NoMetrics)).unwrap()
        })
        .await
        .unwrap()
    }

    /// Starts svsd on this installation; waits until /readyz answers 200.
    pub async fn start(&self) -> Daemon {
        self.start_with_env(&[]).await
    }

    /// Starts svsd with extra environment variables.
    pub async fn start_with_env(&self, env: &[(&str, &str)]) -> Daemon {
        self.start_with(env, None).await
    }

    /// Starts svsd with extra environment variables, confined to `cpus`
    /// (a `taskset` CPU list such as `1` or `2-3`) when given.
    pub async fn start_with(&self, env: &[(&str, &str)], cpus: Option<&str>) -> Daemon {
        let d = self.spawn_with(env, cpus);
        d.wait_ready().await;
        d
    }

    /// Starts svsd with extra environment variables (and confined to
    /// `cpus`), without waiting for it to be ready.
    pub fn spawn_with(&self, env: &[(&str, &str)], cpus: Option<&str>) -> Daemon {
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.dir.join(format!("svsd-{run}.log"));
        let mut cmd = match cpus {
            // taskset execs svsd: the child's pid is svsd's.
            Some(list) => {
                let mut c = Command::new("taskset");
                c.args(["-c", list]).arg(svsd_bin());
                c
            }
            None => Command::new(svsd_bin()),
        };
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--allow-root")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        Daemon {
            child,
            log,
            addr: self.addr,
            ca: self.dir.join("ca.pem"),
            client: self.dev_client(),
        }
    }
}

impl Default for Install {
    fn default() -> Self {
        Install::new()
    }
}

/// A running svsd.
#[derive(Debug)]
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its stderr.
    pub log: PathBuf,
    /// HTTPS address.
    pub addr: SocketAddr,
    /// CA of the server certificate.
    pub ca: PathBuf,
    /// The dev client.
    pub client: ClientCert,
}

impl Daemon {
    /// Waits until /readyz answers 200 (at most 20 s).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = Client::connect(self.addr, &self.ca, &self.client, false).await
                && let Ok((200, _, _)) = c.get("/readyz").await
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "svsd not ready: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// A client with the dev certificate.
    pub async fn client(&self, h2: bool) -> Client {
        Client::connect(self.addr, &self.ca, &self.client, h2)
            .await
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// One keep-alive HTTPS connection.
pub struct Client {
    sender: Sender,
    addr: SocketAddr,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("addr", &self.addr).finish()
    }
}

/// TLS client configuration with an optional client certificate.
pub fn tls_config(ca: &Path, client: Option<&ClientCert>, h2: bool) -> Arc<rustls::ClientConfig> {
    tls_config_for(ca, client, h2, rustls::DEFAULT_VERSIONS)
}

/// [`tls_config`] offering only the protocol `versions`.
pub fn tls_config_for(
    ca: &Path,
    client: Option<&ClientCert>,
    h2: bool,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots);
    let mut cfg = match client {
        Some(c) => {
            let chain = CertificateDer::pem_file_iter(&c.cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(&c.key).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = if h2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Arc::new(cfg)
}

/// Opens a TLS stream (for tests of raw protocol behaviour).
pub async fn tls_stream(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// Polls the log until `needle` has appeared `count` times.
pub async fn wait_for_log(d: &Daemon, needle: &str, count: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = d.log_text();
        if log.matches(needle).count() >= count {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} not logged {count} times: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GET over plain HTTP/1.0 (the server closes after the answer).
pub async fn probe_get(addr: SocketAddr, path: &str) -> Option<(u16, Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, serde_json::from_str(body).ok()?))
}

/// Polls `path` on a plain-HTTP listener until it answers `status`
/// (within 30 s); returns the JSON body.
pub async fn wait_for(d: &Daemon, addr: SocketAddr, path: &str, status: u16) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((s, body)) = probe_get(addr, path).await
            && s == status
        {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never answered {status}: {}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// svsd's metrics page (plain HTTP, as the dev configuration serves it),
/// with the response head.
pub async fn scrape_metrics(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).await.unwrap();
    page
}

/// The value of the sample with exactly these labels (in the exporter's
/// sorted label order) on a metrics page, if present.
pub fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// (status, headers, JSON body)
pub type Answer = (u16, hyper::HeaderMap, Value);

impl Client {
    /// Connects with `client`'s certificate over HTTP/1.1 or HTTP/2.
    pub async fn connect(
        addr: SocketAddr,
        ca: &Path,
        client: &ClientCert,
        h2: bool,
    ) -> Result<Client, String> {
        Client::connect_with(addr, tls_config(ca, Some(client), h2), h2).await
    }

    /// Connects with a prepared TLS configuration.
    pub async fn connect_with(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        h2: bool,
    ) -> Result<Client, String> {
        let tls = tls_stream(addr, config).await.map_err(|e| e.to_string())?;
        let io = TokioIo::new(tls);
        let sender = if h2 {
            let (s, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Sender::H2(s)
        } else {
            let (s, conn) = http1::handshake(io).await.map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Sender::H1(s)
        };
        Ok(Client { sender, addr })
    }

    /// Sends a request.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Answer, String> {
        let mut b = hyper::Request::builder()
            .method(method)
            .uri(format!("https://localhost:{}{path}", self.addr.port()));
        if matches!(self.sender, Sender::H1(_)) {
            b = b.header("host", format!("localhost:{}", self.addr.port()));
        }
        if let Some(ct) = content_type {
            b = b.header("content-type", ct);
        }
        let req = b.body(Full::new(Bytes::from(body))).unwrap();
        let resp = match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await
            }
        }
        .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, headers, v))
    }

    /// POSTs JSON.
    pub async fn post(&mut self, path: &str, body: &Value) -> Result<Answer, String> {
        self.request(
            "POST",
            path,
            Some("application/json"),
            serde_json::to_vec(body).unwrap(),
        )
        .await
    }

    /// GETs.
    pub async fn get(&mut self, path: &str) -> Result<Answer, String> {
        self.request("GET", path, None, Vec::new()).await
    }
}

/// Standard base64.
pub fn b64(bytes: &[u8]) -> String {
    use base64ct::Encoding;
    base64ct::Base64::encode_string(bytes)
}

/// Decodes standard base64.
pub fn unb64(s: &str) -> Vec<u8> {
    use base64ct::Encoding;
    base64ct::Base64::decode_vec(s).unwrap()
}

/// SM3, hex.
pub fn sm3_hex(data: &[u8]) -> String {
    use sm3::Digest;
    sm3::Sm3::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Is an external tool present? Under CI a missing tool is a failure.
pub fn have_tool(check: &mut Command, name: &str) -> bool {
    let ok = check
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is required under CI"
        );
        eprintln!("SKIP: {name} not available");
    }
    ok
}
