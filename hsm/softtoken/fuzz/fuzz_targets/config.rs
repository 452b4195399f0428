#![no_main]
//! The token's TOML configuration: any text is a config or a clear error.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = svs_softtoken::Config::parse(text);
    }
});
