//! A tour of the soft token as any PKCS#11 application sees it: a
//! throw-away store, a token with SO and user PINs, an SM2 key generated
//! inside the token, a signature over a message, and the files and OpenSSL
//! command that check that signature independently.
//!
//! `cargo run -p svs-softtoken --example demo [DIR]` (default DIR:
//! target/softtoken-demo).

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::vendor_defined::VendorDefinedMechanism;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use std::path::PathBuf;
use svs_softtoken::vendor::{CKK_SM2, CKM_SM2_KEY_PAIR_GEN, CKM_SM3_SM2_Z_DER};

fn pem(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let body: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        body.join("\n")
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/softtoken-demo"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    let conf = dir.join("softtoken.toml");
    std::fs::write(
        &conf,
        format!(
            "store_dir = \"{}\"\nslots = 2\n",
            dir.join("store").display()
        ),
    )?;
    svs_softtoken::set_config_path(Some(conf.clone()));

    let pkcs11 = Pkcs11::new_from_self()?;
    pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
    let info = pkcs11.get_library_info()?;
    println!(
        "module: {} {}",
        info.manufacturer_id(),
        info.library_description()
    );
    let slot = pkcs11.get_all_slots()?[0];
    let so_pin = AuthPin::new("demo-so-pin".into());
    let user_pin = AuthPin::new("demo-user-pin".into());
    pkcs11.init_token(slot, &so_pin, "svs-demo")?;
    let session = pkcs11.open_rw_session(slot)?;
    session.login(UserType::So, Some(&so_pin))?;
    session.init_pin(&user_pin)?;
    session.logout()?;
    session.login(UserType::User, Some(&user_pin))?;
    println!(
        "token 'svs-demo' initialised in {}",
        dir.join("store").display()
    );

    let sm2 = KeyType::new_vendor_defined(CKK_SM2)?;
    let (public, private) = session.generate_key_pair(
        &Mechanism::VendorDefined(VendorDefinedMechanism::new::<()>(
            MechanismType::new_vendor_defined(CKM_SM2_KEY_PAIR_GEN)?,
            None,
        )),
        &[
            Attribute::Token(true),
            Attribute::KeyType(sm2),
            Attribute::Label(b"demo".to_vec()),
            Attribute::Id(vec![1]),
        ],
        &[
            Attribute::Token(true),
            Attribute::KeyType(sm2),
            Attribute::Label(b"demo".to_vec()),
            Attribute::Id(vec![1]),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
        ],
    )?;
    let spki = match session
        .get_attributes(public, &[AttributeType::PublicKeyInfo])?
        .pop()
    {
        Some(Attribute::PublicKeyInfo(v)) => v,
        _ => return Err("token returned no CKA_PUBLIC_KEY_INFO".into()),
    };
    println!("SM2 key 'demo' generated inside the token (non-extractable)");

    let message = b"SVS demo: sign with SM3withSM2 and the default ID";
    let mechanism = Mechanism::VendorDefined(VendorDefinedMechanism::new::<()>(
        MechanismType::new_vendor_defined(CKM_SM3_SM2_Z_DER)?,
        None,
    ));
    let signature = session.sign(&mechanism, private, message)?;
    session.verify(&mechanism, public, message, &signature)?;
    std::fs::write(dir.join("pub.pem"), pem("PUBLIC KEY", &spki))?;
    std::fs::write(dir.join("msg.bin"), message)?;
    std::fs::write(dir.join("sig.der"), &signature)?;
    println!("signed with mechanism 0x{CKM_SM3_SM2_Z_DER:08X}; the token verified it too");
    println!("\ncheck it with OpenSSL:");
    println!(
        "  openssl pkeyutl -verify -pubin -inkey {d}/pub.pem -rawin -in {d}/msg.bin \
         -sigfile {d}/sig.der -digest sm3 -pkeyopt distid:1234567812345678",
        d = dir.display()
    );
    println!("\nlook at it with OpenSC:");
    println!(
        "  SVS_SOFTTOKEN_CONF={} pkcs11-tool --module target/debug/libsvs_softtoken.so -O -T",
        conf.display()
    );
    Ok(())
}
