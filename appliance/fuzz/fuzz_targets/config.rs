#![no_main]
//! svsd's configuration and entities files: any text is a configuration or
//! a list of errors.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    svs_appliance::fuzzing::config_text(data);
});
