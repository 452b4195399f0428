#![no_main]
//! A token file from disk: parsed and turned into objects, or refused.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    svs_softtoken::fuzzing::token_file(data);
});
