#![no_main]
//! C_CreateObject / C_GenerateKeyPair / C_SetAttributeValue templates as a
//! caller could pass them, including certificates to parse.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    svs_softtoken::fuzzing::object_template(data);
});
