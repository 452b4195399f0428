//! Small values kept on the token as private `CKO_DATA` objects, found by
//! label: svsd's audit anchor (the trail's last checkpointed head, which
//! shows a trail deleted or rolled back while the token kept its state).
//!
//! Replacing writes the new object before destroying the old ones, so a
//! crash in between leaves two values and never none; readers get all of
//! them and pick. That also avoids `C_SetAttributeValue` on `CKA_VALUE`,
//! which some HSMs refuse for data objects.

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use crate::error::Result;

/// Ours only: private (a public object of the same label, which anyone
/// can create without the PIN, must not stand in for it) and of
/// application "svs".
fn find(session: &Session, label: &str) -> Result<Vec<ObjectHandle>> {
    Ok(session.find_objects(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Application(APPLICATION.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
    ])?)
}

const APPLICATION: &[u8] = b"svs";

/// The values of the token's data objects labelled `label` (usually one;
/// two after a crash during [`replace`]). Needs a logged-in session: the
/// objects are private.
pub fn read(session: &Session, label: &str) -> Result<Vec<Vec<u8>>> {
    let mut tries = 0;
    loop {
        tries += 1;
        let mut values = Vec::new();
        let mut gone = false;
        for handle in find(session, label)? {
            match session.get_attributes(handle, &[AttributeType::Value]) {
                // Destroyed since it was found, by a replacement on another
                // session, whose new value this search may have missed.
                Err(CryptokiError::Pkcs11(RvError::ObjectHandleInvalid, _)) if tries < 3 => {
                    gone = true;
                    break;
                }
                r => values.extend(r?.into_iter().filter_map(|a| match a {
                    Attribute::Value(v) => Some(v),
                    _ => None,
                })),
            }
        }
        if !gone {
            return Ok(values);
        }
    }
}

/// Makes `value` the only data object labelled `label`: a private,
/// non-copyable token object of application "svs".
pub fn replace(session: &Session, label: &str, value: &[u8]) -> Result<()> {
    let old = find(session, label)?;
    session.create_object(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Application(APPLICATION.to_vec()),
        Attribute::Value(value.to_vec()),
    ])?;
    for handle in old {
        match session.destroy_object(handle) {
            // Destroyed already by a replacement on another session (another
            // svsd's, or svs-provision's reset): the goal, none of the values
            // found left, is met either way.
            Err(CryptokiError::Pkcs11(RvError::ObjectHandleInvalid, _)) => {}
            r => r?,
        }
    }
    Ok(())
}

/// Destroys the data objects labelled `label`; returns how many there were.
pub fn remove(session: &Session, label: &str) -> Result<usize> {
    let found = find(session, label)?;
    for handle in &found {
        session.destroy_object(*handle)?;
    }
    Ok(found.len())
}
