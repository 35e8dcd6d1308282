//! The account directory from the configuration: the `accounts`, `postmaster`, `catch_all`,
//! `subaddress_separator` and `address_literals` keys, with the secret files they name, checked with
//! errors that name the key at fault. `accounts` itself knows nothing of the configuration file.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::{AccountConfig, Config, ConfigError};
use crate::accounts::{self, Account, Directory};

/// Whether `password_hash_file`s are read while loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretFiles {
    Read,
    /// Only check that the paths are absolute: for build-time checks, where the secrets are absent.
    /// Such accounts cannot log in.
    Skip,
}

impl Directory {
    /// Builds the directory from the `accounts`, `postmaster`, `catch_all` and `subaddress_separator`
    /// keys, reading `password_hash_file`s. `domains` must already be normalised
    /// ([`accounts::normalize_domain`]).
    pub fn from_config(
        config: &Config,
        domains: &BTreeSet<String>,
        secrets: SecretFiles,
    ) -> Result<Directory, ConfigError> {
        let primary_domain = config
            .domains
            .first()
            .and_then(|d| accounts::normalize_domain(d))
            .unwrap_or_default();
        let mut dir = Directory::new(
            domains.clone(),
            primary_domain,
            config.address_literals.clone(),
        );
        let mut account_of = HashMap::new();
        for (address, cfg) in &config.accounts {
            let key = format!("accounts.\"{address}\"");
            let (local, domain) = accounts::split_config_address(address, domains)
                .map_err(|m| ConfigError::invalid(&key, m))?;
            if dir.account(&format!("{local}@{domain}")).is_some() {
                return Err(ConfigError::invalid(
                    &key,
                    "the same account is listed twice (addresses are case-insensitive)",
                ));
            }
            let password_hash = load_hash(cfg, &key, secrets)?;
            let apop_secret = load_apop_secret(cfg, &key, secrets)?;
            let account = dir
                .add_account(Account::new(local, domain, password_hash, apop_secret))
                .expect("checked above: not an account yet");
            account_of.insert(address.as_str(), account);
        }
        for (address, cfg) in &config.accounts {
            let account = &account_of[address.as_str()];
            for (i, alias) in cfg.aliases.iter().enumerate() {
                let key = format!("accounts.\"{address}\".aliases[{i}]");
                let (local, domain) = accounts::split_config_address(alias, domains)
                    .map_err(|m| ConfigError::invalid(&key, m))?;
                let alias = format!("{local}@{domain}");
                if !dir.add_alias(alias.clone(), account) {
                    return Err(ConfigError::invalid(
                        key,
                        format!("{alias} is an account of its own"),
                    ));
                }
            }
        }
        // RFC 5321 §4.5.1: postmaster@ must be accepted for every local domain. By default the first
        // account receives it.
        let postmaster = match &config.postmaster {
            Some(address) => Some(account_named(&dir, address, "postmaster")?),
            None => dir.accounts().next().cloned(),
        };
        dir.set_postmaster(postmaster);
        for (domain, address) in &config.catch_all {
            let key = format!("catch_all.\"{domain}\"");
            let normal = accounts::normalize_domain(domain)
                .filter(|d| domains.contains(d))
                .ok_or_else(|| {
                    ConfigError::invalid(
                        &key,
                        format!("{domain} is not one of the local `domains`"),
                    )
                })?;
            let account = account_named(&dir, address, &key)?;
            dir.set_catch_all(normal, account);
        }
        dir.set_subaddress_separator(subaddress_separator(&config.subaddress_separator)?);
        Ok(dir)
    }
}

fn account_named(dir: &Directory, address: &str, key: &str) -> Result<Arc<Account>, ConfigError> {
    dir.account_named(address)
        .ok_or_else(|| ConfigError::invalid(key, format!("{address} is not an account")))
}

fn subaddress_separator(text: &str) -> Result<Option<char>, ConfigError> {
    if text.is_empty() {
        return Ok(None);
    }
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if c.is_ascii_punctuation() && c != '@' && c != '.' && c != '"' => {
            Ok(Some(c))
        }
        _ => Err(ConfigError::invalid(
            "subaddress_separator",
            "one ASCII punctuation character other than @ . \" (or \"\" to turn sub-addressing off)",
        )),
    }
}

fn load_apop_secret(
    cfg: &AccountConfig,
    key: &str,
    secrets: SecretFiles,
) -> Result<Option<String>, ConfigError> {
    let Some(path) = &cfg.apop_secret_file else {
        return Ok(None);
    };
    let key = format!("{key}.apop_secret_file");
    if secrets == SecretFiles::Skip {
        if !path.is_absolute() {
            return Err(ConfigError::invalid(
                key,
                format!("{} is not an absolute path", path.display()),
            ));
        }
        return Ok(Some(String::new()));
    }
    let secret = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::invalid(&key, format!("cannot read {}: {e}", path.display())))?;
    let secret = secret.trim_end_matches(['\r', '\n']).to_string();
    if secret.is_empty() {
        return Err(ConfigError::invalid(key, "the file is empty"));
    }
    Ok(Some(secret))
}

fn load_hash(cfg: &AccountConfig, key: &str, secrets: SecretFiles) -> Result<String, ConfigError> {
    let hash = match (&cfg.password_hash, &cfg.password_hash_file) {
        (Some(h), None) => h.trim().to_string(),
        (None, Some(path)) if secrets == SecretFiles::Skip => {
            if !path.is_absolute() {
                return Err(ConfigError::invalid(
                    format!("{key}.password_hash_file"),
                    format!("{} is not an absolute path", path.display()),
                ));
            }
            return Ok(accounts::dummy_hash().to_string());
        }
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| {
                ConfigError::invalid(
                    format!("{key}.password_hash_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?
            .trim()
            .to_string(),
        (Some(_), Some(_)) => {
            return Err(ConfigError::invalid(
                key,
                "set either password_hash or password_hash_file, not both",
            ));
        }
        (None, None) => {
            return Err(ConfigError::invalid(
                key,
                "needs password_hash or password_hash_file (make one with `rustmail hash-password`)",
            ));
        }
    };
    accounts::check_hash(&hash).map_err(|m| {
        let which = if cfg.password_hash.is_some() {
            "password_hash"
        } else {
            "password_hash_file"
        };
        ConfigError::invalid(format!("{key}.{which}"), m)
    })?;
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::Route;
    use std::collections::BTreeMap;
    use std::sync::OnceLock;

    fn domains() -> BTreeSet<String> {
        ["example.org".to_string(), "xn--mnchen-3ya.de".to_string()].into()
    }

    /// A directory from these accounts, with the rest of the config as `tweak` leaves it.
    fn build(
        accounts: BTreeMap<String, AccountConfig>,
        secrets: SecretFiles,
        tweak: impl FnOnce(&mut Config),
    ) -> Result<Directory, ConfigError> {
        let mut config = Config {
            accounts,
            ..Config::default()
        };
        tweak(&mut config);
        Directory::from_config(&config, &domains(), secrets)
    }

    fn hash() -> String {
        static HASH: OnceLock<String> = OnceLock::new();
        HASH.get_or_init(|| accounts::hash_password(b"secret"))
            .clone()
    }

    fn account(hash: &str, aliases: &[&str]) -> AccountConfig {
        AccountConfig {
            password_hash: Some(hash.into()),
            aliases: aliases.iter().map(|s| s.to_string()).collect(),
            ..AccountConfig::default()
        }
    }

    fn directory_with(tweak: impl FnOnce(&mut Config)) -> Directory {
        let h = hash();
        let accounts = BTreeMap::from([
            (
                "Alice@Example.org".to_string(),
                account(&h, &["team@example.org"]),
            ),
            (
                "bob@example.org".to_string(),
                account(&h, &["team@example.org"]),
            ),
        ]);
        build(accounts, SecretFiles::Read, tweak).unwrap()
    }

    fn routed(d: &Directory, local: &str, domain: &str) -> Vec<String> {
        match d.route(local, domain) {
            Route::Local(a) => a.iter().map(|a| a.address.clone()).collect(),
            other => panic!("{local}@{domain}: {other:?}"),
        }
    }

    fn key(r: Result<Directory, ConfigError>) -> String {
        match r {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn routing_keys_take_effect() {
        let d = directory_with(|_| {});
        assert_eq!(routed(&d, "ALICE", "EXAMPLE.ORG"), ["alice@example.org"]);
        assert_eq!(routed(&d, "team", "example.org").len(), 2);
        assert_eq!(routed(&d, "bob+lists", "example.org"), ["bob@example.org"]);
        assert_eq!(
            routed(&d, "postmaster", "münchen.de"),
            ["alice@example.org"],
            "by default the first account in address order"
        );
        let d = directory_with(|c| c.postmaster = Some("bob@example.org".into()));
        assert_eq!(routed(&d, "postmaster", "example.org"), ["bob@example.org"]);
        let d = directory_with(|c| {
            c.catch_all = BTreeMap::from([("example.org".into(), "bob@example.org".into())])
        });
        assert_eq!(routed(&d, "anything", "example.org"), ["bob@example.org"]);
        let off = directory_with(|c| c.subaddress_separator = String::new());
        assert_eq!(off.route("bob+lists", "example.org"), Route::Unknown);
        let dash = directory_with(|c| c.subaddress_separator = "-".into());
        assert_eq!(
            routed(&dash, "bob-lists", "example.org"),
            ["bob@example.org"]
        );
        let literal = directory_with(|c| {
            c.domains = vec!["example.org".into()];
            c.address_literals = vec!["192.0.2.10".parse().unwrap()];
        });
        assert!(matches!(
            literal.route_literal("alice", "[192.0.2.10]"),
            Route::Local(_)
        ));
        assert_eq!(literal.primary_domain(), "example.org");
    }

    #[test]
    fn routing_keys_are_validated() {
        let accounts = || BTreeMap::from([("a@example.org".to_string(), account(&hash(), &[]))]);
        assert_eq!(
            key(build(accounts(), SecretFiles::Read, |c| c.postmaster =
                Some("x@example.org".into()))),
            "postmaster"
        );
        assert_eq!(
            key(build(accounts(), SecretFiles::Read, |c| {
                c.catch_all = BTreeMap::from([("other.org".into(), "a@example.org".into())])
            })),
            "catch_all.\"other.org\""
        );
        assert_eq!(
            key(build(accounts(), SecretFiles::Read, |c| c
                .subaddress_separator =
                "ab".into())),
            "subaddress_separator"
        );
    }

    #[test]
    fn duplicate_accounts_and_aliases_that_are_accounts_are_refused() {
        let h = hash();
        let twice = BTreeMap::from([
            ("A@example.org".to_string(), account(&h, &[])),
            ("a@example.org".to_string(), account(&h, &[])),
        ]);
        assert_eq!(
            key(build(twice, SecretFiles::Read, |_| {})),
            "accounts.\"a@example.org\""
        );
        let shadow = BTreeMap::from([
            ("a@example.org".to_string(), account(&h, &[])),
            ("b@example.org".to_string(), account(&h, &["A@example.org"])),
        ]);
        assert_eq!(
            key(build(shadow, SecretFiles::Read, |_| {})),
            "accounts.\"b@example.org\".aliases[0]"
        );
    }

    #[test]
    fn utf8_local_parts_and_idn_domains() {
        let accounts = BTreeMap::from([("José@München.de".to_string(), account(&hash(), &[]))]);
        let d = build(accounts, SecretFiles::Read, |_| {}).unwrap();
        assert_eq!(
            routed(&d, "JOSÉ", "xn--mnchen-3ya.de"),
            ["josé@xn--mnchen-3ya.de"]
        );
        assert_eq!(routed(&d, "josé", "MÜNCHEN.de"), ["josé@xn--mnchen-3ya.de"]);
    }

    #[test]
    fn apop_secret_file_is_read_without_its_line_end() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "tanstaaf\n").unwrap();
        let mut with_apop = account(&hash(), &[]);
        with_apop.apop_secret_file = Some(secret.clone());
        let accounts = BTreeMap::from([
            ("mrose@example.org".to_string(), with_apop.clone()),
            ("plain@example.org".to_string(), account(&hash(), &[])),
        ]);
        let d = build(accounts, SecretFiles::Read, |_| {}).unwrap();
        assert!(d.offers_apop());
        // The example of RFC 1939 §7.
        let banner = "<1896.697170952@dbc.mtview.ca.us>";
        let digest = "c4c9334bac560ecc979e58001b3e22fb";
        assert!(d.verify_apop("mrose@example.org", banner, digest).is_some());
        assert!(d.verify_apop("plain@example.org", banner, digest).is_none());
        std::fs::write(&secret, "\n").unwrap();
        let accounts = BTreeMap::from([("mrose@example.org".to_string(), with_apop)]);
        assert_eq!(
            key(build(accounts, SecretFiles::Read, |_| {})),
            "accounts.\"mrose@example.org\".apop_secret_file"
        );
    }

    #[test]
    fn bad_hash_names_its_key() {
        let accounts = BTreeMap::from([("a@example.org".to_string(), account("plain", &[]))]);
        let err = build(accounts.clone(), SecretFiles::Read, |_| {}).unwrap_err();
        assert!(
            err.to_string()
                .contains("accounts.\"a@example.org\".password_hash"),
            "{err}"
        );
    }

    #[test]
    fn account_outside_local_domains_refused() {
        let h = hash();
        let accounts = BTreeMap::from([("a@elsewhere.org".to_string(), account(&h, &[]))]);
        assert!(build(accounts.clone(), SecretFiles::Read, |_| {}).is_err());
    }

    #[test]
    fn unsafe_local_part_refused() {
        let h = hash();
        for bad in [
            "../x@example.org",
            ".a@example.org",
            "a/b@example.org",
            "@example.org",
        ] {
            let accounts = BTreeMap::from([(bad.to_string(), account(&h, &[]))]);
            assert!(
                build(accounts.clone(), SecretFiles::Read, |_| {}).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn skipped_secret_files_must_still_be_absolute() {
        let file = |p: &str| AccountConfig {
            password_hash_file: Some(p.into()),
            ..AccountConfig::default()
        };
        let ok = BTreeMap::from([("a@example.org".to_string(), file("/run/credentials/x/a"))]);
        let d = build(ok.clone(), SecretFiles::Skip, |_| {}).unwrap();
        assert!(
            d.verify("a@example.org", b"").is_none(),
            "a skipped secret never logs in"
        );
        assert!(
            build(ok.clone(), SecretFiles::Read, |_| {}).is_err(),
            "absent file"
        );
        let relative = BTreeMap::from([("a@example.org".to_string(), file("a.hash"))]);
        assert!(build(relative.clone(), SecretFiles::Skip, |_| {}).is_err());
    }
}
