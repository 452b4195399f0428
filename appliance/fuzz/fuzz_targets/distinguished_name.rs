#![no_main]
//! An entity's subject or issuer as written in the configuration: parsed,
//! and what svsd writes of it reads back the same.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    svs_appliance::fuzzing::distinguished_name(data);
});
