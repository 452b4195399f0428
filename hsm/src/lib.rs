//! SVS HSM layer: any PKCS#11 module (or the embedded SM2 soft token),
//! vendor profiles, key discovery, host-side SM2/ECDSA digests, a session
//! pool of worker threads with recovery, and software verification.
//!
//! See docs/hsm.md for the profile table, the recovery classification and
//! the pool's behaviour.

pub mod config;
pub mod data;
pub mod error;
pub mod fair_queue;
pub mod hsm;
pub mod keys;
pub mod pin;
pub mod pool;
pub mod profile;
pub mod selftest;
pub mod signature;
pub mod token;
pub mod uri;

pub use config::HsmConfig;
pub use error::{HsmError, Result, RvClass, RvInfo, rv_info};
pub use fair_queue::Lane;
pub use hsm::{Hsm, KeySet};
pub use keys::KeyInfo;
pub use pin::PinSource;
pub use pool::{
    Health, HealthState, HsmMetrics, NoMetrics, PoolConfig, SessionFactory, SessionPool,
};
pub use profile::{Algorithm, SignatureEncoding, VendorProfile};
pub use token::{ModuleSource, Token, TokenSelector, UserPinState};
pub use uri::Pkcs11Uri;
