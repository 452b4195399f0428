#![no_main]
//! A request body of /v1/sign, /v1/verify or their batch forms: any bytes
//! are a request or a clear error.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    svs_appliance::fuzzing::api_body(data);
});
