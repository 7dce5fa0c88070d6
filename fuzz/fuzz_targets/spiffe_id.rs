//! The SPIFFE ID parser: whatever it accepts prints back to an ID that parses to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use zt_daemon::identity::spiffe::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = text.parse::<SpiffeId>() {
        let again: SpiffeId = id
            .to_string()
            .parse()
            .unwrap_or_else(|e| panic!("{id} does not parse back: {e}"));
        assert_eq!(id, again);
        let _ = id.kubernetes_namespace();
    }
});
