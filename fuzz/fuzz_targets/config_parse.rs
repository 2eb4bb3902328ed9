//! Config parsing: `Config::parse` on arbitrary text, as if read from a
//! directory that holds a valid `ca.crt` (so valid configs get past
//! certificate loading and reach every validation step).
//!
//! Oracle: no panic; every error names the config file.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sqlgate::Config;

/// A test CA certificate (EC P-256, self-signed, not used for anything else).
const CA_PEM: &str = include_str!("ca.pem");

fn config_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sqlgate-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz config directory");
        std::fs::write(dir.join("ca.crt"), CA_PEM).expect("write ca.crt");
        dir.join("sqlgate.toml")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Absolute paths would make the target read arbitrary files (devices
    // included); relative ones resolve inside the fuzz directory.
    if text.contains("/dev") || text.contains("/proc") || text.contains("/sys") {
        return;
    }
    let path = config_path();
    match Config::parse(text, path) {
        Ok(config) => {
            let _ = config.describe();
            let _ = config.warnings();
        }
        Err(e) => assert!(e.to_string().contains("sqlgate.toml"), "{e}"),
    }
});
