//! API v1 wire types and the decoding of their fields: base64, digests,
//! distinguishing IDs, signatures, public keys and certificates. Pure
//! functions; the handlers in [`crate::app`] put them together.

use der::{Decode, Encode};
use serde::{Deserialize, Serialize};
use svs_hsm::SignatureEncoding;
use svs_hsm::signature::{DEFAULT_SM2_ID, der_to_raw, raw_to_der};

use crate::error::SvsError;

/// Wire form of a signature encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// DER `SEQUENCE { r INTEGER, s INTEGER }` (GM/T 0009).
    #[default]
    Der,
    /// r ‖ s, 64 bytes.
    Raw,
}

// By hand: serde's derived enum also takes the externally tagged map form,
// `{"raw":null}`, where the API documents a string.
impl<'de> Deserialize<'de> for Encoding {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Encoding;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string, `der` or `raw`")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Encoding, E> {
                match s {
                    "der" => Ok(Encoding::Der),
                    "raw" => Ok(Encoding::Raw),
                    _ => Err(E::unknown_variant(s, &["der", "raw"])),
                }
            }
        }
        d.deserialize_str(V)
    }
}

/// An optional field that, when present, must be a `T`: serde's `Option`
/// takes `null` as absent, which the API does not document.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

impl From<Encoding> for SignatureEncoding {
    fn from(e: Encoding) -> Self {
        match e {
            Encoding::Der => SignatureEncoding::Der,
            Encoding::Raw => SignatureEncoding::Raw,
        }
    }
}

/// `POST /v1/sign` body (and one item of `/v1/sign/batch`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    /// Exposed key name.
    pub key: String,
    /// Message, base64.
    #[serde(default, deserialize_with = "present")]
    pub data: Option<String>,
    /// Ready e = SM3(Z ‖ M), base64 of 32 bytes.
    #[serde(default, deserialize_with = "present")]
    pub digest: Option<String>,
    /// Distinguishing ID (with `data` only).
    #[serde(default, deserialize_with = "present")]
    pub id: Option<String>,
    /// Signature encoding wanted.
    #[serde(default, deserialize_with = "present")]
    pub encoding: Option<Encoding>,
}

/// `POST /v1/verify` body (and one item of `/v1/verify/batch`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// Exposed key name of the signer.
    #[serde(default, deserialize_with = "present")]
    pub key: Option<String>,
    /// Signer's SubjectPublicKeyInfo: PEM, or base64 DER.
    #[serde(default, deserialize_with = "present")]
    pub public_key: Option<String>,
    /// Signer's certificate: PEM, or base64 DER.
    #[serde(default, deserialize_with = "present")]
    pub certificate: Option<String>,
    /// Message, base64.
    #[serde(default, deserialize_with = "present")]
    pub data: Option<String>,
    /// Ready e, base64 of 32 bytes.
    #[serde(default, deserialize_with = "present")]
    pub digest: Option<String>,
    /// Signature, base64.
    pub signature: String,
    /// Distinguishing ID (with `data` only).
    #[serde(default, deserialize_with = "present")]
    pub id: Option<String>,
    /// Encoding of `signature`.
    #[serde(default, deserialize_with = "present")]
    pub encoding: Option<Encoding>,
}

impl SignRequest {
    /// What is to be signed.
    pub fn input(&self) -> Result<Input, SvsError> {
        Input::of_request(&self.data, &self.digest, &self.id)
    }
}

impl VerifyRequest {
    /// What was signed.
    pub fn input(&self) -> Result<Input, SvsError> {
        Input::of_request(&self.data, &self.digest, &self.id)
    }
}

/// The one key of a batch body, `{"items": [...]}`.
#[derive(Debug, Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum BatchField {
    Items,
}

/// Error text that marks "too many items" inside a serde error, so the
/// parse can stop at the first item over the limit.
const TOO_MANY_ITEMS: &str = "svs: too many batch items";

/// Reads `{"items": [...]}` and stops at item `max + 1`: a batch over the
/// limit is refused while it is parsed, before the rest of it becomes
/// JSON values. Items stay raw values so that one bad item fails alone.
struct BatchSeed {
    max: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for BatchSeed {
    type Value = Vec<serde_json::Value>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BatchSeed {
    type Value = Vec<serde_json::Value>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object with items")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        let mut items = None;
        while let Some(BatchField::Items) = m.next_key()? {
            if items.is_some() {
                return Err(serde::de::Error::duplicate_field("items"));
            }
            items = Some(m.next_value_seed(ItemsSeed { max: self.max })?);
        }
        items.ok_or_else(|| serde::de::Error::missing_field("items"))
    }
}

struct ItemsSeed {
    max: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for ItemsSeed {
    type Value = Vec<serde_json::Value>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ItemsSeed {
    type Value = Vec<serde_json::Value>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a sequence of items")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Unique)? {
            if out.len() == self.max {
                return Err(serde::de::Error::custom(TOO_MANY_ITEMS));
            }
            out.push(v);
        }
        Ok(out)
    }
}

/// The API's own field names: a repeated one is named in the error, any
/// other repeated name is the client's text.
const FIELD_NAMES: &[&str] = &[
    "key",
    "data",
    "digest",
    "id",
    "encoding",
    "public_key",
    "certificate",
    "signature",
    "items",
];

/// A JSON value as serde_json builds it, except that an object repeating a
/// name, at any depth, is an error: serde_json keeps the last value, while
/// a proxy, firewall or logger reading the first would see a request other
/// than the one signed. Checked while parsing, at the cost of the insert
/// it replaces.
struct Unique;

impl<'de> serde::de::DeserializeSeed<'de> for Unique {
    type Value = serde_json::Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Unique {
    type Value = serde_json::Value;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Unique)? {
            out.push(v);
        }
        Ok(out.into())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error;
        use serde_json::map::Entry;
        let mut out = serde_json::Map::new();
        while let Some(k) = m.next_key::<String>()? {
            match out.entry(k) {
                Entry::Vacant(e) => {
                    e.insert(m.next_value_seed(Unique)?);
                }
                Entry::Occupied(e) => {
                    return Err(match FIELD_NAMES.iter().find(|f| **f == e.key()) {
                        Some(&f) => A::Error::duplicate_field(f),
                        None => A::Error::custom("duplicate field"),
                    });
                }
            }
        }
        Ok(out.into())
    }
}

/// Parses a single request's body, still undecoded (as a batch item is).
pub fn request_value(body: &[u8]) -> Result<serde_json::Value, SvsError> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = Unique.deserialize(&mut de).map_err(json_error)?;
    de.end().map_err(json_error)?;
    Ok(v)
}

/// Parses a batch body: at most `max` items (more is `batch_too_large`),
/// each still undecoded.
pub fn batch_items(body: &[u8], max: usize) -> Result<Vec<serde_json::Value>, SvsError> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_slice(body);
    let items = BatchSeed { max }.deserialize(&mut de).map_err(|e| {
        if e.to_string().starts_with(TOO_MANY_ITEMS) {
            SvsError::BatchTooLarge { max }
        } else {
            json_error(e)
        }
    })?;
    de.end().map_err(json_error)?;
    Ok(items)
}

/// A sign answer.
#[derive(Debug, Serialize)]
pub struct SignResponse {
    /// Exposed key name.
    pub key: String,
    /// Signature, base64.
    pub signature: String,
    /// Its encoding.
    pub encoding: Encoding,
}

/// A verify answer.
#[derive(Debug, Serialize)]
pub struct VerifyResponse {
    /// Whether the signature verifies.
    pub valid: bool,
}

/// Parses a JSON object into `T`, naming the problem without echoing input.
#[cfg(test)]
pub fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, SvsError> {
    from_value(request_value(bytes)?)
}

/// Decodes one request (a single body or a batch item): a JSON object.
pub fn from_value<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, SvsError> {
    // serde builds a struct from a JSON array too, by field order, where
    // `deny_unknown_fields` has no say: `["demo","aGk="]` would sign. The
    // API documents objects only.
    let kind = match &v {
        serde_json::Value::Object(_) => return serde_json::from_value(v).map_err(json_error),
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Null => "null",
    };
    Err(SvsError::MalformedRequest(format!(
        "a request must be a JSON object, not {kind}"
    )))
}

fn json_error(e: serde_json::Error) -> SvsError {
    // serde_json quotes the offending value in its messages, between
    // backticks (`invalid type: integer `42``) or double quotes (`invalid
    // type: string "…"`), and names unknown fields and variants, which are
    // client text too. The message is rebuilt from what svsd itself defines:
    // the error's category, the unexpected value's type, and what was
    // expected (field, variant and type names of the API).
    let full = e.to_string();
    let msg = full.find(" at line ").map_or(&full[..], |i| &full[..i]);
    let (head, expected) = match msg.find(", expected ") {
        Some(i) => (&msg[..i], Some(&msg[i + 2..])),
        None => (msg, None),
    };
    let own_name = head.starts_with("missing field") || head.starts_with("duplicate field");
    let mut out = if own_name {
        // The field name comes from the API's types, not from the client.
        head.to_owned()
    } else {
        // Everything from the first quote on is the client's value or name.
        head.find(['`', '"'])
            .map_or(head, |i| &head[..i])
            .trim_end()
            .to_owned()
    };
    if let Some(x) = expected {
        out.push_str(", ");
        out.push_str(&mask_double_quoted(x));
    }
    if e.is_syntax() || e.is_eof() {
        out = format!("body is not valid JSON: {out}");
    }
    SvsError::MalformedRequest(out)
}

/// Replaces every double-quoted segment with `…` (what serde writes after
/// "expected" names types, fields and variants in backticks; anything in
/// double quotes would be a value).
fn mask_double_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, part) in s.split('"').enumerate() {
        out.push_str(if i % 2 == 0 { part } else { "…" });
    }
    out
}

/// Standard base64 (with padding) of `field`.
pub fn b64(field: &'static str, s: &str) -> Result<Vec<u8>, SvsError> {
    use base64ct::{Base64, Encoding as _};
    Base64::decode_vec(s).map_err(|_| SvsError::InvalidBase64(field))
}

/// Standard base64 encoding.
pub fn to_b64(bytes: &[u8]) -> String {
    use base64ct::{Base64, Encoding as _};
    Base64::encode_string(bytes)
}

/// What is signed or verified: the message (with its ID) or a ready digest.
#[derive(Debug)]
pub enum Input {
    /// The message and the distinguishing ID.
    Data {
        /// Message bytes.
        data: Vec<u8>,
        /// ID bytes.
        id: Vec<u8>,
    },
    /// e, 32 bytes.
    Digest([u8; 32]),
}

impl Input {
    /// A request's `data`/`digest`/`id`, with GM/T 0009's default ID.
    fn of_request(
        data: &Option<String>,
        digest: &Option<String>,
        id: &Option<String>,
    ) -> Result<Input, SvsError> {
        Input::decode(
            data.as_deref(),
            digest.as_deref(),
            id.as_deref(),
            DEFAULT_SM2_ID,
        )
    }

    /// Decodes `data`/`digest`/`id`.
    pub fn decode(
        data: Option<&str>,
        digest: Option<&str>,
        id: Option<&str>,
        default_id: &[u8],
    ) -> Result<Input, SvsError> {
        match (data, digest) {
            (Some(_), Some(_)) => Err(SvsError::InvalidRequest(
                "give either data or digest, not both".into(),
            )),
            (None, None) => Err(SvsError::InvalidRequest(
                "data or digest is required".into(),
            )),
            (None, Some(d)) => {
                if id.is_some() {
                    return Err(SvsError::InvalidRequest(
                        "id applies to data only: a digest already includes Z".into(),
                    ));
                }
                let d = b64("digest", d)?;
                let n = d.len();
                Ok(Input::Digest(
                    d.try_into().map_err(|_| SvsError::InvalidDigest(n))?,
                ))
            }
            (Some(data), None) => {
                let id = match id {
                    None => default_id.to_vec(),
                    Some("") => {
                        return Err(SvsError::InvalidId("must not be empty".into()));
                    }
                    // ENTL is a 16-bit count of bits.
                    Some(id) if id.len() > 8191 => {
                        return Err(SvsError::InvalidId("longer than 8191 bytes".into()));
                    }
                    Some(id) => id.as_bytes().to_vec(),
                };
                Ok(Input::Data {
                    data: b64("data", data)?,
                    id,
                })
            }
        }
    }

    /// SM3 of what the caller sent (for the audit trail).
    pub fn audit_digest(&self) -> [u8; 32] {
        match self {
            Input::Data { data, .. } => crate::audit::sm3(data),
            Input::Digest(d) => crate::audit::sm3(d),
        }
    }
}

/// Decodes a signature in the declared encoding (DER is strict).
pub fn decode_signature(b64_sig: &str, encoding: Encoding) -> Result<[u8; 64], SvsError> {
    let bytes = b64("signature", b64_sig)?;
    match encoding {
        Encoding::Der => der_to_raw(&bytes).map_err(|e| SvsError::InvalidSignature(e.to_string())),
        Encoding::Raw => bytes.try_into().map_err(|v: Vec<u8>| {
            SvsError::InvalidSignature(format!("raw signature must be 64 bytes, got {}", v.len()))
        }),
    }
}

/// Encodes raw r‖s as asked.
pub fn encode_signature(raw: &[u8; 64], encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Der => raw_to_der(raw),
        Encoding::Raw => raw.to_vec(),
    }
}

/// PEM with 64-column lines.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = to_b64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// DER from PEM labelled `label`, or from plain base64. With `bundle`,
/// further blocks of the same label may follow and the first is used: a
/// certificate chain, leaf first, as `GET /v1/keys/{name}` answers it. A
/// PEM that is not well formed, or is labelled otherwise, is `bad`, which
/// names the label expected and not the one given (the client's text).
fn pem_or_b64(
    field: &'static str,
    label: &str,
    bundle: bool,
    bad: fn(String) -> SvsError,
    s: &str,
) -> Result<Vec<u8>, SvsError> {
    let s = s.trim();
    if !s.starts_with("-----BEGIN ") {
        return b64(field, s);
    }
    let mut rest = s;
    let mut first = None;
    while !rest.is_empty() {
        let (given, body, after) =
            pem_block(rest).ok_or_else(|| bad(format!("not a well-formed PEM {label} block")))?;
        if given != label {
            return Err(bad(format!("expected a PEM {label} block")));
        }
        if first.is_some() && !bundle {
            return Err(bad(format!("expected one PEM {label} block")));
        }
        let compact: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let der = b64(field, &compact)?;
        first.get_or_insert(der);
        rest = after.trim_start();
    }
    first.ok_or_else(|| bad(format!("expected a PEM {label} block")))
}

/// The first PEM block of `s`: its label, its body and what follows its
/// END line; `None` unless `s` starts with one.
fn pem_block(s: &str) -> Option<(&str, &str, &str)> {
    let (label, rest) = s.strip_prefix("-----BEGIN ")?.split_once("-----")?;
    if !label.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return None;
    }
    let (body, after) = rest.split_once(format!("-----END {label}-----").as_str())?;
    Some((label, body, after))
}

const EC_PUBLIC_KEY: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SM2_CURVE: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.2.156.10197.1.301");

/// The uncompressed SM2 point of a DER SubjectPublicKeyInfo, checked to be
/// on the curve and not the point at infinity.
pub fn sm2_point_from_spki(spki_der: &[u8]) -> Result<Vec<u8>, SvsError> {
    let bad = |m: &str| SvsError::InvalidPublicKey(m.to_string());
    let spki = spki::SubjectPublicKeyInfoRef::from_der(spki_der)
        .map_err(|_| bad("not a DER SubjectPublicKeyInfo"))?;
    let alg = spki.algorithm.oid;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<der::asn1::ObjectIdentifier>().ok());
    // Some encoders put the SM2 OID in the algorithm itself.
    let is_sm2 = (alg == EC_PUBLIC_KEY && curve == Some(SM2_CURVE)) || alg == SM2_CURVE;
    if !is_sm2 {
        return Err(bad(
            "not an SM2 key (expected id-ecPublicKey with curve 1.2.156.10197.1.301)",
        ));
    }
    let bits = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| bad("public key bit string is not whole bytes"))?;
    sm2_point(bits)
}

/// Validates a SEC1 point (compressed or not) and returns it uncompressed.
pub fn sm2_point(sec1: &[u8]) -> Result<Vec<u8>, SvsError> {
    use sm2::elliptic_curve::sec1::ToSec1Point;
    let pk = sm2::PublicKey::from_sec1_bytes(sec1).map_err(|_| {
        SvsError::InvalidPublicKey(
            "point is not on the SM2 curve, or is the point at infinity".into(),
        )
    })?;
    Ok(pk.to_sec1_point(false).as_bytes().to_vec())
}

/// The SM2 point of a `public_key` field (PEM or base64 SPKI).
pub fn public_key_field(s: &str) -> Result<Vec<u8>, SvsError> {
    let der = pem_or_b64(
        "public_key",
        "PUBLIC KEY",
        false,
        SvsError::InvalidPublicKey,
        s,
    )?;
    sm2_point_from_spki(&der)
}

/// The SM2 point of a `certificate` field (PEM, possibly a chain whose
/// first certificate is used, or base64 DER). The certificate is parsed for
/// its key only; chain and validity are not judged.
pub fn certificate_field(s: &str) -> Result<Vec<u8>, SvsError> {
    let der = pem_or_b64(
        "certificate",
        "CERTIFICATE",
        true,
        SvsError::InvalidCertificate,
        s,
    )?;
    let cert = x509_cert::Certificate::from_der(&der)
        .map_err(|_| SvsError::InvalidCertificate("not a DER X.509 certificate".into()))?;
    let spki = cert
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|_| SvsError::InvalidCertificate("cannot re-encode its public key".into()))?;
    sm2_point_from_spki(&spki).map_err(|e| SvsError::InvalidCertificate(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point() -> Vec<u8> {
        let sk = sm2::SecretKey::from_slice(&[3u8; 32]).unwrap();
        use sm2::elliptic_curve::sec1::ToSec1Point;
        sk.public_key().to_sec1_point(false).as_bytes().to_vec()
    }

    #[test]
    fn inputs_decode_or_say_why() {
        let d32 = to_b64(&[1u8; 32]);
        assert!(matches!(
            Input::decode(None, Some(&d32), None, b"x").unwrap(),
            Input::Digest(_)
        ));
        assert_eq!(
            Input::decode(None, Some(&to_b64(&[1u8; 31])), None, b"x").unwrap_err(),
            SvsError::InvalidDigest(31)
        );
        assert_eq!(
            Input::decode(Some("!!"), None, None, b"x").unwrap_err(),
            SvsError::InvalidBase64("data")
        );
        assert!(matches!(
            Input::decode(Some("AA=="), Some(&d32), None, b"x"),
            Err(SvsError::InvalidRequest(_))
        ));
        assert!(matches!(
            Input::decode(None, None, None, b"x"),
            Err(SvsError::InvalidRequest(_))
        ));
        assert!(matches!(
            Input::decode(None, Some(&d32), Some("alice"), b"x"),
            Err(SvsError::InvalidRequest(_))
        ));
        assert!(matches!(
            Input::decode(Some("AA=="), None, Some(""), b"x"),
            Err(SvsError::InvalidId(_))
        ));
        let Input::Data { data, id } = Input::decode(Some("AAE="), None, None, b"def").unwrap()
        else {
            panic!()
        };
        assert_eq!((data, id), (vec![0, 1], b"def".to_vec()));
    }

    #[test]
    fn signatures_must_be_in_the_declared_encoding() {
        let raw = [0x11u8; 64];
        let der = raw_to_der(&raw);
        assert_eq!(decode_signature(&to_b64(&der), Encoding::Der).unwrap(), raw);
        assert_eq!(decode_signature(&to_b64(&raw), Encoding::Raw).unwrap(), raw);
        assert!(matches!(
            decode_signature(&to_b64(&raw), Encoding::Der),
            Err(SvsError::InvalidSignature(_))
        ));
        assert!(matches!(
            decode_signature(&to_b64(&der), Encoding::Raw),
            Err(SvsError::InvalidSignature(_))
        ));
        assert!(matches!(
            decode_signature("%%%", Encoding::Der),
            Err(SvsError::InvalidBase64("signature"))
        ));
    }

    #[test]
    fn public_keys_parse_from_pem_and_base64_and_bad_points_are_refused() {
        let p = point();
        let spki = svs_hsm::keys::spki_for_point(svs_hsm::Algorithm::Sm2, &p);
        assert_eq!(public_key_field(&pem("PUBLIC KEY", &spki)).unwrap(), p);
        assert_eq!(public_key_field(&to_b64(&spki)).unwrap(), p);
        // Off the curve.
        let mut off = p.clone();
        off[64] ^= 1;
        let spki_off = svs_hsm::keys::spki_for_point(svs_hsm::Algorithm::Sm2, &off);
        assert!(matches!(
            public_key_field(&to_b64(&spki_off)),
            Err(SvsError::InvalidPublicKey(_))
        ));
        // The point at infinity.
        assert!(sm2_point(&[0]).is_err());
        // A P-256 key is not an SM2 key.
        let p256 = svs_hsm::keys::spki_for_point(svs_hsm::Algorithm::EcdsaP256, &p);
        assert!(public_key_field(&to_b64(&p256)).is_err());
        assert!(matches!(
            certificate_field(&to_b64(b"not a certificate")),
            Err(SvsError::InvalidCertificate(_))
        ));
    }

    /// A certificate for `spki` that parses (nothing else is judged): v3,
    /// empty names, SM2-with-SM3 identifiers, an empty signature.
    fn cert_for(spki: &[u8]) -> Vec<u8> {
        fn tlv(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
            let content = parts.concat();
            let n = content.len();
            let mut out = vec![tag];
            // DER: the shortest length form.
            match n {
                0..128 => out.push(u8::try_from(n).unwrap()),
                128..256 => out.extend([0x81, u8::try_from(n).unwrap()]),
                _ => out.extend([0x82, u8::try_from(n >> 8).unwrap(), n as u8]),
            }
            out.extend(content);
            out
        }
        let sm2_sm3 = der::asn1::ObjectIdentifier::new_unwrap("1.2.156.10197.1.501");
        let alg = tlv(0x30, &[&sm2_sm3.to_der().unwrap()]);
        let time = tlv(0x17, &[b"250101000000Z"]);
        let tbs = tlv(
            0x30,
            &[
                &tlv(0xa0, &[&[2, 1, 2]]),
                &[2, 1, 1],
                &alg,
                &[0x30, 0],
                &tlv(0x30, &[&time, &time]),
                &[0x30, 0],
                spki,
            ],
        );
        tlv(0x30, &[&tbs, &alg, &[3, 1, 0]])
    }

    #[test]
    fn a_pem_certificate_chain_gives_its_first_certificate() {
        let leaf_point = point();
        let ca_point = {
            use sm2::elliptic_curve::sec1::ToSec1Point;
            let sk = sm2::SecretKey::from_slice(&[5u8; 32]).unwrap();
            sk.public_key().to_sec1_point(false).as_bytes().to_vec()
        };
        let spki = |p: &[u8]| svs_hsm::keys::spki_for_point(svs_hsm::Algorithm::Sm2, p);
        let leaf = pem("CERTIFICATE", &cert_for(&spki(&leaf_point)));
        let ca = pem("CERTIFICATE", &cert_for(&spki(&ca_point)));
        assert_eq!(certificate_field(&leaf).unwrap(), leaf_point);
        assert_eq!(
            certificate_field(&to_b64(&cert_for(&spki(&leaf_point)))).unwrap(),
            leaf_point
        );
        // Leaf then CA, as GET /v1/keys/{name} answers certificate_chain.
        assert_eq!(
            certificate_field(&format!("{leaf}{ca}")).unwrap(),
            leaf_point
        );
        assert_eq!(
            certificate_field(&format!("{ca}\n\n{leaf}\n")).unwrap(),
            ca_point
        );
        // The rest of a chain must still be PEM certificates.
        let bad_cert = |s: &str, expect: &str| match certificate_field(s) {
            Err(SvsError::InvalidCertificate(m)) => assert!(m.contains(expect), "{m}"),
            other => panic!("{other:?}"),
        };
        let public = pem("PUBLIC KEY", &spki(&leaf_point));
        bad_cert(
            &format!("{leaf}{public}"),
            "expected a PEM CERTIFICATE block",
        );
        bad_cert(&format!("{leaf}trailing text"), "not a well-formed PEM");
        bad_cert(&leaf[..leaf.len() - 10], "not a well-formed PEM");
        assert_eq!(
            certificate_field(&format!(
                "{leaf}-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n"
            )),
            Err(SvsError::InvalidBase64("certificate"))
        );
        // The wrong label, or the right one around other contents.
        bad_cert(&public, "expected a PEM CERTIFICATE block");
        bad_cert(
            &pem("CERTIFICATE", &spki(&leaf_point)),
            "not a DER X.509 certificate",
        );
        // The label given is the client's text, never echoed.
        let m = certificate_field(&pem("110101199003074512", b"x"))
            .unwrap_err()
            .to_string();
        assert!(!m.contains("110101199003074512"), "{m}");
        assert_eq!(
            certificate_field("!!not base64"),
            Err(SvsError::InvalidBase64("certificate"))
        );
    }

    #[test]
    fn a_pem_public_key_must_be_one_public_key_block() {
        let p = point();
        let spki = svs_hsm::keys::spki_for_point(svs_hsm::Algorithm::Sm2, &p);
        let public = pem("PUBLIC KEY", &spki);
        let bad_key = |s: &str, expect: &str| match public_key_field(s) {
            Err(SvsError::InvalidPublicKey(m)) => assert!(m.contains(expect), "{m}"),
            other => panic!("{other:?}"),
        };
        bad_key(
            &pem("EC PUBLIC KEY", &spki),
            "expected a PEM PUBLIC KEY block",
        );
        bad_key(
            &pem("CERTIFICATE", &cert_for(&spki)),
            "expected a PEM PUBLIC KEY block",
        );
        bad_key(
            &format!("{public}{public}"),
            "expected one PEM PUBLIC KEY block",
        );
        bad_key(
            &pem("PUBLIC KEY", &cert_for(&spki)),
            "not a DER SubjectPublicKeyInfo",
        );
        assert_eq!(
            public_key_field("-----BEGIN PUBLIC KEY-----\n%%\n-----END PUBLIC KEY-----"),
            Err(SvsError::InvalidBase64("public_key"))
        );
        assert_eq!(
            public_key_field("%%"),
            Err(SvsError::InvalidBase64("public_key"))
        );
    }

    #[test]
    fn repeated_names_are_refused_at_any_depth_without_their_values() {
        let dup = |body: &str| match from_json::<SignRequest>(body.as_bytes()) {
            Err(SvsError::MalformedRequest(m)) => m,
            other => panic!("{body}: {other:?}"),
        };
        for (body, field) in [
            (
                r#"{"key":"demo","data":"aGVsbG8=","data":"d29ybGQ="}"#,
                "data",
            ),
            (r#"{"key":"nope","key":"demo","data":"aGVsbG8="}"#, "key"),
            (
                r#"{"key":"demo","data":"aGVsbG8=","encoding":"der","encoding":"raw"}"#,
                "encoding",
            ),
            (
                r#"{"key":"demo","digest":"AA==","digest":"AQ=="}"#,
                "digest",
            ),
        ] {
            let m = dup(body);
            assert_eq!(m, format!("duplicate field `{field}`"), "{body}");
        }
        // Deeper, and names that are the client's own: not named.
        for body in [
            r#"{"key":"demo","encoding":{"raw":null,"raw":null}}"#,
            r#"{"key":"demo","x":[{"110101199003074512":1,"110101199003074512":2}]}"#,
            r#"{"key":"demo","110101199003074512":1,"110101199003074512":1}"#,
        ] {
            let m = dup(body);
            assert_eq!(m, "duplicate field", "{body}");
        }
        // Batch items, at their own level and deeper.
        for body in [
            r#"{"items":[{"key":"demo","data":"aGVsbG8="},{"key":"demo","data":"aGVsbG8=","data":"d29ybGQ="}]}"#,
            r#"{"items":[{"key":"demo","data":{"a":1,"a":1}}]}"#,
        ] {
            let e = batch_items(body.as_bytes(), 8).unwrap_err();
            assert!(
                matches!(&e, SvsError::MalformedRequest(m) if m.starts_with("duplicate field")),
                "{e:?}"
            );
            assert!(!e.to_string().contains("d29ybGQ="), "{e}");
        }
        // Distinct names build the value serde_json would.
        let body =
            br#"{"a":[1,-2,3.5,true,false,null,"s",{"b":{}}],"c":{"a":18446744073709551615}}"#;
        assert_eq!(
            request_value(body).unwrap(),
            serde_json::from_slice::<serde_json::Value>(body).unwrap()
        );
    }

    #[test]
    fn present_fields_must_be_strings() {
        let refused = |body: String| match from_json::<VerifyRequest>(body.as_bytes()) {
            Err(SvsError::MalformedRequest(m)) => {
                assert!(m.contains("expected a string"), "{body}: {m}");
            }
            other => panic!("{body}: {other:?}"),
        };
        for field in [
            "key",
            "public_key",
            "certificate",
            "data",
            "digest",
            "id",
            "encoding",
            "signature",
        ] {
            let others = if field == "signature" {
                ""
            } else {
                r#""signature":"AA==","#
            };
            for value in ["null", r#"{"raw":null}"#, "1", "[]"] {
                refused(format!(r#"{{{others}"{field}":{value}}}"#));
            }
        }
        for body in [
            r#"{"key":"demo","data":"aGk=","encoding":{"raw":null}}"#,
            r#"{"key":"demo","data":"aGk=","encoding":null}"#,
            r#"{"key":"demo","data":null}"#,
            r#"{"key":null,"data":"aGk="}"#,
        ] {
            match from_json::<SignRequest>(body.as_bytes()) {
                Err(SvsError::MalformedRequest(m)) => {
                    assert!(m.contains("expected a string"), "{m}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
        // Absent is still absent, and the strings still decode.
        let r: SignRequest = from_json(br#"{"key":"demo","encoding":"raw"}"#).unwrap();
        assert_eq!(
            (r.data, r.digest, r.id, r.encoding),
            (None, None, None, Some(Encoding::Raw))
        );
        let r: VerifyRequest = from_json(br#"{"signature":"AA=="}"#).unwrap();
        assert!(r.key.is_none() && r.public_key.is_none() && r.certificate.is_none());
        let e = from_json::<SignRequest>(br#"{"key":"demo","encoding":"pem"}"#).unwrap_err();
        assert_eq!(
            e,
            SvsError::MalformedRequest("unknown variant, expected `der` or `raw`".into())
        );
    }

    #[test]
    fn json_errors_do_not_echo_values() {
        let e = from_json::<SignRequest>(br#"{"key":"k","data":"c2VjcmV0","extra":"TOPSECRET"}"#)
            .unwrap_err();
        assert!(matches!(e, SvsError::MalformedRequest(_)));
        assert!(!e.to_string().contains("TOPSECRET"));
        let e = from_json::<SignRequest>(br#"{"key":"k","data":12345678}"#).unwrap_err();
        assert!(!e.to_string().contains("12345678"), "{e}");
        // Field-order arrays and other non-objects are not requests.
        for body in [&br#"["k","aGk="]"#[..], b"[]", b"\"k\"", b"42", b"null"] {
            let e = from_json::<SignRequest>(body).unwrap_err();
            assert_eq!(e.to_json()["error"]["code"], "malformed_request");
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert!(from_value::<VerifyRequest>(v).is_err());
        }
        let e = from_json::<SignRequest>(b"{not json").unwrap_err();
        assert!(matches!(e, SvsError::MalformedRequest(_)));
    }

    const PII: &str = "110101199003074512";

    #[test]
    fn bare_string_values_are_not_echoed() {
        // A batch item that is a bare string.
        let items = batch_items(format!(r#"{{"items":["{PII}"]}}"#).as_bytes(), 8).unwrap();
        let e = from_value::<SignRequest>(items[0].clone()).unwrap_err();
        let m = e.to_json().to_string();
        assert!(!m.contains(PII), "{m}");
        assert!(m.contains("must be a JSON object, not a string"), "{m}");
        // "items" itself a string.
        let e = batch_items(format!(r#"{{"items":"{PII}"}}"#).as_bytes(), 8).unwrap_err();
        let m = e.to_json().to_string();
        assert!(
            !m.contains(PII) && matches!(e, SvsError::MalformedRequest(_)),
            "{m}"
        );
        // A string where a number or an enum is expected, an unknown field
        // and an unknown variant: the client's text never comes back.
        for body in [
            format!(r#"{{"key":"k","data":"aGk=","encoding":"{PII}"}}"#),
            format!(r#"{{"key":"k","data":"aGk=","{PII}":1}}"#),
            format!(r#"{{"key":["{PII}"]}}"#),
            format!(r#"{{"items":[],"{PII}":1}}"#),
        ] {
            let e = from_json::<SignRequest>(body.as_bytes()).unwrap_err();
            assert!(!e.to_string().contains(PII), "{e}");
            if let Err(e) = batch_items(body.as_bytes(), 8) {
                assert!(!e.to_string().contains(PII), "{e}");
            }
        }
        let e = from_json::<SignRequest>(br#"{"data":"aGk="}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `key`"), "{e}");
    }

    #[test]
    fn a_batch_is_cut_at_its_limit_while_parsed() {
        let body = |n: usize| {
            let items: Vec<_> = (0..n).map(|_| r#"{"key":"k"}"#).collect();
            format!(r#"{{"items":[{}]}}"#, items.join(","))
        };
        assert_eq!(batch_items(body(3).as_bytes(), 3).unwrap().len(), 3);
        assert_eq!(
            batch_items(body(4).as_bytes(), 3).unwrap_err(),
            SvsError::BatchTooLarge { max: 3 }
        );
        // Even when the rest would not parse: it is never looked at.
        let cut = format!("{}, !!garbage", &body(4)[..body(4).len() - 2]);
        assert_eq!(
            batch_items(cut.as_bytes(), 3).unwrap_err(),
            SvsError::BatchTooLarge { max: 3 }
        );
        assert!(matches!(
            batch_items(br#"{"items":[1]} x"#, 3),
            Err(SvsError::MalformedRequest(_))
        ));
        assert!(matches!(
            batch_items(br#"{}"#, 3),
            Err(SvsError::MalformedRequest(m)) if m.contains("missing field `items`")
        ));
    }
}
