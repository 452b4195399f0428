#![no_main]
//! Signatures (DER and raw) and public points handed to C_Verify and
//! C_CreateObject.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    svs_softtoken::fuzzing::signature_and_point(data);
});
