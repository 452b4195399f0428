//! TLS: the rustls server configuration (TLS 1.3 and 1.2, HTTP/2 and
//! HTTP/1.1 by ALPN, client certificate required and verified against the
//! configured CA bundle), and a development PKI.
//!
//! TLS certificates are ECDSA P-256: rustls has no SM2. The SM2 keys are the
//! signing keys in the token, not the transport's.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use der::Decode;

use rustls::RootCertStore;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::config::{ClientMatch, EntityConfig, TlsFiles};
use crate::dn::DistinguishedName;
use crate::error::SvsError;
use crate::metrics::MetricsTls;

fn cfg_err(m: String) -> SvsError {
    SvsError::Config(vec![m])
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, SvsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| cfg_err(format!("{what} {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cfg_err(format!("{what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(cfg_err(format!(
            "{what} {}: no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// The crypto provider svsd uses (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The API listener's TLS: the rustls configuration and its client
/// certificate verifier, kept so that connections made under an older
/// configuration can be checked against the current client CA.
#[derive(Clone)]
pub struct ApiTls {
    /// The server configuration.
    pub config: Arc<ServerConfig>,
    /// Verifies client certificates against the configured client CA.
    pub client_verifier: Arc<dyn ClientCertVerifier>,
    /// What the files held, to tell a reload's `reload` record what it
    /// changed.
    pub digests: TlsDigests,
}

/// SHA-256 over the DER certificates of the API's TLS files, in order:
/// the same certificates in a re-formatted PEM file are no change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsDigests {
    /// The server certificate chain.
    pub server_chain: [u8; 32],
    /// The client CA bundle.
    pub client_ca: [u8; 32],
}

impl TlsDigests {
    /// What changed from `before` to `self`, as the `reload` record says
    /// it.
    pub fn changes_from(&self, before: &TlsDigests) -> Vec<String> {
        [
            (
                self.server_chain != before.server_chain,
                "server certificate",
            ),
            (self.client_ca != before.client_ca, "client CA"),
        ]
        .into_iter()
        .filter(|(changed, _)| *changed)
        .map(|(_, what)| what.to_owned())
        .collect()
    }
}

fn certs_sha256(certs: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut h = Sha256::new();
    for c in certs {
        h.update((c.len() as u64).to_be_bytes());
        h.update(c);
    }
    h.finalize().into()
}

impl std::fmt::Debug for ApiTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTls").finish_non_exhaustive()
    }
}

/// Builds the API's TLS from the files, for `entities`: each one matched by
/// subject + issuer must name as its issuer the subject of a certificate in
/// the client CA bundle, as it matches only certificates issued directly
/// by one (see [`crate::policy::VerifiedClient`]). Errors name the file, or
/// every such entity at once.
pub fn api_tls(files: &TlsFiles, entities: &[EntityConfig]) -> Result<ApiTls, SvsError> {
    let (config, client_ca, server_chain) = build(
        &files.certificate,
        &files.private_key,
        Some(&files.client_ca),
        "tls",
    )?;
    let client_ca =
        client_ca.ok_or_else(|| SvsError::Internal("no client certificate verifier".into()))?;
    check_issuers(entities, &client_ca.subjects, &files.client_ca)?;
    Ok(ApiTls {
        config,
        client_verifier: client_ca.verifier,
        digests: TlsDigests {
            server_chain,
            client_ca: client_ca.sha256,
        },
    })
}

/// Refuses entities whose `issuer` is the subject of no certificate in the
/// client CA bundle (`subjects`, compared by meaning): no client could
/// match them, or only through a CA the bundle does not name.
fn check_issuers(
    entities: &[EntityConfig],
    subjects: &BTreeSet<DistinguishedName>,
    client_ca: &Path,
) -> Result<(), SvsError> {
    let errors: Vec<String> = entities
        .iter()
        .filter_map(|e| match &e.client {
            ClientMatch::Subject { issuer, .. } if !subjects.contains(issuer) => Some(format!(
                "entity {:?}: issuer {} is the subject of no certificate in client_ca {}; \
                 subject + issuer match only certificates issued directly by a CA certificate in client_ca",
                e.name,
                issuer.quoted(),
                client_ca.display()
            )),
            _ => None,
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(SvsError::Config(errors))
    }
}

/// Builds the server configuration from the TLS files (no entities to
/// check). Errors name the file.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, SvsError> {
    api_tls(files, &[]).map(|t| t.config)
}

/// The metrics listener's TLS: like the API's, but a client certificate is
/// required only when a client CA is configured (a scraper may have none).
pub fn metrics_server_config(files: &MetricsTls) -> Result<Arc<ServerConfig>, SvsError> {
    build(
        &files.certificate,
        &files.private_key,
        files.client_ca.as_deref(),
        "metrics tls",
    )
    .map(|(c, _, _)| c)
}

/// A client CA bundle as loaded: its verifier, and the subject DNs of its
/// certificates.
struct ClientCa {
    verifier: Arc<dyn ClientCertVerifier>,
    subjects: BTreeSet<DistinguishedName>,
    /// [`certs_sha256`] of the bundle as read.
    sha256: [u8; 32],
}

/// The subject DN of a DER certificate; none when x509-cert cannot read it
/// (such a CA cannot be named as an entity's issuer).
fn subject_dn(der: &[u8]) -> Option<DistinguishedName> {
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    Some(DistinguishedName::from_name(
        cert.tbs_certificate().subject(),
    ))
}

/// What [`build`] made: the server configuration, the client CA it
/// verifies with (when one is given), and [`certs_sha256`] of the server
/// chain as read.
type Built = (Arc<ServerConfig>, Option<ClientCa>, [u8; 32]);

fn build(
    certificate: &Path,
    private_key: &Path,
    client_ca: Option<&Path>,
    what: &str,
) -> Result<Built, SvsError> {
    let chain = read_certs(certificate, &format!("{what} certificate"))?;
    let chain_sha256 = certs_sha256(&chain);
    // The private key's bytes never reach an error message.
    let key = PrivateKeyDer::from_pem_file(private_key).map_err(|_| {
        cfg_err(format!(
            "{what} private_key {}: cannot read a PEM private key",
            private_key.display()
        ))
    })?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| cfg_err(format!("TLS versions: {e}")))?;
    let mut loaded: Option<ClientCa> = None;
    let builder = match client_ca {
        Some(client_ca) => {
            let ca = client_verifier(client_ca, what)?;
            let verifier = ca.verifier.clone();
            loaded = Some(ca);
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        let why = match e {
            rustls::Error::InconsistentKeys(_) => {
                "the private key is not the key of the certificate (a renewal half done?)"
                    .to_owned()
            }
            e => e.to_string(),
        };
        cfg_err(format!(
            "{what} certificate {} and private_key {}: {why}",
            certificate.display(),
            private_key.display()
        ))
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(config), loaded, chain_sha256))
}

/// The client certificate verifier for a CA bundle, and the bundle's
/// subjects.
fn client_verifier(client_ca: &Path, what: &str) -> Result<ClientCa, SvsError> {
    let mut roots = RootCertStore::empty();
    let mut subjects = BTreeSet::new();
    let certs = read_certs(client_ca, &format!("{what} client_ca"))?;
    let sha256 = certs_sha256(&certs);
    for ca in certs {
        subjects.extend(subject_dn(&ca));
        roots
            .add(ca)
            .map_err(|e| cfg_err(format!("{what} client_ca {}: {e}", client_ca.display())))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| cfg_err(format!("client certificate verifier: {e}")))?;
    Ok(ClientCa {
        verifier,
        subjects,
        sha256,
    })
}

/// Whether svsd's TLS handshake would accept a client presenting `chain`
/// (its certificate first, then any intermediates it sends) at `now`,
/// checked by the same verifier the API listener builds from `client_ca`.
/// svs-provision asks this before binding a certificate to an entity, so
/// that an officer learns at once, not from a client's failed handshakes,
/// that the certificate is expired, not for client authentication, or
/// issued by a CA svsd does not trust.
pub fn check_client_chain(
    client_ca: &Path,
    chain: &[Vec<u8>],
    now: std::time::SystemTime,
) -> Result<(), SvsError> {
    let ca = client_verifier(client_ca, "tls")?;
    let chain: Vec<CertificateDer<'_>> =
        chain.iter().map(|d| CertificateDer::from(&d[..])).collect();
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| cfg_err("no client certificate given".into()))?;
    let since_epoch = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| cfg_err("the system clock is before 1970".into()))?;
    ca.verifier
        .verify_client_cert(
            leaf,
            intermediates,
            rustls_pki_types::UnixTime::since_unix_epoch(since_epoch),
        )
        .map(|_| ())
        .map_err(|e| {
            cfg_err(format!(
                "svsd's TLS handshake would refuse this client certificate ({e}); \
                 it must be valid now, allow client authentication, and chain to a CA in client_ca {}",
                client_ca.display()
            ))
        })
}

/// Lower-case hex SHA-256 of DER bytes (a certificate's fingerprint).
pub fn sha256_hex(der: &[u8]) -> String {
    svs_hsm::keys::hex(&Sha256::digest(der))
}

/// A development PKI: a CA, server and client certificates (ECDSA P-256).
pub mod devpki {
    use std::path::{Path, PathBuf};

    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };

    use crate::error::SvsError;

    fn err(e: impl std::fmt::Display) -> SvsError {
        SvsError::Io(format!("dev PKI: {e}"))
    }

    /// A CA that can issue more certificates.
    pub struct DevCa {
        params: CertificateParams,
        key: KeyPair,
        /// The CA certificate, PEM.
        pub cert_pem: String,
    }

    impl std::fmt::Debug for DevCa {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("DevCa").finish_non_exhaustive()
        }
    }

    /// An issued certificate and its key.
    #[derive(Clone)]
    pub struct Issued {
        /// Certificate, PEM.
        pub cert_pem: String,
        /// Certificate, DER.
        pub cert_der: Vec<u8>,
        /// Private key, PKCS#8 PEM.
        pub key_pem: String,
    }

    /// Without the private key.
    impl std::fmt::Debug for Issued {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Issued")
                .field("cert_pem", &self.cert_pem)
                .finish_non_exhaustive()
        }
    }

    fn ca_params(cn: &str) -> Result<CertificateParams, SvsError> {
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "SVS development");
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(p)
    }

    impl DevCa {
        /// A new CA named `cn`.
        pub fn generate(cn: &str) -> Result<DevCa, SvsError> {
            let key = KeyPair::generate().map_err(err)?;
            let params = ca_params(cn)?;
            let cert_pem = params.self_signed(&key).map_err(err)?.pem();
            Ok(DevCa {
                params,
                key,
                cert_pem,
            })
        }

        /// Saves `ca.pem` and `ca-key.pem` in `dir`.
        pub fn save(&self, dir: &Path) -> Result<(), SvsError> {
            write(&dir.join("ca.pem"), &self.cert_pem, false)?;
            write(&dir.join("ca-key.pem"), &self.key.serialize_pem(), true)
        }

        /// Loads a CA saved by [`DevCa::save`] with common name `cn`.
        pub fn load(dir: &Path, cn: &str) -> Result<DevCa, SvsError> {
            let key_pem = std::fs::read_to_string(dir.join("ca-key.pem")).map_err(err)?;
            let cert_pem = std::fs::read_to_string(dir.join("ca.pem")).map_err(err)?;
            Ok(DevCa {
                params: ca_params(cn)?,
                key: KeyPair::from_pem(&key_pem).map_err(err)?,
                cert_pem,
            })
        }

        /// A CA named `cn` issued by this one: an intermediate, which a
        /// client sends along with its certificate. Tests use it to forge
        /// a CA's name (a sub-CA named like its issuer).
        pub fn sub_ca(&self, cn: &str) -> Result<DevCa, SvsError> {
            let key = KeyPair::generate().map_err(err)?;
            let params = ca_params(cn)?;
            let issuer = Issuer::from_params(&self.params, &self.key);
            let cert_pem = params.signed_by(&key, &issuer).map_err(err)?.pem();
            Ok(DevCa {
                params,
                key,
                cert_pem,
            })
        }

        fn issue(&self, params: CertificateParams) -> Result<Issued, SvsError> {
            let key = KeyPair::generate().map_err(err)?;
            let issuer = Issuer::from_params(&self.params, &self.key);
            let cert = params.signed_by(&key, &issuer).map_err(err)?;
            Ok(Issued {
                cert_pem: cert.pem(),
                cert_der: cert.der().to_vec(),
                key_pem: key.serialize_pem(),
            })
        }

        /// A server certificate for `names` (DNS names or IP addresses).
        pub fn server(&self, names: &[&str]) -> Result<Issued, SvsError> {
            let mut p =
                CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                    .map_err(err)?;
            p.distinguished_name
                .push(DnType::CommonName, names.first().copied().unwrap_or("svsd"));
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            self.issue(p)
        }

        /// A client certificate with common name `cn`.
        pub fn client(&self, cn: &str) -> Result<Issued, SvsError> {
            let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, "SVS development");
            dn.push(DnType::CommonName, cn);
            p.distinguished_name = dn;
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            self.issue(p)
        }
    }

    /// Writes a file; `secret` ones are created 0600.
    pub fn write(path: &Path, content: &str, secret: bool) -> Result<(), SvsError> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let fail = |e: std::io::Error| err(format!("{}: {e}", path.display()));
        let mode = if secret { 0o600 } else { 0o644 };
        // O_NOFOLLOW: a link planted at the path is not written through.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
            .map_err(fail)?;
        // `mode` applies only to a file this call creates: an existing
        // file keeps its own, possibly world-readable, until set here,
        // before the secret is written.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(fail)?;
        f.write_all(content.as_bytes()).map_err(fail)
    }

    /// Writes `<name>.pem` and `<name>-key.pem`; returns their paths.
    pub fn save_issued(
        dir: &Path,
        name: &str,
        issued: &Issued,
    ) -> Result<(PathBuf, PathBuf), SvsError> {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}-key.pem"));
        write(&cert, &issued.cert_pem, false)?;
        write(&key, &issued.key_pem, true)?;
        Ok((cert, key))
    }
}

#[cfg(test)]
mod tests {
    use super::devpki::*;
    use super::*;
    use crate::policy::ClientIdentity;

    #[test]
    fn tls_digests_name_the_files_whose_certificates_changed() {
        let a = TlsDigests {
            server_chain: [1; 32],
            client_ca: [2; 32],
        };
        assert!(a.changes_from(&a).is_empty());
        let renewed = TlsDigests {
            server_chain: [3; 32],
            ..a
        };
        assert_eq!(renewed.changes_from(&a), ["server certificate"]);
        let both = TlsDigests {
            client_ca: [4; 32],
            ..renewed
        };
        assert_eq!(both.changes_from(&a), ["server certificate", "client CA"]);
        // Length-prefixed: two certificates are not their concatenation.
        let (x, y) = (
            CertificateDer::from(vec![1, 2]),
            CertificateDer::from(vec![3]),
        );
        let joined = CertificateDer::from(vec![1, 2, 3]);
        assert_ne!(certs_sha256(&[x, y]), certs_sha256(&[joined]));
    }

    #[test]
    fn secrets_are_written_owner_only_and_never_through_a_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        // An existing world-readable file becomes 0600 before it is written.
        std::fs::write(&key, "old").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        write(&key, "secret", true).unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            (mode, std::fs::read_to_string(&key).unwrap().as_str()),
            (0o600, "secret")
        );
        // A link planted at the path is refused, its target untouched.
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "theirs").unwrap();
        let link = dir.path().join("link.pem");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(write(&link, "secret", true).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "theirs");
        // Issued's Debug leaves the key out.
        let issued = DevCa::generate("t")
            .unwrap()
            .server(&["localhost"])
            .unwrap();
        assert!(!format!("{issued:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn a_client_chain_is_checked_as_the_handshake_would() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("SVS dev CA").unwrap();
        ca.save(dir.path()).unwrap();
        let bundle = dir.path().join("ca.pem");
        let now = std::time::SystemTime::now();
        let check = |der: &[u8]| check_client_chain(&bundle, &[der.to_vec()], now);
        assert!(check(&ca.client("app1").unwrap().cert_der).is_ok());
        // Issued by a CA svsd does not trust.
        let other = DevCa::generate("Other CA").unwrap();
        let foreign = check(&other.client("app1").unwrap().cert_der).unwrap_err();
        assert!(foreign.to_string().contains("would refuse"), "{foreign}");
        // Through an intermediate the client sends, as the handshake allows.
        let sub = ca.sub_ca("SVS dev sub-CA").unwrap();
        let leaf = sub.client("app2").unwrap().cert_der;
        assert!(check(&leaf).is_err());
        let sub_der = CertificateDer::from_pem_slice(sub.cert_pem.as_bytes()).unwrap();
        assert!(check_client_chain(&bundle, &[leaf, sub_der.to_vec()], now).is_ok());
        // A server certificate is not for client authentication.
        assert!(check(&ca.server(&["localhost"]).unwrap().cert_der).is_err());
        // Not valid yet (or expired): checked at the time given.
        let past = std::time::UNIX_EPOCH + std::time::Duration::from_secs(86_400);
        let leaf = ca.client("app3").unwrap().cert_der;
        assert!(check_client_chain(&bundle, &[leaf], past).is_err());
        // No certificate, no bundle: errors, not panics.
        assert!(check_client_chain(&bundle, &[], now).is_err());
        assert!(
            check_client_chain(
                &dir.path().join("missing.pem"),
                &[ca.client("x").unwrap().cert_der],
                now
            )
            .is_err()
        );
    }

    #[test]
    fn dev_pki_builds_a_server_config_and_client_identities() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("SVS dev CA").unwrap();
        ca.save(dir.path()).unwrap();
        let server = ca.server(&["localhost", "127.0.0.1"]).unwrap();
        let (cert, key) = save_issued(dir.path(), "server", &server).unwrap();
        let files = TlsFiles {
            certificate: cert,
            private_key: key,
            client_ca: dir.path().join("ca.pem"),
        };
        let config = server_config(&files).unwrap();
        assert_eq!(config.alpn_protocols[0], b"h2");

        // A reloaded CA issues certificates under the same name.
        let ca2 = DevCa::load(dir.path(), "SVS dev CA").unwrap();
        let client = ca2.client("app1").unwrap();
        let id = ClientIdentity::from_der(&client.cert_der).unwrap();
        assert_eq!(id.subject.to_string(), "CN=app1,O=SVS development");
        assert_eq!(id.issuer.to_string(), "CN=SVS dev CA,O=SVS development");
        assert_eq!(
            svs_hsm::keys::hex(&id.certificate_sha256),
            sha256_hex(&client.cert_der)
        );

        let bad = TlsFiles {
            certificate: dir.path().join("missing.pem"),
            ..files
        };
        let Err(SvsError::Config(e)) = server_config(&bad) else {
            panic!()
        };
        assert!(e[0].contains("missing.pem"));
    }

    fn by_subject(name: &str, issuer: &str) -> EntityConfig {
        use crate::config::{EntityStatus, Operation};
        EntityConfig {
            name: name.into(),
            status: EntityStatus::Active,
            client: ClientMatch::Subject {
                subject: "CN=bank-a,O=SVS development".parse().unwrap(),
                issuer: issuer.parse().unwrap(),
            },
            keys: ["k".to_string()].into(),
            operations: [Operation::Sign].into(),
            rate: None,
            max_concurrent: None,
        }
    }

    /// A dev CA named `cn` in a temporary directory, and the server's TLS
    /// files it issued (the CA bundle: that CA).
    fn server_files(cn: &str) -> (tempfile::TempDir, DevCa, TlsFiles) {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate(cn).unwrap();
        ca.save(dir.path()).unwrap();
        let (certificate, private_key) =
            save_issued(dir.path(), "server", &ca.server(&["localhost"]).unwrap()).unwrap();
        let files = TlsFiles {
            certificate,
            private_key,
            client_ca: dir.path().join("ca.pem"),
        };
        (dir, ca, files)
    }

    #[test]
    fn an_entity_issuer_must_be_the_subject_of_a_client_ca_certificate() {
        let (_dir, ca, files) = server_files("Client CA");
        // Compared by meaning, as entities are.
        let named = by_subject("named", "cn = Client CA, o = SVS development");
        assert!(api_tls(&files, std::slice::from_ref(&named)).is_ok());

        // A CA the bundle does not hold (another, or an intermediate below
        // the bundle's CA): every such entity is reported, by name.
        let sub = ca.sub_ca("Issuing CA").unwrap();
        let entities = [
            by_subject("elsewhere", "CN=Other CA,O=SVS development"),
            named,
            by_subject("below", "CN=Issuing CA,O=SVS development"),
        ];
        let Err(SvsError::Config(errors)) = api_tls(&files, &entities) else {
            panic!("issuers outside the bundle must be refused")
        };
        assert_eq!(errors.len(), 2, "{errors:?}");
        for (e, (name, issuer)) in errors.iter().zip([
            ("elsewhere", "CN=Other CA,O=SVS development"),
            ("below", "CN=Issuing CA,O=SVS development"),
        ]) {
            assert!(
                e.contains(&format!("entity {name:?}"))
                    && e.contains(issuer)
                    && e.contains(&files.client_ca.display().to_string()),
                "{e}"
            );
        }
        // With the intermediate in the bundle, only the other CA is left.
        write(
            &files.client_ca,
            &format!("{}{}", ca.cert_pem, sub.cert_pem),
            false,
        )
        .unwrap();
        let Err(SvsError::Config(errors)) = api_tls(&files, &entities) else {
            panic!("an issuer outside the bundle must be refused")
        };
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("\"elsewhere\""), "{errors:?}");
        assert!(api_tls(&files, &entities[1..]).is_ok());
    }

    /// `dn` as `openssl x509 -nameopt RFC2253` prints it: each byte of a
    /// non-ASCII character as \XX.
    fn as_openssl_prints(dn: &str) -> String {
        dn.chars()
            .flat_map(|c| {
                let mut buf = [0u8; 4];
                let bytes = c.encode_utf8(&mut buf).as_bytes().to_vec();
                if c.is_ascii() {
                    vec![c.to_string()]
                } else {
                    bytes.iter().map(|b| format!("\\{b:02X}")).collect()
                }
            })
            .collect()
    }

    #[test]
    fn a_client_ca_with_a_chinese_name_is_named_as_openssl_prints_it() {
        let (_dir, ca, files) = server_files("中国银行客户端CA");
        let escaped = as_openssl_prints("CN=中国银行客户端CA,O=SVS development");
        assert!(escaped.starts_with(r"CN=\E4\B8\AD"), "{escaped}");
        for issuer in [escaped.as_str(), "CN=中国银行客户端CA,O=SVS development"] {
            let entity = by_subject("cn-bank", issuer);
            assert!(api_tls(&files, &[entity]).is_ok(), "{issuer}");
        }
        // Its clients' certificates name it so, and match.
        let leaf = ClientIdentity::from_der(&ca.client("bank-a").unwrap().cert_der).unwrap();
        assert_eq!(leaf.issuer, escaped.parse().unwrap());
        let entity = by_subject("cn-bank", &escaped);
        let ClientMatch::Subject { subject, issuer } = &entity.client else {
            unreachable!()
        };
        assert_eq!((&leaf.subject, &leaf.issuer), (subject, issuer));

        // Another CA, written the same way, is refused, and the message
        // shows the name as written: no doubled backslashes.
        let other = as_openssl_prints("CN=中国工商银行客户端CA,O=SVS development");
        let Err(SvsError::Config(errors)) = api_tls(&files, &[by_subject("icbc", &other)]) else {
            panic!("an issuer outside the bundle must be refused")
        };
        assert!(
            errors[0].contains(&format!(
                "entity \"icbc\": issuer \"{other}\" is the subject of no certificate"
            )),
            "{errors:?}"
        );
        assert!(!errors[0].contains(r"\\"), "{errors:?}");
    }
}
