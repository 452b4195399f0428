//! svsd, the SVS signing daemon, as a library: everything but argument
//! parsing lives here so it can be tested without a process or an HSM.
//!
//! See docs/svsd.md for the configuration, the API and the audit format.

pub mod anomaly;
pub mod api;
pub mod app;
pub mod audit;
pub mod backend;
pub mod config;
pub mod daemon;
pub mod dev;
pub mod dn;
pub mod error;
pub mod fuzzing;
pub mod metrics;
pub mod policy;
pub mod refusals;
pub mod reload;
pub mod server;
pub mod source_share;
pub mod tls;

pub use error::SvsError;
