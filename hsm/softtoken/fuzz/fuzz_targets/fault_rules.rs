#![no_main]
//! Fault-injection rules (environment variable or watched file).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = svs_softtoken::faults::FaultPlan::parse(text);
    }
});
