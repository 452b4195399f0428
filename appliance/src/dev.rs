//! `svsd --dev`: a throw-away installation in one directory — a soft-token
//! store with demo SM2 keys and an audit key, a dev CA with server and
//! client certificates, an entities file, and the svsd.toml tying them up.

use std::path::{Path, PathBuf};

use cryptoki::mechanism::vendor_defined::VendorDefinedMechanism;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, KeyType};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use svs_hsm::ModuleSource;
use svs_softtoken::vendor::{CKK_SM2, CKM_SM2_KEY_PAIR_GEN};
use zeroize::Zeroizing;

use crate::error::SvsError;
use crate::tls::devpki::{DevCa, save_issued, write};
use crate::tls::sha256_hex;

/// Marks a directory as made by `--dev`, so it may be wiped and remade.
const MARKER: &str = ".svs-dev";
/// Common name of the dev CA.
pub const DEV_CA_NAME: &str = "SVS dev CA";
/// Token label of the dev token.
pub const DEV_TOKEN: &str = "svs-dev";
/// The demo signing key.
pub const DEMO_KEY: &str = "demo";
/// A second signing key, not exposed by the dev config (tests expose it).
pub const OTHER_KEY: &str = "other";
/// The audit checkpoint key.
pub const AUDIT_KEY: &str = "svs-audit";

/// What `--dev` made.
#[derive(Debug, Clone)]
pub struct DevSetup {
    /// The directory.
    pub dir: PathBuf,
    /// svsd.toml in it.
    pub config: PathBuf,
    /// The listen address.
    pub addr: std::net::SocketAddr,
    /// The metrics listen address.
    pub metrics_addr: std::net::SocketAddr,
}

fn err(e: impl std::fmt::Display) -> SvsError {
    SvsError::Io(format!("dev setup: {e}"))
}

fn random_pin() -> Result<Zeroizing<String>, SvsError> {
    let mut bytes = Zeroizing::new([0u8; 12]);
    getrandom::fill(bytes.as_mut()).map_err(err)?;
    Ok(Zeroizing::new(svs_hsm::keys::hex(bytes.as_ref())))
}

/// Creates a dev installation in `dir` (wiping an earlier one), with
/// metrics on the default port. Blocking.
pub fn init(dir: &Path, port: u16) -> Result<DevSetup, SvsError> {
    init_with_metrics(dir, port, 9464)
}

/// [`init`] with the metrics listener on 127.0.0.1:`metrics_port`.
pub fn init_with_metrics(dir: &Path, port: u16, metrics_port: u16) -> Result<DevSetup, SvsError> {
    if dir.exists() {
        if !dir.join(MARKER).exists() && std::fs::read_dir(dir).map_err(err)?.next().is_some() {
            return Err(err(format!(
                "{} exists and was not made by --dev: refusing to wipe it",
                dir.display()
            )));
        }
        std::fs::remove_dir_all(dir).map_err(err)?;
    }
    std::fs::create_dir_all(dir.join("audit")).map_err(err)?;
    let dir = dir.canonicalize().map_err(err)?;
    // It holds private keys and the PIN, by default under /tmp.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    write(
        &dir.join(MARKER),
        "made by svsd --dev; deleted and remade on each run\n",
        false,
    )?;

    // The soft token: a store in the directory, cheap PIN hashing (throw-away).
    let token_conf = dir.join("softtoken.toml");
    write(
        &token_conf,
        &format!(
            "store_dir = \"{}\"\nslots = 1\nkdf_iterations = 1000\n",
            dir.join("store").display()
        ),
        false,
    )?;
    std::hint::black_box(svs_softtoken::C_GetFunctionList as *const ());
    svs_softtoken::set_config_path(Some(token_conf.clone()));
    let pkcs11 = svs_hsm::token::load_module(&ModuleSource::Embedded)?;
    let slot = *pkcs11
        .get_all_slots()
        .map_err(err)?
        .first()
        .ok_or_else(|| err("the soft token has no slot"))?;
    let so_pin = random_pin()?;
    let user_pin = random_pin()?;
    pkcs11
        .init_token(slot, &AuthPin::new(so_pin.as_str().into()), DEV_TOKEN)
        .map_err(err)?;
    let session = pkcs11.open_rw_session(slot).map_err(err)?;
    session
        .login(UserType::So, Some(&AuthPin::new(so_pin.as_str().into())))
        .map_err(err)?;
    session
        .init_pin(&AuthPin::new(user_pin.as_str().into()))
        .map_err(err)?;
    session.logout().map_err(err)?;
    session
        .login(
            UserType::User,
            Some(&AuthPin::new(user_pin.as_str().into())),
        )
        .map_err(err)?;
    let sm2 = KeyType::new_vendor_defined(CKK_SM2).map_err(err)?;
    let keygen = Mechanism::VendorDefined(VendorDefinedMechanism::new::<()>(
        MechanismType::new_vendor_defined(CKM_SM2_KEY_PAIR_GEN).map_err(err)?,
        None,
    ));
    for (i, label) in [DEMO_KEY, OTHER_KEY, AUDIT_KEY].iter().enumerate() {
        let common = |extra: &[Attribute]| {
            let mut v = vec![
                Attribute::Token(true),
                Attribute::KeyType(sm2),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(vec![i as u8 + 1]),
            ];
            v.extend_from_slice(extra);
            v
        };
        session
            .generate_key_pair(
                &keygen,
                &common(&[Attribute::Verify(true)]),
                &common(&[
                    Attribute::Sign(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                ]),
            )
            .map_err(err)?;
    }
    session.logout().map_err(err)?;
    drop(session);
    write(&dir.join("pin"), &format!("{}\n", user_pin.as_str()), true)?;

    // PKI: CA, server certificate, one client certificate.
    let ca = DevCa::generate(DEV_CA_NAME)?;
    ca.save(&dir)?;
    save_issued(&dir, "server", &ca.server(&["localhost", "127.0.0.1"])?)?;
    let client = ca.client("dev-client")?;
    save_issued(&dir, "client", &client)?;

    write(
        &dir.join("entities.toml"),
        &format!(
            "# Application entities (svs-provision edits this file; SIGHUP reloads it).\n\
             [[entity]]\n\
             name = \"dev-client\"\n\
             certificate_sha256 = \"{}\"\n\
             keys = [\"{DEMO_KEY}\"]\n\
             operations = [\"sign\", \"verify\"]\n\
             rate = {{ per_second = 10000.0, burst = 20000 }}\n",
            sha256_hex(&client.cert_der)
        ),
        false,
    )?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let metrics_addr = std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let config = dir.join("svsd.toml");
    write(
        &config,
        &format!(
            r#"# Made by `svsd --dev`: a throw-away installation. Paths are relative to this file.
entities_file = "entities.toml"

[server]
listen = ["{addr}"]
grace_period_ms = 5000

[tls]
certificate = "server.pem"
private_key = "server-key.pem"
client_ca = "ca.pem"

[hsm]
module = "embedded"
token_label = "{DEV_TOKEN}"
pin = {{ file = "{pin}" }}
[hsm.pool]
size = 2

[embedded_token]
config = "softtoken.toml"

[keys]
{DEMO_KEY} = {{ object = "{DEMO_KEY}" }}

[limits]
max_body_bytes = 1048576
max_batch_items = 256

[audit]
dir = "audit"
checkpoint_key = "{AUDIT_KEY}"
checkpoint_interval_s = 60

[selftest]
interval_s = 300

[metrics]
listen = "{metrics_addr}"

[anomaly]
enforce = false
"#,
            pin = dir.join("pin").display()
        ),
        false,
    )?;
    Ok(DevSetup {
        dir,
        config,
        addr,
        metrics_addr,
    })
}

impl DevSetup {
    /// The curl commands that sign and verify against this installation.
    pub fn curl_commands(&self) -> String {
        let d = self.dir.display();
        let base = format!(
            "curl -sS --cacert {d}/ca.pem --cert {d}/client.pem --key {d}/client-key.pem -H 'content-type: application/json'"
        );
        let url = format!("https://{}", self.addr);
        format!(
            "# sign \"hello\" (base64 aGVsbG8=) with the demo SM2 key:\n\
             {base} -d '{{\"key\":\"demo\",\"data\":\"aGVsbG8=\"}}' {url}/v1/sign\n\
             \n\
             # sign, then verify that signature:\n\
             SIG=$({base} -d '{{\"key\":\"demo\",\"data\":\"aGVsbG8=\"}}' {url}/v1/sign | sed -E 's/.*\"signature\":\"([^\"]+)\".*/\\1/')\n\
             {base} -d \"{{\\\"key\\\":\\\"demo\\\",\\\"data\\\":\\\"aGVsbG8=\\\",\\\"signature\\\":\\\"$SIG\\\"}}\" {url}/v1/verify\n\
             \n\
             # metrics (Prometheus text format):\n\
             curl -sS http://{}/metrics\n",
            self.metrics_addr
        )
    }
}
