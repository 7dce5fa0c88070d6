//! The node config parser on arbitrary text: it returns a config or an error, never panics, and
//! an accepted config names only valid things (checked by its own validation on the way in).
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use zt_daemon::config::NodeConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = NodeConfig::parse(Path::new("fuzz.toml"), text) {
        // Every error names the file it is about.
        assert!(e.to_string().contains("fuzz.toml"), "{e}");
    }
});
