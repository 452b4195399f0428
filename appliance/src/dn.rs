//! Distinguished names compared by meaning: an entity's `subject` and
//! `issuer` as the configuration writes them (RFC 4514, the way
//! `openssl x509 -noout -subject -nameopt RFC2253` prints them) and a
//! certificate's DER names are read into the same form, a sequence of RDNs
//! that are each a set of (attribute type OID, value).
//!
//! So `O=\E4\B8\AD\E5\9B\BD` (openssl's escaped UTF-8) and `O=中国` are one
//! name, as are `emailAddress=`, `EMAIL=`, `E=` and
//! `1.2.840.113549.1.9.1=`, and `UID=42+CN=a` and `CN=a+UID=42`; a value
//! the certificate holds as a PrintableString, UTF8String, BMPString and so
//! on is the same text. Values compare exactly (case included), after
//! leading and trailing white space is dropped.
//!
//! The string form is parsed here rather than by x509-cert's
//! `Name::from_str`: that one takes no spaces around `=`, `,` and `+`
//! (which svsd accepted before), misreads an escaped backslash before a
//! separator (`\\\,`), leaves escaped bytes unchecked for UTF-8, and knows
//! attribute types by a table of hundreds of names, so a typo can resolve
//! to an unrelated attribute instead of being reported.

use std::collections::BTreeSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

use der::asn1::{Any, ObjectIdentifier};
use der::{Decode, Encode, Tag, Tagged};

/// The attribute type names accepted in a DN string, upper-cased, and the
/// first of each OID's names is the one [`DistinguishedName::from_name`]
/// prints (openssl's).
const ATTRIBUTE_TYPES: &[(&str, ObjectIdentifier)] = &[
    ("CN", ObjectIdentifier::new_unwrap("2.5.4.3")),
    ("SN", ObjectIdentifier::new_unwrap("2.5.4.4")),
    ("SERIALNUMBER", ObjectIdentifier::new_unwrap("2.5.4.5")),
    ("C", ObjectIdentifier::new_unwrap("2.5.4.6")),
    ("L", ObjectIdentifier::new_unwrap("2.5.4.7")),
    ("ST", ObjectIdentifier::new_unwrap("2.5.4.8")),
    ("STREET", ObjectIdentifier::new_unwrap("2.5.4.9")),
    ("O", ObjectIdentifier::new_unwrap("2.5.4.10")),
    ("OU", ObjectIdentifier::new_unwrap("2.5.4.11")),
    ("TITLE", ObjectIdentifier::new_unwrap("2.5.4.12")),
    ("GN", ObjectIdentifier::new_unwrap("2.5.4.42")),
    ("GIVENNAME", ObjectIdentifier::new_unwrap("2.5.4.42")),
    (
        "DC",
        ObjectIdentifier::new_unwrap("0.9.2342.19200300.100.1.25"),
    ),
    (
        "UID",
        ObjectIdentifier::new_unwrap("0.9.2342.19200300.100.1.1"),
    ),
    (
        "EMAILADDRESS",
        ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.1"),
    ),
    (
        "EMAIL",
        ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.1"),
    ),
    ("E", ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.1")),
];

/// How a name prints an attribute type: openssl's spelling, or the OID.
fn type_name(oid: &ObjectIdentifier) -> String {
    match ATTRIBUTE_TYPES.iter().find(|(_, o)| o == oid) {
        Some(("SERIALNUMBER", _)) => "serialNumber".into(),
        Some(("EMAILADDRESS", _)) => "emailAddress".into(),
        Some(("TITLE", _)) => "title".into(),
        Some((name, _)) => (*name).into(),
        None => oid.to_string(),
    }
}

/// One attribute value, as compared.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Value {
    /// A directory string, whatever its ASN.1 string type, white space
    /// trimmed.
    Text(String),
    /// Anything else, as its whole DER encoding: equal only to the same
    /// encoding (written `#hex` in a DN string).
    Der(Vec<u8>),
}

impl Value {
    fn from_any(any: &Any) -> Value {
        let bytes = any.value();
        let text = match any.tag() {
            Tag::Utf8String => std::str::from_utf8(bytes).ok().map(str::to_owned),
            Tag::PrintableString | Tag::Ia5String | Tag::NumericString | Tag::VisibleString => {
                std::str::from_utf8(bytes)
                    .ok()
                    .filter(|s| s.is_ascii())
                    .map(str::to_owned)
            }
            // T.61 proper is a dead encoding; CAs that use the tag put
            // Latin-1 in it.
            Tag::TeletexString => Some(bytes.iter().map(|&b| char::from(b)).collect()),
            Tag::BmpString if bytes.len().is_multiple_of(2) => char::decode_utf16(
                bytes
                    .chunks_exact(2)
                    .map(|p| u16::from_be_bytes([p[0], p[1]])),
            )
            .collect::<Result<String, _>>()
            .ok(),
            _ => None,
        };
        match text {
            Some(t) => Value::Text(t.trim().to_owned()),
            None => Value::Der(any.to_der().unwrap_or_else(|_| bytes.to_vec())),
        }
    }
}

/// One attribute of an RDN: its type and value.
type Attribute = (ObjectIdentifier, Value);

/// One RDN: a set of attributes, in no order.
type Rdn = BTreeSet<Attribute>;

/// One `type=value` read off the front of a DN string.
struct Parsed<'a> {
    attribute: Attribute,
    /// `,` or `+` after it; none at the end.
    separator: Option<char>,
    /// What follows the separator.
    rest: &'a str,
}

/// A distinguished name: equal, hashed and ordered by meaning (its RDNs),
/// displayed as written.
#[derive(Clone)]
pub struct DistinguishedName {
    /// As written in the configuration, without surrounding white space; for a certificate's name,
    /// RFC 4514 as openssl's `-nameopt RFC2253` prints it (UTF-8 unescaped).
    text: String,
    /// Most specific first, as RFC 4514 writes them.
    rdns: Vec<Rdn>,
}

impl DistinguishedName {
    /// Parses an RFC 4514 string. Spaces around `,` `+` `=` are allowed;
    /// attribute types are case-insensitive names (CN, O, OU, C, L, ST,
    /// STREET, DC, UID, serialNumber, emailAddress/EMAIL/E, SN, GN, title)
    /// or dotted OIDs; values take `\` escapes of special characters and
    /// `\XX` hex pairs forming UTF-8, or `#` and the hex of a BER value.
    pub fn parse(s: &str) -> Result<DistinguishedName, DnError> {
        let text = written(s);
        if text.is_empty() {
            return Err(DnError("it is empty".into()));
        }
        let mut rdns = Vec::new();
        let mut rdn = Rdn::new();
        let mut rest = text;
        loop {
            let parsed = attribute(rest)?;
            if !rdn.insert(parsed.attribute) {
                return Err(DnError("an RDN has the same attribute twice".into()));
            }
            rest = parsed.rest;
            match parsed.separator {
                Some('+') => {}
                Some(_) => rdns.push(std::mem::take(&mut rdn)),
                None => {
                    rdns.push(rdn);
                    break;
                }
            }
        }
        Ok(DistinguishedName {
            text: text.to_owned(),
            rdns,
        })
    }

    /// A certificate's subject or issuer name.
    pub fn from_name(name: &x509_cert::name::Name) -> DistinguishedName {
        // DER holds the least specific RDN first.
        let mut rdns: Vec<Rdn> = name
            .iter_rdn()
            .map(|rdn| {
                rdn.iter()
                    .map(|atv| (atv.oid, Value::from_any(&atv.value)))
                    .collect()
            })
            .collect();
        rdns.reverse();
        let text = rdns
            .iter()
            .map(|rdn| {
                rdn.iter()
                    .map(|(oid, value)| format!("{}={}", type_name(oid), escaped(value)))
                    .collect::<Vec<_>>()
                    .join("+")
            })
            .collect::<Vec<_>>()
            .join(",");
        DistinguishedName { text, rdns }
    }

    /// The name in double quotes as written, for messages: escapes stay
    /// single (unlike `{:?}`), control characters are shown escaped.
    pub fn quoted(&self) -> String {
        quote(&self.text)
    }
}

/// `s` in double quotes, as written but for control characters, shown
/// escaped (unlike `{:?}`, which doubles every backslash of an escape).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('"');
    out
}

/// `s` without surrounding white space, but for an escaped final space.
fn written(s: &str) -> &str {
    let s = s.trim_start();
    let trimmed = s.trim_end();
    let backslashes = trimmed.len() - trimmed.trim_end_matches('\\').len();
    // Only an ASCII space can be escaped so: other white space (a no-break
    // space) is several bytes and trimmed like any.
    if backslashes % 2 == 1 && s[trimmed.len()..].starts_with(' ') {
        &s[..trimmed.len() + 1]
    } else {
        trimmed
    }
}

/// Parses the `type=value` at the start of `s`.
fn attribute(s: &str) -> Result<Parsed<'_>, DnError> {
    if s.trim().is_empty() {
        return Err(DnError("it ends with ',' or '+'".into()));
    }
    let (ty, value) = match s.find(['=', ',', '+']) {
        Some(i) if s[i..].starts_with('=') => (&s[..i], &s[i + 1..]),
        i => {
            return Err(DnError(format!(
                "{} has no '=' (write type=value)",
                quote(s[..i.unwrap_or(s.len())].trim())
            )));
        }
    };
    let oid = attribute_type(ty.trim())?;
    let value = value.trim_start();
    let (value, separator, rest) = match value.strip_prefix('#') {
        Some(hex) => {
            let end = hex.find([',', '+']).unwrap_or(hex.len());
            let any = decode_hex(hex[..end].trim_end())
                .and_then(|der| Any::from_der(&der).ok())
                .ok_or_else(|| {
                    DnError(format!(
                        "{}: a value starting with '#' must be the hex of one DER value \
                         (write \\# for a value that starts with the character)",
                        type_name(&oid)
                    ))
                })?;
            let (separator, rest) = split_at_separator(hex, end);
            (Value::from_any(&any), separator, rest)
        }
        None => {
            let (text, end) = string_value(value, &oid)?;
            let (separator, rest) = split_at_separator(value, end);
            (Value::Text(text.trim().to_owned()), separator, rest)
        }
    };
    Ok(Parsed {
        attribute: (oid, value),
        separator,
        rest,
    })
}

fn split_at_separator(s: &str, end: usize) -> (Option<char>, &str) {
    match s[end..].chars().next() {
        Some(c) => (Some(c), &s[end + c.len_utf8()..]),
        None => (None, ""),
    }
}

fn attribute_type(ty: &str) -> Result<ObjectIdentifier, DnError> {
    if ty.is_empty() {
        return Err(DnError(
            "an attribute type is missing (before '=' or after ',' or '+')".into(),
        ));
    }
    if ty.starts_with(|c: char| c.is_ascii_digit()) {
        return ObjectIdentifier::new(ty)
            .map_err(|_| DnError(format!("{} is not a dotted OID such as 2.5.4.3", quote(ty))));
    }
    ATTRIBUTE_TYPES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(ty))
        .map(|(_, oid)| *oid)
        .ok_or_else(|| {
            DnError(format!(
                "unknown attribute type {}: use CN, O, OU, C, L, ST, STREET, DC, UID, \
                 serialNumber, emailAddress, SN, GN, title or a dotted OID",
                quote(ty)
            ))
        })
}

/// Reads a string value up to the first unescaped `,` or `+`: the value
/// with escapes undone, and the byte offset of that separator (or the end).
fn string_value(s: &str, oid: &ObjectIdentifier) -> Result<(String, usize), DnError> {
    let fail = |what: String| DnError(format!("{}: {what}", type_name(oid)));
    let mut bytes = Vec::with_capacity(s.len());
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            ',' | '+' => return finish(bytes, i, oid),
            '\\' => match chars.next() {
                Some((_, e @ ('"' | '+' | ',' | ';' | '<' | '>' | '\\' | ' ' | '#' | '='))) => {
                    let mut buf = [0u8; 4];
                    bytes.extend_from_slice(e.encode_utf8(&mut buf).as_bytes());
                }
                Some((_, h)) if h.is_ascii_hexdigit() => {
                    let low = chars.next().map(|(_, l)| l);
                    let byte = low
                        .filter(char::is_ascii_hexdigit)
                        .and_then(|l| u8::from_str_radix(&format!("{h}{l}"), 16).ok())
                        .ok_or_else(|| {
                            fail(format!("\\{h} must be followed by a second hex digit"))
                        })?;
                    bytes.push(byte);
                }
                Some((_, other)) => {
                    return Err(fail(format!(
                        "\\{other} is no escape: \\ takes one of \" + , ; < > \\ space # = or two hex digits"
                    )));
                }
                None => return Err(fail("ends with a lone \\".into())),
            },
            '"' | ';' | '<' | '>' => {
                return Err(fail(format!("{c} must be escaped as \\{c}")));
            }
            _ => {
                let mut buf = [0u8; 4];
                bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    finish(bytes, s.len(), oid)
}

fn finish(bytes: Vec<u8>, end: usize, oid: &ObjectIdentifier) -> Result<(String, usize), DnError> {
    String::from_utf8(bytes).map(|s| (s, end)).map_err(|_| {
        DnError(format!(
            "{}: the \\XX escapes do not form UTF-8",
            type_name(oid)
        ))
    })
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// A value as RFC 4514 writes it, non-ASCII characters unescaped.
fn escaped(value: &Value) -> String {
    match value {
        Value::Text(t) => {
            let mut out = String::with_capacity(t.len());
            for (i, c) in t.char_indices() {
                match c {
                    '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                        out.push('\\');
                        out.push(c);
                    }
                    '#' if i == 0 => out.push_str("\\#"),
                    ' ' if i == 0 || i + 1 == t.len() => out.push_str("\\ "),
                    c if c.is_control() => {
                        let mut buf = [0u8; 4];
                        for b in c.encode_utf8(&mut buf).bytes() {
                            out.push_str(&format!("\\{b:02X}"));
                        }
                    }
                    c => out.push(c),
                }
            }
            out
        }
        Value::Der(der) => {
            let mut out = String::from("#");
            for b in der {
                out.push_str(&format!("{b:02X}"));
            }
            out
        }
    }
}

impl FromStr for DistinguishedName {
    type Err = DnError;

    fn from_str(s: &str) -> Result<Self, DnError> {
        DistinguishedName::parse(s)
    }
}

impl fmt::Display for DistinguishedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for DistinguishedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DistinguishedName({})", self.quoted())
    }
}

impl PartialEq for DistinguishedName {
    fn eq(&self, other: &Self) -> bool {
        self.rdns == other.rdns
    }
}

impl Eq for DistinguishedName {}

impl Hash for DistinguishedName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.rdns.hash(state);
    }
}

impl PartialOrd for DistinguishedName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for DistinguishedName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rdns.cmp(&other.rdns)
    }
}

/// Why a string is not a distinguished name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnError(String);

impl fmt::Display for DnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DnError {}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_cert::attr::AttributeTypeAndValue;
    use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};

    #[test]
    fn a_trailing_backslash_before_other_white_space_is_an_error_not_a_panic() {
        for s in ["CN=a\\\u{a0}", "CN=a\\\u{3000}", "CN=a\\\t"] {
            assert!(DistinguishedName::parse(s).is_err(), "{s:?}");
        }
        assert_eq!(
            DistinguishedName::parse("CN=a\\ ").unwrap(),
            DistinguishedName::parse("CN=a\\20").unwrap()
        );
    }

    const CN: &str = "2.5.4.3";
    const O: &str = "2.5.4.10";
    const UID: &str = "0.9.2342.19200300.100.1.1";
    const EMAIL: &str = "1.2.840.113549.1.9.1";

    /// A certificate's name from its RDNs in DER order (least specific
    /// first), each attribute as (OID, string type, content bytes).
    fn name(rdns: &[&[(&str, Tag, &[u8])]]) -> DistinguishedName {
        let mut seq = RdnSequence::default();
        for rdn in rdns {
            let atvs: Vec<AttributeTypeAndValue> = rdn
                .iter()
                .map(|(oid, tag, bytes)| AttributeTypeAndValue {
                    oid: ObjectIdentifier::new_unwrap(oid),
                    value: Any::new(*tag, bytes.to_vec()).unwrap(),
                })
                .collect();
            seq.push(RelativeDistinguishedName::try_from(atvs).unwrap());
        }
        DistinguishedName::from_name(&Name::from_der(&seq.to_der().unwrap()).unwrap())
    }

    fn dn(s: &str) -> DistinguishedName {
        DistinguishedName::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn utf8(s: &str) -> &[u8] {
        s.as_bytes()
    }

    #[test]
    fn non_ascii_values_match_escaped_as_openssl_prints_them_or_raw() {
        let cert = name(&[
            &[(O, Tag::Utf8String, utf8("中国银行"))],
            &[(CN, Tag::Utf8String, utf8("bank-cn"))],
        ]);
        let openssl = dn("CN=bank-cn,O=\\E4\\B8\\AD\\E5\\9B\\BD\\E9\\93\\B6\\E8\\A1\\8C");
        let lower_hex = dn("CN=bank-cn,O=\\e4\\b8\\ad\\e5\\9b\\bd\\e9\\93\\b6\\e8\\a1\\8c");
        let raw = dn("CN=bank-cn,O=中国银行");
        assert_eq!(openssl, cert);
        assert_eq!(lower_hex, cert);
        assert_eq!(raw, cert);
        // Printed as written, not with doubled escapes; the certificate's
        // own name in UTF-8.
        assert_eq!(
            openssl.quoted(),
            r#""CN=bank-cn,O=\E4\B8\AD\E5\9B\BD\E9\93\B6\E8\A1\8C""#
        );
        assert_eq!(cert.to_string(), "CN=bank-cn,O=中国银行");
        // Another bank is another name.
        assert_ne!(dn("CN=bank-cn,O=中国工商银行"), cert);
        assert_ne!(dn("CN=bank-cn,O=\\E4\\B8\\AD\\E5\\9B\\BD"), cert);
    }

    #[test]
    fn email_address_has_one_meaning_under_every_spelling() {
        let cert = name(&[
            &[(O, Tag::Utf8String, utf8("Bank E"))],
            &[(CN, Tag::Utf8String, utf8("bank-e"))],
            &[(EMAIL, Tag::Ia5String, utf8("ops@bank-e.cn"))],
        ]);
        for written in [
            "emailAddress=ops@bank-e.cn,CN=bank-e,O=Bank E",
            "EMAIL=ops@bank-e.cn,CN=bank-e,O=Bank E",
            "E=ops@bank-e.cn,CN=bank-e,O=Bank E",
            "emailaddress=ops@bank-e.cn,cn=bank-e,o=Bank E",
            "1.2.840.113549.1.9.1=ops@bank-e.cn,2.5.4.3=bank-e,2.5.4.10=Bank E",
        ] {
            assert_eq!(dn(written), cert, "{written}");
        }
        assert_eq!(
            cert.to_string(),
            "emailAddress=ops@bank-e.cn,CN=bank-e,O=Bank E"
        );
        assert_ne!(dn("emailAddress=ops@bank-f.cn,CN=bank-e,O=Bank E"), cert);
    }

    #[test]
    fn a_multi_valued_rdn_is_a_set() {
        let cert = name(&[
            &[(O, Tag::Utf8String, utf8("Bank M"))],
            &[
                (CN, Tag::Utf8String, utf8("bank-m")),
                (UID, Tag::Utf8String, utf8("42")),
            ],
        ]);
        assert_eq!(dn("UID=42+CN=bank-m,O=Bank M"), cert);
        assert_eq!(dn("CN=bank-m+UID=42,O=Bank M"), cert);
        assert_eq!(dn("cn = bank-m + uid = 42 , o = Bank M"), cert);
        // The same attributes as two RDNs are another name, as is a part.
        assert_ne!(dn("UID=42,CN=bank-m,O=Bank M"), cert);
        assert_ne!(dn("CN=bank-m,O=Bank M"), cert);
        assert_ne!(dn("UID=43+CN=bank-m,O=Bank M"), cert);
    }

    #[test]
    fn escapes_are_undone_before_comparing() {
        let cert = name(&[
            &[(O, Tag::PrintableString, utf8("Bank, Ltd"))],
            &[(CN, Tag::Utf8String, utf8("a+b=\"c\"\\d;<e>"))],
        ]);
        assert_eq!(dn(r#"CN=a\+b=\"c\"\\d\;\<e\>,O=Bank\, Ltd"#), cert);
        assert_eq!(dn(r"CN=a\2Bb\3D\22c\22\5Cd\3B\3Ce\3E,O=Bank\2C Ltd"), cert);
        // The printed form reads back as the same name.
        assert_eq!(dn(&cert.to_string()), cert);
        // An escaped backslash before a separator ends the value.
        let two = dn(r"CN=x\\,O=y");
        assert_eq!(
            two,
            name(&[
                &[(O, Tag::Utf8String, utf8("y"))],
                &[(CN, Tag::Utf8String, utf8("x\\"))]
            ])
        );
        // An unescaped comma splits the RDN.
        assert!(DistinguishedName::parse("CN=x,O=Bank, Ltd").is_err());
        // A leading '#' or space escaped.
        let hash = name(&[&[(CN, Tag::Utf8String, utf8("#1"))]]);
        assert_eq!(dn(r"CN=\#1"), hash);
        assert_eq!(hash.to_string(), r"CN=\#1");
    }

    #[test]
    fn values_compare_exactly_but_for_surrounding_white_space_and_string_type() {
        let cert = name(&[
            &[(O, Tag::Utf8String, utf8(" Bank A "))],
            &[(CN, Tag::PrintableString, utf8("bank-a"))],
        ]);
        assert_eq!(dn("CN=bank-a,O=Bank A"), cert);
        assert_eq!(dn(r"CN=bank-a ,O=\ Bank A\ "), cert);
        // Shown as written, the escaped final space kept.
        assert_eq!(
            dn(" CN=bank-a ,O=\\ Bank A\\  ").to_string(),
            r"CN=bank-a ,O=\ Bank A\ "
        );
        // Case, inner spaces and RDN order count.
        assert_ne!(dn("CN=Bank-A,O=Bank A"), cert);
        assert_ne!(dn("CN=bank-a,O=Bank  A"), cert);
        assert_ne!(dn("O=Bank A,CN=bank-a"), cert);
        // A name's types: BMPString (UTF-16) and TeletexString (Latin-1)
        // are text too.
        let bmp: Vec<u8> = "中国"
            .encode_utf16()
            .flat_map(|u| u.to_be_bytes())
            .collect();
        assert_eq!(
            name(&[&[(O, Tag::BmpString, &bmp)]]),
            dn(r"O=\E4\B8\AD\E5\9B\BD")
        );
        assert_eq!(
            name(&[&[(O, Tag::TeletexString, b"Caf\xe9")]]),
            dn("O=Café")
        );
    }

    #[test]
    fn a_hex_value_is_the_same_ber_value() {
        let cert = name(&[&[("1.2.3.4", Tag::Utf8String, utf8("abc"))]]);
        assert_eq!(dn("1.2.3.4=#0C03616263"), cert);
        // The same text in another string type is the same value.
        assert_eq!(dn("1.2.3.4=#1303616263"), cert);
        assert_eq!(cert.to_string(), "1.2.3.4=abc");
        // A value that is no string matches only its own encoding.
        let int = name(&[&[("1.2.3.4", Tag::Integer, &[5])]]);
        assert_eq!(int.to_string(), "1.2.3.4=#020105");
        assert_eq!(dn("1.2.3.4=#020105"), int);
        assert_ne!(dn("1.2.3.4=5"), int);
    }

    #[test]
    fn what_is_not_a_name_is_an_error_saying_why() {
        for (written, why) in [
            ("", "empty"),
            ("  ", "empty"),
            ("bank-a", "has no '='"),
            ("CN=a,bank", "has no '='"),
            ("CN=a,", "ends with ','"),
            ("CN=a+", "ends with ','"),
            ("=a", "attribute type is missing"),
            ("XX=a", "unknown attribute type \"XX\""),
            ("commonName=a", "unknown attribute type"),
            ("1.2.x=a", "not a dotted OID"),
            (r"CN=a\", "lone \\"),
            (r"CN=a\q", "\\q is no escape"),
            (r"CN=a\4", "second hex digit"),
            (r"CN=a\4G", "second hex digit"),
            (r"O=\E4\B8", "do not form UTF-8"),
            (r#"CN=say "hi""#, "\" must be escaped"),
            ("CN=a;O=b", "; must be escaped"),
            ("CN=#0C0", "hex of one DER value"),
            ("CN=#zz", "hex of one DER value"),
            ("CN=#", "hex of one DER value"),
            (r"O\x=a", r#"unknown attribute type "O\x""#),
            ("CN=a+CN=a", "same attribute twice"),
        ] {
            let e = DistinguishedName::parse(written).expect_err(written);
            assert!(e.to_string().contains(why), "{written}: {e}");
        }
    }

    #[test]
    fn names_equal_by_meaning_hash_alike() {
        use std::collections::HashSet;
        let set: HashSet<DistinguishedName> =
            [dn("UID=42+CN=m,O=\\E4\\B8\\AD"), dn("cn=m + uid=42, o=中")].into();
        assert_eq!(set.len(), 1);
    }
}
