//! `svs-softtoken`: an SM2-capable PKCS#11 module (docs/softtoken.md).
//!
//! Built as `libsvs_softtoken.so` for any PKCS#11 consumer, and as an rlib
//! that programs link in as their embedded token (they then open it with
//! `cryptoki::context::Pkcs11::new_from_self`).
//!
//! Layers: `abi` (the C boundary, the only unsafe code) → `module` (process
//! state, sessions, one safe function per PKCS#11 call) → `token` (one
//! slot's persisted token and login) → `object`/`mechanism`/`sm2key` (what
//! objects are and what the mechanisms compute) and `store` (disk format,
//! sealing, atomic writes).

mod abi;
mod certificate;
pub mod config;
pub mod error;
pub mod faults;
#[doc(hidden)]
pub mod fuzzing;
mod mechanism;
mod module;
mod object;
mod sm2key;
mod store;
mod token;
pub mod vendor;

pub use abi::{C_GetFunctionList, C_GetInterface, C_GetInterfaceList};
pub use config::{Config, set_config_path};
