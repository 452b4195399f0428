//! `csr`: a PKCS#10 request for a token key, signed inside the token.
//!
//! SM2: the signature algorithm is SM3withSM2 (1.2.156.10197.1.501, no
//! parameters); the token signs e = SM3(Z ‖ DER(CertificationRequestInfo))
//! with Z from the default ID `1234567812345678`, which is what
//! `openssl req -verify -vfyopt distid:1234567812345678` checks. ECDSA
//! P-256 keys (vendor modules without SM2) get ecdsa-with-SHA256.

use std::net::IpAddr;
use std::str::FromStr;

use der::asn1::{BitString, Ia5String, OctetString, SetOfVec};
use der::oid::{AssociatedOid, ObjectIdentifier};
use der::{Decode, Encode};
use serde_json::json;
use svs_hsm::Algorithm;
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{KeyUsage, KeyUsages, SubjectAltName};
use x509_cert::name::Name;
use x509_cert::request::{CertReq, CertReqInfo, ExtensionReq, Version};
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};

use crate::Report;
use crate::error::{ProvisionError, Result};
use crate::keys::{self, Key};
use crate::pin::PinReader;
use crate::token::Opened;

/// SM3withSM2 (GM/T 0006).
pub const SM3_WITH_SM2: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.156.10197.1.501");
/// ecdsa-with-SHA256 (RFC 5758).
pub const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");

/// What goes into the request besides the key.
#[derive(Debug, Clone, Default)]
pub struct CsrOptions {
    /// RFC 4514 subject, most specific RDN first: `CN=…,O=…,C=CN`.
    pub subject: String,
    /// Subject alternative names: `DNS:…`, `IP:…`, `email:…`, `URI:…`.
    pub sans: Vec<String>,
    /// Key usage names (`digitalSignature`, `nonRepudiation`, …).
    pub key_usage: Vec<String>,
}

/// Parses the subject; refuses empty names and unknown attribute types.
pub fn parse_subject(s: &str) -> Result<Name> {
    if s.trim().is_empty() {
        return Err(ProvisionError::Usage(
            "the subject is empty; give it as --subject \"CN=name,O=organisation,C=CN\"".into(),
        ));
    }
    Name::from_str(s).map_err(|e| {
        ProvisionError::Usage(format!(
            "cannot read the subject {s:?} ({e}); write it as RFC 4514, most specific first, e.g. \"CN=signer-01,O=Bank A,C=CN\" (escape commas in values with \\,)"
        ))
    })
}

fn general_name(s: &str) -> Result<GeneralName> {
    let bad = |why: &str| {
        ProvisionError::Usage(format!(
            "subject alternative name {s:?}: {why}; use DNS:name, IP:address, email:address or URI:uri"
        ))
    };
    let (kind, value) = s.split_once(':').ok_or_else(|| bad("no type prefix"))?;
    let ia5 = |v: &str| Ia5String::new(v).map_err(|_| bad("not ASCII"));
    match kind.to_ascii_lowercase().as_str() {
        "dns" if !value.is_empty() => Ok(GeneralName::DnsName(ia5(value)?)),
        "email" if value.contains('@') => Ok(GeneralName::Rfc822Name(ia5(value)?)),
        "uri" if value.contains(':') => Ok(GeneralName::UniformResourceIdentifier(ia5(value)?)),
        "ip" => {
            let ip: IpAddr = value.parse().map_err(|_| bad("not an IP address"))?;
            let bytes = match ip {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            Ok(GeneralName::IpAddress(
                OctetString::new(bytes).map_err(|_| bad("not an IP address"))?,
            ))
        }
        _ => Err(bad("unknown type or empty value")),
    }
}

/// Key usage names as OpenSSL and RFC 5280 write them.
const KEY_USAGES: [(&str, KeyUsages); 8] = [
    ("digitalSignature", KeyUsages::DigitalSignature),
    ("nonRepudiation", KeyUsages::NonRepudiation),
    ("contentCommitment", KeyUsages::NonRepudiation),
    ("keyEncipherment", KeyUsages::KeyEncipherment),
    ("dataEncipherment", KeyUsages::DataEncipherment),
    ("keyAgreement", KeyUsages::KeyAgreement),
    ("keyCertSign", KeyUsages::KeyCertSign),
    ("cRLSign", KeyUsages::CRLSign),
];

fn key_usage(names: &[String]) -> Result<KeyUsage> {
    let mut flags = der::flagset::FlagSet::<KeyUsages>::default();
    for n in names {
        match KEY_USAGES.iter().find(|(name, _)| name == n) {
            Some((_, flag)) => flags |= *flag,
            None => {
                let all: Vec<&str> = KEY_USAGES.iter().map(|(name, _)| *name).collect();
                let case = KEY_USAGES
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(n))
                    .map(|(name, _)| format!(" (names are case-sensitive: {name})"))
                    .unwrap_or_default();
                return Err(ProvisionError::Usage(format!(
                    "unknown key usage {n:?}{case}; use {}",
                    all.join(", ")
                )));
            }
        }
    }
    Ok(KeyUsage(flags))
}

/// Checks the subject, SANs and key usages without a key: what the
/// request needs besides the key is refused before any PIN is read or
/// the token is used.
pub fn check_options(opts: &CsrOptions) -> Result<()> {
    parse_subject(&opts.subject)?;
    extensions(opts).map(drop)
}

/// The CertificationRequestInfo for `key` (all input checked here, before
/// the token is asked for anything).
pub fn request_info(key: &Key, opts: &CsrOptions) -> Result<CertReqInfo> {
    let subject = parse_subject(&opts.subject)?;
    let public_key = SubjectPublicKeyInfoOwned::from_der(&key.spki())?;
    let extensions = extensions(opts)?;
    let mut attributes = SetOfVec::new();
    if !extensions.is_empty() {
        attributes.insert(ExtensionReq(extensions).try_into()?)?;
    }
    Ok(CertReqInfo {
        version: Version::V1,
        subject,
        public_key,
        attributes,
    })
}

/// The requested extensions: subject alternative names and key usage.
fn extensions(opts: &CsrOptions) -> Result<Vec<Extension>> {
    let mut extensions = Vec::new();
    let sans: Vec<String> = opts
        .sans
        .iter()
        .flat_map(|s| s.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if !sans.is_empty() {
        let names = sans
            .iter()
            .map(|s| general_name(s))
            .collect::<Result<Vec<_>>>()?;
        extensions.push(Extension {
            extn_id: SubjectAltName::OID,
            critical: false,
            extn_value: OctetString::new(SubjectAltName(names).to_der()?)?,
        });
    }
    let usages: Vec<String> = opts
        .key_usage
        .iter()
        .flat_map(|s| s.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if !usages.is_empty() {
        extensions.push(Extension {
            extn_id: KeyUsage::OID,
            critical: true,
            extn_value: OctetString::new(key_usage(&usages)?.to_der()?)?,
        });
    }
    Ok(extensions)
}

/// Puts a DER signature over `info` into a request.
pub fn assemble(info: CertReqInfo, algorithm: Algorithm, signature_der: &[u8]) -> Result<Vec<u8>> {
    let oid = match algorithm {
        Algorithm::Sm2 => SM3_WITH_SM2,
        Algorithm::EcdsaP256 => ECDSA_WITH_SHA256,
    };
    let req = CertReq {
        info,
        algorithm: AlgorithmIdentifierOwned {
            oid,
            parameters: None,
        },
        signature: BitString::from_bytes(signature_der)?,
    };
    Ok(req.to_der()?)
}

/// `csr`: returns the PEM request and a report.
pub fn csr(
    opened: &Opened,
    pins: &mut PinReader,
    label: &str,
    opts: &CsrOptions,
) -> Result<(String, Report)> {
    check_options(opts)?;
    let session = opened.user_session(pins)?;
    let key = keys::find(&session, &opened.profile, label, &opened.label)?;
    let info = request_info(&key, opts)?;
    let digest = keys::digest_for(&key, &info.to_der()?)?;
    let raw = keys::sign_digest(&session, &opened.profile, &key, &digest)?;
    let der = assemble(info, key.algorithm, &svs_hsm::signature::raw_to_der(&raw))?;
    let pem = der::pem::encode_string("CERTIFICATE REQUEST", der::pem::LineEnding::LF, &der)?;
    let report = Report {
        text: format!(
            "certificate request for key '{label}' ({}, signed {}), subject {}\n",
            keys::algorithm_name(key.algorithm),
            match key.algorithm {
                Algorithm::Sm2 => "SM3withSM2 with the default ID 1234567812345678",
                Algorithm::EcdsaP256 => "ecdsa-with-SHA256",
            },
            opts.subject
        ),
        json: json!({"label": label, "subject": opts.subject, "csr": pem}),
    };
    Ok((pem, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_san_and_key_usage_are_checked() {
        let n = parse_subject("CN=signer-01,O=Bank A,C=CN").unwrap();
        assert_eq!(n.to_string(), "CN=signer-01,O=Bank A,C=CN");
        assert!(parse_subject("").is_err());
        let e = parse_subject("nonsense").unwrap_err();
        assert!(e.to_string().contains("RFC 4514"), "{e}");
        assert!(general_name("DNS:svs.example").is_ok());
        assert!(general_name("IP:10.1.2.3").is_ok());
        assert!(general_name("IP:::1").is_ok());
        assert!(general_name("email:a@b.cn").is_ok());
        assert!(general_name("IP:999.1.1.1").is_err());
        assert!(general_name("svs.example").is_err());
        assert!(key_usage(&["digitalSignature".into(), "nonRepudiation".into()]).is_ok());
        assert!(key_usage(&["sign".into()]).is_err());
        let e = key_usage(&["digitalsignature".into()]).unwrap_err();
        assert!(
            e.to_string().contains("case-sensitive: digitalSignature"),
            "{e}"
        );
    }

    #[test]
    fn request_round_trips_with_extensions() {
        let mut point = vec![0x04];
        // Any 64 bytes encode; the token is what checks the point.
        point.extend_from_slice(&[3; 64]);
        let key = Key {
            label: "k".into(),
            id: vec![1],
            algorithm: Algorithm::Sm2,
            point,
            private: None,
            certificate: None,
        };
        let info = request_info(
            &key,
            &CsrOptions {
                subject: "CN=k,C=CN".into(),
                sans: vec!["DNS:a.example,IP:127.0.0.1".into()],
                key_usage: vec!["digitalSignature".into()],
            },
        )
        .unwrap();
        let der = assemble(
            info.clone(),
            Algorithm::Sm2,
            &[0x30, 0x06, 2, 1, 1, 2, 1, 1],
        )
        .unwrap();
        let back = CertReq::from_der(&der).unwrap();
        assert_eq!(back.info, info);
        assert_eq!(back.algorithm.oid, SM3_WITH_SM2);
        assert_eq!(back.info.attributes.len(), 1);
    }
}
