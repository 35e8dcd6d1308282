//! The config loader (src/config): TOML through figment over the defaults, as `rustmail::config::load`
//! does, then validation by `Settings::from_config_with` (secret files not read, so the fuzzer never
//! opens paths it made up). Properties: no panic; a Config that loads writes back to TOML and loads
//! again to the same Config (what `check-config` accepts is what the server runs); validation is
//! deterministic.
#![no_main]

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use libfuzzer_sys::fuzz_target;
use rustmail::config::{Config, SecretFiles, Settings};

fn load(text: &str) -> Result<Config, figment::Error> {
    Figment::from(Serialized::defaults(Config::default()))
        .merge(Toml::string(text))
        .extract()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = load(text) else {
        return;
    };
    let written = toml::to_string(&config).expect("a loaded Config writes back to TOML");
    let again = load(&written).expect("the written TOML loads");
    assert_eq!(
        again, config,
        "TOML round trip changed the config:\n{written}"
    );
    let first =
        Settings::from_config_with(config.clone(), SecretFiles::Skip).map_err(|e| e.to_string());
    let second = Settings::from_config_with(config, SecretFiles::Skip).map_err(|e| e.to_string());
    assert_eq!(first.is_ok(), second.is_ok());
    if let (Err(a), Err(b)) = (&first, &second) {
        assert_eq!(a, b);
    }
});
