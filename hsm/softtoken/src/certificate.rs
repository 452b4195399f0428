//! The few fields of an X.509 certificate the token files under attributes.

use crate::error::{Error, Result};
use der::{Decode, Encode};
use x509_cert::Certificate;

/// DER encodings of the fields PKCS#11 mirrors as attributes.
#[derive(Debug)]
pub struct CertificateFields {
    pub subject: Vec<u8>,
    pub issuer: Vec<u8>,
    pub serial: Vec<u8>,
}

/// Parses a DER certificate; anything that is not one is
/// `CKR_ATTRIBUTE_VALUE_INVALID`.
pub fn parse(der: &[u8]) -> Result<CertificateFields> {
    let cert = Certificate::from_der(der).map_err(|_| Error::AttributeValueInvalid)?;
    let tbs = cert.tbs_certificate();
    let enc = |r: der::Result<Vec<u8>>| r.map_err(|_| Error::AttributeValueInvalid);
    Ok(CertificateFields {
        subject: enc(tbs.subject().to_der())?,
        issuer: enc(tbs.issuer().to_der())?,
        serial: enc(tbs.serial_number().to_der())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused() {
        assert_eq!(
            parse(b"not a cert").unwrap_err(),
            Error::AttributeValueInvalid
        );
        assert_eq!(parse(&[]).unwrap_err(), Error::AttributeValueInvalid);
    }
}
