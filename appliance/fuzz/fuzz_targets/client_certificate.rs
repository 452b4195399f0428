#![no_main]
//! A client certificate as the TLS handshake hands it over.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    svs_appliance::fuzzing::client_certificate(data);
});
