//! Shared helpers for the soft token's integration tests.
//!
//! Every test drives the BUILT `libsvs_softtoken.so` through the `cryptoki`
//! crate, exactly as an outside program would. A PKCS#11 module is
//! process-global and reads its configuration at `C_Initialize`, so each test
//! runs its body in a child process of the test executable (see
//! [`run_in_child`]) with its own `SVS_SOFTTOKEN_CONF` and token store.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::vendor_defined::VendorDefinedMechanism;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use sm2::dsa::signature::hazmat::PrehashVerifier;
use sm3::{Digest, Sm3};

// ---------------------------------------------------------------------------
// Vendor numbers (docs/softtoken.md, Sansec numbering)
// ---------------------------------------------------------------------------

pub const CKK_SM2: u64 = 0x8000_0004;
pub const CKM_SM2_KEY_PAIR_GEN: u64 = 0x8000_8001;
pub const CKM_SM3_SM2: u64 = 0x8000_8100;
pub const CKM_SM3_SM2_DER: u64 = 0x8000_8101;
pub const CKM_SM3_SM2_Z: u64 = 0x8000_8102;
pub const CKM_SM3_SM2_Z_DER: u64 = 0x8000_8103;
pub const CKM_SM2_SIGN: u64 = 0x8000_8104;
pub const CKM_SM2_SIGN_NO_DER: u64 = 0x8000_8105;
pub const CKM_SM3: u64 = 0x8000_9001;
/// Sansec SM2 encryption: a vendor number the token does NOT implement.
pub const CKM_SM2_ENCRYPT_UNSUPPORTED: u64 = 0x8000_8200;

pub const ALL_MECHANISMS: [u64; 8] = [
    CKM_SM2_KEY_PAIR_GEN,
    CKM_SM3_SM2,
    CKM_SM3_SM2_DER,
    CKM_SM3_SM2_Z,
    CKM_SM3_SM2_Z_DER,
    CKM_SM2_SIGN,
    CKM_SM2_SIGN_NO_DER,
    CKM_SM3,
];

/// DER of the SM2 curve OID 1.2.156.10197.1.301.
pub const SM2_EC_PARAMS: [u8; 10] = [0x06, 0x08, 0x2A, 0x81, 0x1C, 0xCF, 0x55, 0x01, 0x82, 0x2D];
/// The default distinguishing identifier of GB/T 32918 / GM/T 0009.
pub const DEFAULT_ID: &[u8; 16] = b"1234567812345678";

pub const SO_PIN: &str = "so-secret-1";
pub const USER_PIN: &str = "user-secret-1";
pub const TOKEN_LABEL: &str = "svs-test";

// ---------------------------------------------------------------------------
// Child-process harness
// ---------------------------------------------------------------------------

/// Options for the child's token configuration and environment.
#[derive(Debug, Clone)]
pub struct ChildOpts {
    pub slots: u32,
    pub pin_min_len: u32,
    pub pin_max_len: u32,
    pub max_login_failures: u32,
    /// `faults = "..."` in the TOML file.
    pub conf_faults: Option<String>,
    /// `SVS_SOFTTOKEN_FAULTS`.
    pub env_faults: Option<String>,
    /// Set `SVS_SOFTTOKEN_FAULTS_FILE` to `<tempdir>/faults.txt` (created empty).
    pub faults_file: bool,
    /// Replace the whole TOML file by this text.
    pub raw_conf: Option<String>,
    /// Point `SVS_SOFTTOKEN_CONF` at a file that does not exist.
    pub missing_conf: bool,
    /// Use this directory (store and config) instead of a fresh tempdir.
    pub dir: Option<PathBuf>,
}

impl Default for ChildOpts {
    fn default() -> Self {
        Self {
            slots: 2,
            pin_min_len: 4,
            pin_max_len: 32,
            max_login_failures: 3,
            conf_faults: None,
            env_faults: None,
            faults_file: false,
            raw_conf: None,
            missing_conf: false,
            dir: None,
        }
    }
}

/// Are we the child that should run `test_name`'s body?
pub fn is_child(test_name: &str) -> bool {
    std::env::var("SVS_TEST_CHILD").as_deref() == Ok(test_name)
}

/// Runs `body` in a child process with a fresh token store; asserts it exits 0.
pub fn run_in_child(test_name: &str, body: impl FnOnce()) {
    run_in_child_with(test_name, &ChildOpts::default(), body);
}

/// Like [`run_in_child`] with options; returns the child's output in the parent.
pub fn run_in_child_with(test_name: &str, opts: &ChildOpts, body: impl FnOnce()) -> Option<Output> {
    if is_child(test_name) {
        body();
        return None;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = opts.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let out = spawn_child(test_name, opts, &dir);
    if !out.status.success() {
        panic!(
            "child for {test_name} failed ({})\n--- child stdout ---\n{}\n--- child stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Some(out)
}

/// Like [`run_in_child_with`] but returns the output whatever the exit status.
pub fn run_child_expect_output(
    test_name: &str,
    opts: &ChildOpts,
    body: impl FnOnce(),
) -> Option<Output> {
    if is_child(test_name) {
        body();
        return None;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = opts.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    Some(spawn_child(test_name, opts, &dir))
}

/// Writes the config into `dir` and runs `current_exe --exact test_name` there.
pub fn spawn_child(test_name: &str, opts: &ChildOpts, dir: &Path) -> Output {
    let conf = dir.join("softtoken.toml");
    let store = dir.join("store");
    let text = match &opts.raw_conf {
        Some(raw) => raw.clone(),
        None => {
            let mut t = format!(
                "store_dir = {store:?}\nslots = {}\npin_min_len = {}\npin_max_len = {}\n\
                 max_login_failures = {}\nkdf_iterations = 1000\n",
                opts.slots, opts.pin_min_len, opts.pin_max_len, opts.max_login_failures
            );
            if let Some(f) = &opts.conf_faults {
                t.push_str(&format!("faults = {f:?}\n"));
            }
            t
        }
    };
    std::fs::write(&conf, text).expect("write softtoken.toml");
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env("SVS_TEST_CHILD", test_name)
        .env("SVS_TEST_DIR", dir)
        .env_remove("SVS_SOFTTOKEN_FAULTS")
        .env_remove("SVS_SOFTTOKEN_FAULTS_FILE")
        // nextest sets this for the parent; the child is a plain libtest run.
        .env_remove("NEXTEST_TEST_FILTER");
    if opts.missing_conf {
        cmd.env("SVS_SOFTTOKEN_CONF", dir.join("does-not-exist.toml"));
    } else {
        cmd.env("SVS_SOFTTOKEN_CONF", &conf);
    }
    if let Some(f) = &opts.env_faults {
        cmd.env("SVS_SOFTTOKEN_FAULTS", f);
    }
    if opts.faults_file {
        let ff = dir.join("faults.txt");
        std::fs::write(&ff, "").expect("write faults file");
        cmd.env("SVS_SOFTTOKEN_FAULTS_FILE", ff);
    }
    let out = cmd.output().expect("spawn child test process");
    // libtest exits 0 with "0 passed" when the filter matched nothing: refuse that.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("running 0 tests"),
        "child for {test_name} ran no test (wrong test name?)\n{stdout}"
    );
    out
}

/// The test's private directory (the child's `SVS_TEST_DIR`).
pub fn test_dir() -> PathBuf {
    PathBuf::from(std::env::var("SVS_TEST_DIR").expect("SVS_TEST_DIR set in child"))
}

/// Writes the runtime faults file and waits long enough for a new mtime.
pub fn set_faults_file(spec: &str) {
    // Coarse file-system timestamps: make sure the mtime really changes.
    std::thread::sleep(Duration::from_millis(30));
    std::fs::write(test_dir().join("faults.txt"), spec).expect("write faults file");
    std::thread::sleep(Duration::from_millis(30));
}

// ---------------------------------------------------------------------------
// Module loading and token set-up
// ---------------------------------------------------------------------------

/// The module cargo built for this test run: `target/<profile>/deps/
/// libsvs_softtoken.so`, beside the test executable. (`cargo test` does not
/// always refresh the copy in `target/<profile>/`, which may be stale.)
pub fn module_path() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe
        .parent()
        .expect("test executable is target/<profile>/deps/<name>");
    let so = deps.join("libsvs_softtoken.so");
    assert!(so.exists(), "module not built: {}", so.display());
    so
}

/// Loads the module (no `C_Initialize`).
pub fn load() -> Pkcs11 {
    Pkcs11::new(module_path()).expect("load libsvs_softtoken.so")
}

/// Loads and initialises the module.
pub fn open() -> Pkcs11 {
    let p = load();
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    p
}

pub fn pin(s: &str) -> AuthPin {
    AuthPin::new(s.into())
}

pub fn slot0(p: &Pkcs11) -> Slot {
    p.get_all_slots().expect("C_GetSlotList")[0]
}

/// InitToken with [`SO_PIN`] and InitPIN with [`USER_PIN`].
pub fn init_token(p: &Pkcs11, slot: Slot) {
    p.init_token(slot, &pin(SO_PIN), TOKEN_LABEL)
        .expect("C_InitToken");
    let s = p.open_rw_session(slot).expect("C_OpenSession rw");
    s.login(UserType::So, Some(&pin(SO_PIN))).expect("SO login");
    s.init_pin(&pin(USER_PIN)).expect("C_InitPIN");
    s.logout().expect("SO logout");
}

/// Opens the module, initialises slot 0's token and user PIN.
pub fn setup() -> (Pkcs11, Slot) {
    let p = open();
    let slot = slot0(&p);
    init_token(&p, slot);
    (p, slot)
}

/// R/W session with the user logged in.
pub fn user_session(p: &Pkcs11, slot: Slot) -> Session {
    let s = p.open_rw_session(slot).expect("C_OpenSession rw");
    s.login(UserType::User, Some(&pin(USER_PIN)))
        .expect("user login");
    s
}

pub fn mech_type(m: u64) -> MechanismType {
    MechanismType::new_vendor_defined(m).expect("vendor mechanism number")
}

pub fn sm2_key_type() -> KeyType {
    KeyType::new_vendor_defined(CKK_SM2).expect("vendor key type")
}

/// A vendor mechanism without parameter.
pub fn mech(m: u64) -> Mechanism<'static> {
    Mechanism::VendorDefined(VendorDefinedMechanism::new::<()>(mech_type(m), None))
}

/// A vendor mechanism whose parameter is the bytes of `param` (e.g. an SM2 ID).
pub fn mech_param<const N: usize>(m: u64, param: &[u8; N]) -> Mechanism<'_> {
    Mechanism::VendorDefined(VendorDefinedMechanism::new(mech_type(m), Some(param)))
}

/// An SM2 key pair: public and private handles plus the uncompressed point.
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub public: ObjectHandle,
    pub private: ObjectHandle,
    pub point: Vec<u8>,
}

/// Generates an SM2 key pair; `token` selects token or session objects.
pub fn gen_keypair(s: &Session, token: bool, label: &str) -> KeyPair {
    gen_keypair_with(s, token, label, &[], &[])
}

pub fn gen_keypair_with(
    s: &Session,
    token: bool,
    label: &str,
    extra_pub: &[Attribute],
    extra_priv: &[Attribute],
) -> KeyPair {
    let mut pub_t = vec![
        Attribute::Token(token),
        Attribute::Verify(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(label.as_bytes().to_vec()),
    ];
    pub_t.extend_from_slice(extra_pub);
    let mut priv_t = vec![
        Attribute::Token(token),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Sign(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(label.as_bytes().to_vec()),
    ];
    priv_t.extend_from_slice(extra_priv);
    let (public, private) = s
        .generate_key_pair(&mech(CKM_SM2_KEY_PAIR_GEN), &pub_t, &priv_t)
        .expect("C_GenerateKeyPair SM2");
    let point = public_point(s, public);
    KeyPair {
        public,
        private,
        point,
    }
}

/// The 65-byte uncompressed point of an SM2 key object, from CKA_EC_POINT.
pub fn public_point(s: &Session, key: ObjectHandle) -> Vec<u8> {
    let attrs = s
        .get_attributes(key, &[AttributeType::EcPoint])
        .expect("C_GetAttributeValue CKA_EC_POINT");
    match attrs.as_slice() {
        [Attribute::EcPoint(v)] => unwrap_ec_point(v),
        other => panic!("no CKA_EC_POINT: {other:?}"),
    }
}

/// CKA_EC_POINT is a DER OCTET STRING (04 41 04 x y).
pub fn unwrap_ec_point(v: &[u8]) -> Vec<u8> {
    assert_eq!(
        v.len(),
        67,
        "CKA_EC_POINT must be DER OCTET STRING of 65 bytes: {}",
        hex(v)
    );
    assert_eq!(
        &v[..3],
        &[0x04, 0x41, 0x04],
        "CKA_EC_POINT header: {}",
        hex(v)
    );
    v[2..].to_vec()
}

/// DER OCTET STRING of an uncompressed point.
pub fn wrap_ec_point(point: &[u8]) -> Vec<u8> {
    assert_eq!(point.len(), 65);
    let mut v = vec![0x04, 0x41];
    v.extend_from_slice(point);
    v
}

/// DER SubjectPublicKeyInfo (id-ecPublicKey, SM2 curve) of a point, built here.
pub fn spki_der(point: &[u8]) -> Vec<u8> {
    assert_eq!(point.len(), 65);
    let mut v = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01,
    ];
    v.extend_from_slice(&SM2_EC_PARAMS);
    v.extend_from_slice(&[0x03, 0x42, 0x00]);
    v.extend_from_slice(point);
    v
}

/// First object handle matching `template`.
pub fn find_one(s: &Session, template: &[Attribute]) -> ObjectHandle {
    let found = s.find_objects(template).expect("C_FindObjects");
    assert_eq!(
        found.len(),
        1,
        "expected exactly one object for {template:?}"
    );
    found[0]
}

pub fn class(c: ObjectClass) -> Attribute {
    Attribute::Class(c)
}

// ---------------------------------------------------------------------------
// SM2 / SM3 reference computations (independent of the token)
// ---------------------------------------------------------------------------

const SM2_A: &str = "FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC";
const SM2_B: &str = "28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93";
const SM2_GX: &str = "32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7";
const SM2_GY: &str = "BC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0";

pub fn sm3(data: &[u8]) -> [u8; 32] {
    Sm3::digest(data).into()
}

/// Z = SM3(ENTL ‖ ID ‖ a ‖ b ‖ xG ‖ yG ‖ xA ‖ yA) per GB/T 32918.2.
pub fn z_value(id: &[u8], point: &[u8]) -> [u8; 32] {
    assert_eq!(point.len(), 65);
    assert_eq!(point[0], 0x04);
    let entl = u16::try_from(id.len() * 8).expect("ID too long");
    let mut h = Sm3::new();
    h.update(entl.to_be_bytes());
    h.update(id);
    for c in [SM2_A, SM2_B, SM2_GX, SM2_GY] {
        h.update(unhex(c));
    }
    h.update(&point[1..]);
    h.finalize().into()
}

/// e = SM3(Z ‖ M).
pub fn e_value(id: &[u8], point: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut h = Sm3::new();
    h.update(z_value(id, point));
    h.update(msg);
    h.finalize().into()
}

/// Raw r‖s (64 bytes) from a raw or DER signature.
pub fn sig_to_raw(sig: &[u8]) -> Vec<u8> {
    if sig.len() == 64 {
        return sig.to_vec();
    }
    sm2::dsa::Signature::from_der(sig)
        .expect("DER SM2 signature")
        .to_bytes()
        .to_vec()
}

/// DER of a raw r‖s signature (via the sm2 crate).
pub fn raw_to_der(raw: &[u8]) -> Vec<u8> {
    sm2::dsa::Signature::from_slice(raw)
        .expect("raw SM2 signature")
        .to_der()
        .to_vec()
}

/// Verifies a signature (raw or DER) on the ready digest `e`, with the sm2 crate.
pub fn sm2_verify_prehash(point: &[u8], e: &[u8; 32], sig: &[u8]) -> bool {
    let vk = sm2::dsa::VerifyingKey::from_sec1_bytes("1234567812345678", point)
        .expect("valid SM2 public point");
    let sig = if sig.len() == 64 {
        sm2::dsa::Signature::from_slice(sig)
    } else {
        sm2::dsa::Signature::from_der(sig)
    };
    match sig {
        Ok(sig) => vk.verify_prehash(e, &sig).is_ok(),
        Err(_) => false,
    }
}

/// Checks that `sig` is a strict DER SEQUENCE { r INTEGER, s INTEGER } of at most 72 bytes.
pub fn assert_der_signature(sig: &[u8]) {
    assert!(
        sig.len() <= 72 && sig.len() >= 8,
        "DER signature length {}",
        sig.len()
    );
    assert_eq!(sig[0], 0x30, "DER SEQUENCE tag: {}", hex(sig));
    assert_eq!(
        usize::from(sig[1]),
        sig.len() - 2,
        "DER length: {}",
        hex(sig)
    );
    let (r, rest) = der_integer(&sig[2..]);
    let (s, rest) = der_integer(rest);
    assert!(
        rest.is_empty(),
        "trailing bytes in DER signature: {}",
        hex(sig)
    );
    for i in [r, s] {
        assert!(!i.is_empty() && i.len() <= 33);
        assert!(i[0] & 0x80 == 0, "negative INTEGER");
        assert!(
            i.len() == 1 || i[0] != 0 || i[1] & 0x80 != 0,
            "non-minimal INTEGER"
        );
    }
}

fn der_integer(b: &[u8]) -> (&[u8], &[u8]) {
    assert_eq!(b[0], 0x02, "INTEGER tag");
    let n = usize::from(b[1]);
    (&b[2..2 + n], &b[2 + n..])
}

// ---------------------------------------------------------------------------
// Small DER reader for the certificate fixture
// ---------------------------------------------------------------------------

/// One TLV: (tag, whole TLV bytes, content bytes, rest after it).
pub fn der_tlv(b: &[u8]) -> (u8, &[u8], &[u8], &[u8]) {
    let tag = b[0];
    let (len, hdr) = if b[1] & 0x80 == 0 {
        (usize::from(b[1]), 2)
    } else {
        let n = usize::from(b[1] & 0x7F);
        let mut len = 0usize;
        for &x in &b[2..2 + n] {
            len = (len << 8) | usize::from(x);
        }
        (len, 2 + n)
    };
    (tag, &b[..hdr + len], &b[hdr..hdr + len], &b[hdr + len..])
}

/// The parts of an X.509 certificate the token must fill in, read independently.
#[derive(Debug)]
pub struct CertParts {
    pub tbs: Vec<u8>,
    pub serial_tlv: Vec<u8>,
    pub issuer: Vec<u8>,
    pub subject: Vec<u8>,
    pub spki: Vec<u8>,
    pub signature: Vec<u8>,
}

pub fn cert_parts(der: &[u8]) -> CertParts {
    let (_, _, cert, _) = der_tlv(der);
    let (_, tbs_tlv, tbs, rest) = der_tlv(cert);
    let (_, _, _sigalg, rest) = der_tlv(rest);
    let (_, _, sigbits, _) = der_tlv(rest);
    let mut cur = tbs;
    if cur[0] == 0xA0 {
        cur = der_tlv(cur).3;
    }
    let (_, serial_tlv, _, cur) = der_tlv(cur);
    let (_, _, _, cur) = der_tlv(cur); // signature algorithm
    let (_, issuer, _, cur) = der_tlv(cur);
    let (_, _, _, cur) = der_tlv(cur); // validity
    let (_, subject, _, cur) = der_tlv(cur);
    let (_, spki, _, _) = der_tlv(cur);
    CertParts {
        tbs: tbs_tlv.to_vec(),
        serial_tlv: serial_tlv.to_vec(),
        issuer: issuer.to_vec(),
        subject: subject.to_vec(),
        spki: spki.to_vec(),
        signature: sigbits[1..].to_vec(), // skip the unused-bits byte
    }
}

pub fn fixture(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

// ---------------------------------------------------------------------------
// Misc
// ---------------------------------------------------------------------------

/// Asserts that `r` failed with exactly the PKCS#11 return value `rv`.
#[track_caller]
pub fn assert_rv<T: std::fmt::Debug>(r: cryptoki::error::Result<T>, rv: RvError) {
    match r {
        Err(Error::Pkcs11(got, _)) if got == rv => {}
        other => panic!("expected Err({rv:?}), got {other:?}"),
    }
}

/// Asserts that `r` failed with one of `rvs` (only where the spec allows several).
#[track_caller]
pub fn assert_rv_in<T: std::fmt::Debug>(r: cryptoki::error::Result<T>, rvs: &[RvError]) {
    match r {
        Err(Error::Pkcs11(got, _)) if rvs.contains(&got) => {}
        other => panic!("expected Err(one of {rvs:?}), got {other:?}"),
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// PEM "PUBLIC KEY" of a DER SubjectPublicKeyInfo.
pub fn spki_pem(der: &[u8]) -> String {
    let b = base64(der);
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in b.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("ascii"));
        pem.push('\n');
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    pem
}
