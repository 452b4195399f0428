//! Token persistence: the on-disk format, sealing of private values, PIN key
//! derivation, and crash-safe writes shared safely between processes.

use crate::error::{Error, Result};
use aes_gcm::AesGcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use serde::{Deserialize, Serialize};
use sm2::elliptic_curve::consts::U12;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// SM4 in GCM mode: the GM block cipher in a standard AEAD construction, so
/// a tampered or wrongly keyed blob fails instead of decrypting to garbage.
type Sm4Gcm = AesGcm<sm4::Sm4, U12>;

/// A 128-bit SM4 key.
pub type SymKey = Zeroizing<[u8; 16]>;

const FORMAT_VERSION: u32 = 1;
const NONCE_LEN: usize = 12;

/// A fresh random symmetric key.
pub fn random_key() -> Result<SymKey> {
    let mut k = Zeroizing::new([0u8; 16]);
    getrandom::fill(k.as_mut()).map_err(|_| Error::DeviceError)?;
    Ok(k)
}

/// Encrypts with a random nonce; the output is nonce ‖ ciphertext ‖ tag.
pub fn seal(key: &SymKey, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let cipher = Sm4Gcm::new_from_slice(key.as_ref()).map_err(|_| Error::GeneralError)?;
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|_| Error::DeviceError)?;
    let ct = cipher
        .encrypt(
            &nonce.into(),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| Error::GeneralError)?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Decrypts a [`seal`]ed blob; `None` when the key or the data is wrong.
pub fn open(key: &SymKey, aad: &[u8], blob: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if blob.len() < NONCE_LEN + 16 {
        return None;
    }
    let cipher = Sm4Gcm::new_from_slice(key.as_ref()).ok()?;
    let (nonce, ct) = blob.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
    cipher
        .decrypt(&nonce.into(), Payload { msg: ct, aad })
        .ok()
        .map(Zeroizing::new)
}

/// PBKDF2-HMAC-SM3: slow on purpose, so that a stolen store cannot be
/// brute-forced quickly for its PINs.
pub fn pin_key(pin: &[u8], salt: &[u8], iterations: u32) -> SymKey {
    let mut k = Zeroizing::new([0u8; 16]);
    pbkdf2::pbkdf2_hmac::<sm3::Sm3>(pin, salt, iterations, k.as_mut());
    k
}

/// The token key wrapped under one PIN.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PinRecord {
    #[serde(with = "hex_bytes")]
    pub salt: Vec<u8>,
    pub iterations: u32,
    #[serde(with = "hex_bytes")]
    pub wrapped_key: Vec<u8>,
}

impl PinRecord {
    /// Wraps `token_key` under a key derived from `pin`.
    pub fn new(pin: &[u8], role: &str, token_key: &SymKey, iterations: u32) -> Result<Self> {
        let mut salt = vec![0u8; 16];
        getrandom::fill(&mut salt).map_err(|_| Error::DeviceError)?;
        let k = pin_key(pin, &salt, iterations);
        let wrapped_key = seal(&k, role.as_bytes(), token_key.as_ref())?;
        Ok(PinRecord {
            salt,
            iterations,
            wrapped_key,
        })
    }

    /// The token key, or `None` for a wrong PIN.
    pub fn unwrap_key(&self, pin: &[u8], role: &str) -> Option<SymKey> {
        let k = pin_key(pin, &self.salt, self.iterations);
        let plain = open(&k, role.as_bytes(), &self.wrapped_key)?;
        let arr: [u8; 16] = plain.as_slice().try_into().ok()?;
        Some(Zeroizing::new(arr))
    }
}

/// One token object as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredObject {
    pub uid: u64,
    /// Attribute type (hex) → value (hex), native byte order.
    pub attrs: BTreeMap<String, String>,
    /// The private value sealed under the token key.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex_opt")]
    pub sealed: Option<Vec<u8>>,
}

/// The whole of one token on disk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    pub version: u32,
    #[serde(with = "hex_bytes")]
    pub label: Vec<u8>,
    pub serial: String,
    pub so: PinRecord,
    pub user: Option<PinRecord>,
    pub so_failures: u32,
    pub user_failures: u32,
    pub objects: Vec<StoredObject>,
}

impl TokenFile {
    pub fn new(label: [u8; 32], serial: String, so: PinRecord) -> Self {
        TokenFile {
            version: FORMAT_VERSION,
            label: label.to_vec(),
            serial,
            so,
            user: None,
            so_failures: 0,
            user_failures: 0,
            objects: Vec::new(),
        }
    }
}

/// What identifies one version of the token file, to notice another
/// process's writes without reading the file every time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    modified: std::time::SystemTime,
    len: u64,
    inode: u64,
}

/// The directory of one slot's token.
#[derive(Debug, Clone)]
pub struct SlotStore {
    dir: PathBuf,
    root: PathBuf,
}

/// An exclusive lock on a slot's store; released on drop.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

impl SlotStore {
    pub fn new(store_dir: &Path, slot: usize) -> Self {
        SlotStore {
            dir: store_dir.join(format!("slot-{slot}")),
            root: store_dir.to_path_buf(),
        }
    }

    /// Gives a file or directory this process created to the owner of the
    /// store. An officer running the provisioning tool as root must not
    /// leave token files that the daemon's own user cannot open. Only root
    /// can change owners; for anyone else this does nothing.
    fn hand_to_store_owner(&self, path: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let we_are_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if !we_are_root {
            return Ok(());
        }
        let owner = std::fs::metadata(&self.root).map_err(|_| Error::DeviceError)?;
        if owner.uid() == 0 && owner.gid() == 0 {
            return Ok(());
        }
        std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid()))
            .map_err(|_| Error::DeviceError)
    }

    fn token_path(&self) -> PathBuf {
        self.dir.join("token.json")
    }

    /// Takes the inter-process lock, creating the directory (mode 0700) on
    /// first use.
    pub fn lock(&self) -> Result<StoreLock> {
        use std::os::unix::fs::DirBuilderExt;
        let fresh = !self.dir.exists();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|_| Error::DeviceError)?;
        if fresh {
            self.hand_to_store_owner(&self.dir)?;
        }
        let lock_path = self.dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|_| Error::DeviceError)?;
        self.hand_to_store_owner(&lock_path)?;
        file.lock().map_err(|_| Error::DeviceError)?;
        Ok(StoreLock { _file: file })
    }

    /// The stamp of the file as it is now; `None` when there is no token.
    pub fn stamp(&self) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(self.token_path()).ok()?;
        Some(FileStamp {
            modified: m.modified().ok()?,
            len: m.len(),
            inode: m.ino(),
        })
    }

    /// Reads the token; `Ok(None)` for an empty slot. A file that does not
    /// parse is a device error, never a silently empty token.
    pub fn read(&self) -> Result<Option<(TokenFile, Option<FileStamp>)>> {
        let stamp = self.stamp();
        let text = match std::fs::read(self.token_path()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(_) => return Err(Error::DeviceError),
        };
        let file: TokenFile = serde_json::from_slice(&text).map_err(|_| Error::DeviceError)?;
        if file.version != FORMAT_VERSION {
            return Err(Error::TokenNotRecognized);
        }
        if file.label.len() != 32 || file.serial.len() > 16 {
            return Err(Error::DeviceError);
        }
        Ok(Some((file, stamp)))
    }

    /// Replaces the token file atomically: temporary file, fsync, rename,
    /// fsync of the directory. The caller holds the [`StoreLock`].
    pub fn write(&self, _lock: &StoreLock, file: &TokenFile) -> Result<Option<FileStamp>> {
        use std::os::unix::fs::OpenOptionsExt;
        let json = serde_json::to_vec_pretty(file).map_err(|_| Error::GeneralError)?;
        let tmp = self.dir.join("token.json.tmp");
        let written = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&json).and_then(|()| f.sync_all()));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(storage_error(&e));
        }
        self.hand_to_store_owner(&tmp)?;
        std::fs::rename(&tmp, self.token_path()).map_err(|e| storage_error(&e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|_| Error::DeviceError)?;
        Ok(self.stamp())
    }
}

/// A write of the store that failed: a full disk (or quota) is the token
/// out of memory in PKCS#11's terms (CKR_DEVICE_MEMORY), which callers can
/// tell the officer; anything else is a device error.
fn storage_error(e: &std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => Error::DeviceMemory,
        _ => Error::DeviceError,
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::to_hex(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        super::from_hex(&s).ok_or_else(|| serde::de::Error::custom("bad hex"))
    }
}

mod hex_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(&super::to_hex(v)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| super::from_hex(&s).ok_or_else(|| serde::de::Error::custom("bad hex")))
            .transpose()
    }
}

pub fn to_hex(v: &[u8]) -> String {
    base16ct::lower::encode_string(v)
}

pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    base16ct::mixed::decode_vec(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_tamper_detection() {
        let k = random_key().unwrap();
        let blob = seal(&k, b"aad", b"secret").unwrap();
        assert_eq!(open(&k, b"aad", &blob).unwrap().as_slice(), b"secret");
        assert!(open(&k, b"other", &blob).is_none());
        let mut bad = blob.clone();
        bad[20] ^= 1;
        assert!(open(&k, b"aad", &bad).is_none());
        assert!(open(&random_key().unwrap(), b"aad", &blob).is_none());
    }

    #[test]
    fn pin_record_unwraps_only_with_its_pin() {
        let tk = random_key().unwrap();
        let rec = PinRecord::new(b"123456", "user", &tk, 1000).unwrap();
        assert_eq!(*rec.unwrap_key(b"123456", "user").unwrap(), *tk);
        assert!(rec.unwrap_key(b"123457", "user").is_none());
        assert!(rec.unwrap_key(b"123456", "so").is_none());
    }

    #[test]
    fn a_full_disk_is_the_token_out_of_memory() {
        for (errno, expected) in [
            (28, Error::DeviceMemory),  // ENOSPC
            (122, Error::DeviceMemory), // EDQUOT
            (5, Error::DeviceError),    // EIO
        ] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert_eq!(storage_error(&e), expected, "{e}");
        }
    }

    #[test]
    fn writes_are_atomic_and_readable() {
        let dir = tempfile::tempdir().unwrap();
        let store = SlotStore::new(dir.path(), 0);
        let lock = store.lock().unwrap();
        assert!(store.read().unwrap().is_none());
        let tk = random_key().unwrap();
        let so = PinRecord::new(b"so-pin", "so", &tk, 1000).unwrap();
        let file = TokenFile::new([b' '; 32], "0011223344556677".into(), so);
        let stamp = store.write(&lock, &file).unwrap();
        let (back, stamp2) = store.read().unwrap().unwrap();
        assert_eq!(back, file);
        assert_eq!(stamp, stamp2);
        assert!(!dir.path().join("slot-0/token.json.tmp").exists());
        std::fs::write(dir.path().join("slot-0/token.json"), b"{garbage").unwrap();
        assert_eq!(store.read().unwrap_err(), Error::DeviceError);
    }

    #[test]
    fn files_written_by_root_belong_to_the_store_owner() {
        use std::os::unix::fs::MetadataExt;
        if !std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
            eprintln!("SKIP: only root can hand files to another owner");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // 65534: nobody/nogroup, as the daemon's own user would be.
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
        let store = SlotStore::new(dir.path(), 0);
        let lock = store.lock().unwrap();
        let so = PinRecord::new(b"so-pin", "so", &random_key().unwrap(), 1000).unwrap();
        store
            .write(&lock, &TokenFile::new([b' '; 32], "1".into(), so))
            .unwrap();
        for p in ["slot-0", "slot-0/.lock", "slot-0/token.json"] {
            let m = std::fs::metadata(dir.path().join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (65534, 65534), "{p}");
        }
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(from_hex(&to_hex(&[0, 1, 0xfe])).unwrap(), [0, 1, 0xfe]);
        assert!(from_hex("abc").is_none());
        assert!(from_hex("zz").is_none());
    }
}
