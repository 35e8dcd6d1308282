//! The account directory: local domains, accounts, aliases, the postmaster and catch-all accounts, and
//! the routing of a recipient address to the mailboxes that receive it; also who may send as whom
//! (RFC 6409 §8.1) and the checks of a login against it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::Account;
use super::address::{normalize_domain, split_config_address};
use super::passwords::{check_hash, dummy_hash, verify_password};
use crate::config::{AccountConfig, Config, ConfigError};

/// Where a recipient address goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The domain is not ours: delivering would be relaying.
    NotLocal,
    /// Our domain, but no such account or alias.
    Unknown,
    /// One or more accounts (several when aliases overlap).
    Local(Vec<Arc<Account>>),
}

#[derive(Debug, Clone, Default)]
pub struct Directory {
    domains: BTreeSet<String>,
    accounts: BTreeMap<String, Arc<Account>>,
    /// Every deliverable address (accounts and aliases) → its accounts.
    routes: HashMap<String, Vec<Arc<Account>>>,
    /// Receives `postmaster@` of every local domain that has no such account or alias.
    postmaster: Option<Arc<Account>>,
    /// Local domain → the account that receives mail for its unknown addresses.
    catch_all: HashMap<String, Arc<Account>>,
    /// `user+tag@domain` is delivered to `user@domain` (RFC 5233 sub-addressing).
    subaddress_separator: Option<char>,
    /// The first configured domain: `<postmaster>` and local address literals mean it.
    primary_domain: String,
    /// This server's addresses: `user@[address]` is local.
    address_literals: Vec<std::net::IpAddr>,
}

impl Directory {
    /// Builds the directory from the `accounts`, `postmaster`, `catch_all` and `subaddress_separator`
    /// keys, reading `password_hash_file`s. `domains` must already be normalised ([`normalize_domain`]).
    pub fn from_config(
        config: &Config,
        domains: &BTreeSet<String>,
        secrets: SecretFiles,
    ) -> Result<Directory, ConfigError> {
        let mut dir = Directory {
            domains: domains.clone(),
            primary_domain: config
                .domains
                .first()
                .and_then(|d| normalize_domain(d))
                .unwrap_or_default(),
            address_literals: config.address_literals.clone(),
            ..Directory::default()
        };
        let mut canonical_of = HashMap::new();
        for (address, cfg) in &config.accounts {
            let key = format!("accounts.\"{address}\"");
            let (local, domain) = split_config_address(address, domains)
                .map_err(|m| ConfigError::invalid(&key, m))?;
            let canonical = format!("{local}@{domain}");
            if dir.accounts.contains_key(&canonical) {
                return Err(ConfigError::invalid(
                    &key,
                    "the same account is listed twice (addresses are case-insensitive)",
                ));
            }
            let password_hash = load_hash(cfg, &key, secrets)?;
            let apop_secret = match (&cfg.apop_secret_file, secrets) {
                (None, _) => None,
                (Some(path), SecretFiles::Skip) if path.is_absolute() => Some(String::new()),
                (Some(path), SecretFiles::Skip) => {
                    return Err(ConfigError::invalid(
                        format!("{key}.apop_secret_file"),
                        format!("{} is not an absolute path", path.display()),
                    ));
                }
                (Some(path), SecretFiles::Read) => {
                    let secret = std::fs::read_to_string(path).map_err(|e| {
                        ConfigError::invalid(
                            format!("{key}.apop_secret_file"),
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?;
                    let secret = secret.trim_end_matches(['\r', '\n']).to_string();
                    if secret.is_empty() {
                        return Err(ConfigError::invalid(
                            format!("{key}.apop_secret_file"),
                            "the file is empty",
                        ));
                    }
                    Some(secret)
                }
            };
            let account = Arc::new(Account {
                address: canonical.clone(),
                local,
                domain,
                password_hash,
                apop_secret,
            });
            dir.routes
                .entry(canonical.clone())
                .or_default()
                .push(account.clone());
            dir.accounts.insert(canonical.clone(), account);
            canonical_of.insert(address.as_str(), canonical);
        }
        for (address, cfg) in &config.accounts {
            let account = dir.accounts[&canonical_of[address.as_str()]].clone();
            for (i, alias) in cfg.aliases.iter().enumerate() {
                let key = format!("accounts.\"{address}\".aliases[{i}]");
                let (local, domain) = split_config_address(alias, domains)
                    .map_err(|m| ConfigError::invalid(&key, m))?;
                let alias = format!("{local}@{domain}");
                if dir.accounts.contains_key(&alias) {
                    return Err(ConfigError::invalid(
                        key,
                        format!("{alias} is an account of its own"),
                    ));
                }
                let targets = dir.routes.entry(alias).or_default();
                if !targets.contains(&account) {
                    targets.push(account.clone());
                }
            }
        }
        // RFC 5321 §4.5.1: postmaster@ must be accepted for every local domain. By default the first
        // account receives it.
        dir.postmaster = match &config.postmaster {
            Some(address) => Some(dir.account_named(address, "postmaster")?),
            None => dir.accounts.values().next().cloned(),
        };
        for (domain, address) in &config.catch_all {
            let key = format!("catch_all.\"{domain}\"");
            let normal = normalize_domain(domain)
                .filter(|d| domains.contains(d))
                .ok_or_else(|| {
                    ConfigError::invalid(
                        &key,
                        format!("{domain} is not one of the local `domains`"),
                    )
                })?;
            let account = dir.account_named(address, &key)?;
            dir.catch_all.insert(normal, account);
        }
        dir.subaddress_separator = match config.subaddress_separator.as_str() {
            "" => None,
            sep => {
                let mut chars = sep.chars();
                match (chars.next(), chars.next()) {
                    (Some(c), None)
                        if c.is_ascii_punctuation() && c != '@' && c != '.' && c != '"' =>
                    {
                        Some(c)
                    }
                    _ => {
                        return Err(ConfigError::invalid(
                            "subaddress_separator",
                            "one ASCII punctuation character other than @ . \" (or \"\" to turn sub-addressing off)",
                        ));
                    }
                }
            }
        };
        Ok(dir)
    }

    fn account_named(&self, address: &str, key: &str) -> Result<Arc<Account>, ConfigError> {
        split_config_address(address, &self.domains)
            .ok()
            .and_then(|(local, domain)| self.accounts.get(&format!("{local}@{domain}")))
            .cloned()
            .ok_or_else(|| ConfigError::invalid(key, format!("{address} is not an account")))
    }

    pub fn is_local_domain(&self, domain: &str) -> bool {
        normalize_domain(domain).is_some_and(|d| self.domains.contains(&d))
    }

    pub fn domains(&self) -> impl Iterator<Item = &str> {
        self.domains.iter().map(String::as_str)
    }

    /// The first configured domain.
    pub fn primary_domain(&self) -> &str {
        &self.primary_domain
    }

    /// Routes `local@[literal]` (RFC 5321 §4.1.3, `literal` with its brackets): local, for the primary
    /// domain, only when the address is one of `address_literals`.
    pub fn route_literal(&self, local: &str, literal: &str) -> Route {
        let inner = literal.trim_start_matches('[').trim_end_matches(']');
        let inner = inner
            .get(..5)
            .filter(|p| p.eq_ignore_ascii_case("IPv6:"))
            .map_or(inner, |_| &inner[5..]);
        match inner.parse::<std::net::IpAddr>() {
            Ok(ip) if self.address_literals.contains(&ip) => {
                self.route(local, &self.primary_domain)
            }
            _ => Route::NotLocal,
        }
    }

    /// The account with this (canonical) address.
    pub fn account(&self, address: &str) -> Option<&Arc<Account>> {
        self.accounts.get(address)
    }

    pub fn accounts(&self) -> impl Iterator<Item = &Arc<Account>> {
        self.accounts.values()
    }

    /// Routing, in order: an account or alias; the address without its `+tag`; `postmaster`; the
    /// domain's catch-all.
    pub fn route(&self, local: &str, domain: &str) -> Route {
        let Some(domain) = normalize_domain(domain).filter(|d| self.domains.contains(d)) else {
            return Route::NotLocal;
        };
        let local = local.to_lowercase();
        let lookup = |local: &str| self.routes.get(&format!("{local}@{domain}")).cloned();
        let base = self
            .subaddress_separator
            .and_then(|sep| local.split_once(sep))
            .map(|(base, _)| base)
            .filter(|base| !base.is_empty());
        let found = lookup(&local)
            .or_else(|| base.and_then(lookup))
            .or_else(|| {
                (local == "postmaster")
                    .then(|| self.postmaster.clone().map(|a| vec![a]))
                    .flatten()
            })
            .or_else(|| self.catch_all.get(&domain).map(|a| vec![a.clone()]));
        match found {
            Some(accounts) => Route::Local(accounts),
            None => Route::Unknown,
        }
    }

    /// Whether any account can use APOP (then the POP3 greeting carries a timestamp).
    pub fn offers_apop(&self) -> bool {
        self.accounts.values().any(|a| a.apop_secret.is_some())
    }

    /// Checks an APOP login: `digest` must be the hex MD5 of `banner` followed by the account's
    /// secret. Unknown users and users without a secret cost the same and fail the same way.
    pub fn verify_apop(&self, user: &str, banner: &str, digest: &str) -> Option<Arc<Account>> {
        use md5::{Digest, Md5};
        let account = self.accounts.get(&user.to_lowercase());
        let secret = account.and_then(|a| a.apop_secret.as_deref());
        let expected = Md5::new()
            .chain_update(banner.as_bytes())
            .chain_update(secret.unwrap_or("\0no secret\0").as_bytes())
            .finalize();
        let expected: String = expected.iter().map(|b| format!("{b:02x}")).collect();
        // Constant-time comparison: the digest is compared whole, whatever its first bytes.
        let same = expected.len() == digest.len()
            && expected
                .bytes()
                .zip(digest.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        account.filter(|_| same && secret.is_some()).cloned()
    }

    /// RFC 6409 §8.1: an account may send as its own address, its aliases, and their `+tag` forms;
    /// not as whatever a catch-all or the postmaster fallback would deliver to it.
    pub fn may_send_as(&self, account: &Account, local: &str, domain: &str) -> bool {
        let Some(domain) = normalize_domain(domain).filter(|d| self.domains.contains(d)) else {
            return false;
        };
        let local = local.to_lowercase();
        let targets = |local: &str| self.routes.get(&format!("{local}@{domain}"));
        let owns =
            |accounts: &Vec<Arc<Account>>| accounts.iter().any(|a| a.address == account.address);
        // An address that routes somewhere belongs to whom it routes to; only an address that routes
        // nowhere is read as `base+tag` (so `alice` cannot send as the account `alice+bob`).
        match targets(&local) {
            Some(accounts) => owns(accounts),
            None => self
                .subaddress_separator
                .and_then(|sep| local.split_once(sep))
                .filter(|(base, _)| !base.is_empty())
                .and_then(|(base, _)| targets(base))
                .is_some_and(owns),
        }
    }

    /// Checks a login. Costs one password hash verification whether or not the user exists, so that
    /// timing does not reveal which accounts exist. CPU-heavy: call it off the async runtime.
    pub fn verify(&self, user: &str, password: &[u8]) -> Option<Arc<Account>> {
        let account = self.accounts.get(&user.to_lowercase());
        let hash: &str = match account {
            Some(a) => &a.password_hash,
            None => dummy_hash(),
        };
        let ok = verify_password(hash, password);
        account.filter(|_| ok).cloned()
    }
}

/// Whether `password_hash_file`s are read while loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretFiles {
    Read,
    /// Only check that the paths are absolute: for build-time checks, where the secrets are absent.
    /// Such accounts cannot log in.
    Skip,
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
            return Ok(dummy_hash().to_string());
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
    check_hash(&hash).map_err(|m| {
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
    use crate::accounts::hash_password;
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
        HASH.get_or_init(|| hash_password(b"secret")).clone()
    }
    fn account(hash: &str, aliases: &[&str]) -> AccountConfig {
        AccountConfig {
            password_hash: Some(hash.into()),
            aliases: aliases.iter().map(|s| s.to_string()).collect(),
            ..AccountConfig::default()
        }
    }
    fn directory() -> Directory {
        directory_with(|_| {})
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

    #[test]
    fn routes_are_case_insensitive() {
        let d = directory();
        match d.route("ALICE", "EXAMPLE.ORG") {
            Route::Local(a) => assert_eq!(a[0].address, "alice@example.org"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn alias_reaches_every_account_listing_it() {
        match directory().route("team", "example.org") {
            Route::Local(a) => assert_eq!(a.len(), 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_and_foreign() {
        let d = directory();
        assert_eq!(d.route("carol", "example.org"), Route::Unknown);
        assert_eq!(d.route("alice", "example.com"), Route::NotLocal);
        assert_eq!(d.route("alice", "example.org."), Route::NotLocal);
    }

    #[test]
    fn subaddress_goes_to_the_base_address() {
        let d = directory();
        assert_eq!(routed(&d, "bob+lists", "example.org"), ["bob@example.org"]);
        assert_eq!(routed(&d, "team+x+y", "example.org").len(), 2);
        assert_eq!(d.route("+x", "example.org"), Route::Unknown);
        let off = directory_with(|c| c.subaddress_separator = String::new());
        assert_eq!(off.route("bob+lists", "example.org"), Route::Unknown);
        let dash = directory_with(|c| c.subaddress_separator = "-".into());
        assert_eq!(
            routed(&dash, "bob-lists", "example.org"),
            ["bob@example.org"]
        );
    }

    #[test]
    fn postmaster_is_always_deliverable() {
        assert_eq!(
            routed(&directory(), "PostMaster", "example.org"),
            ["alice@example.org"]
        );
        assert_eq!(
            routed(&directory(), "postmaster", "münchen.de"),
            ["alice@example.org"]
        );
        let d = directory_with(|c| c.postmaster = Some("bob@example.org".into()));
        assert_eq!(routed(&d, "postmaster", "example.org"), ["bob@example.org"]);
    }

    #[test]
    fn catch_all_takes_unknown_addresses_of_its_domain_only() {
        let d = directory_with(|c| {
            c.catch_all = BTreeMap::from([("example.org".into(), "bob@example.org".into())])
        });
        assert_eq!(routed(&d, "anything", "example.org"), ["bob@example.org"]);
        assert_eq!(routed(&d, "alice", "example.org"), ["alice@example.org"]);
        assert_eq!(d.route("anything", "münchen.de"), Route::Unknown);
        assert_eq!(directory().route("anything", "example.org"), Route::Unknown);
    }

    #[test]
    fn routing_keys_are_validated() {
        let accounts = || BTreeMap::from([("a@example.org".to_string(), account(&hash(), &[]))]);
        let key = |r: Result<Directory, ConfigError>| match r {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{other:?}"),
        };
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
    fn may_send_as_own_addresses_aliases_and_tags_only() {
        let d = directory_with(|c| {
            c.catch_all = BTreeMap::from([("example.org".into(), "alice@example.org".into())])
        });
        let alice = d.accounts().find(|a| a.local == "alice").unwrap().clone();
        assert!(d.may_send_as(&alice, "Alice", "example.org"));
        assert!(d.may_send_as(&alice, "team", "EXAMPLE.org"), "alias");
        assert!(
            d.may_send_as(&alice, "alice+news", "example.org"),
            "sub-address"
        );
        assert!(!d.may_send_as(&alice, "bob", "example.org"));
        assert!(
            !d.may_send_as(&alice, "anything", "example.org"),
            "catch-all is not ownership"
        );
        assert!(!d.may_send_as(&alice, "alice", "elsewhere.org"));
    }

    #[test]
    fn address_literals_are_local_only_when_configured() {
        let d = directory();
        assert_eq!(d.route_literal("alice", "[192.0.2.10]"), Route::NotLocal);
        let d = directory_with(|c| {
            c.domains = vec!["example.org".into(), "xn--mnchen-3ya.de".into()];
            c.address_literals = vec![
                "192.0.2.10".parse().unwrap(),
                "2001:db8::10".parse().unwrap(),
            ];
        });
        assert_eq!(routed(&d, "alice", "example.org"), ["alice@example.org"]);
        assert!(matches!(
            d.route_literal("alice", "[192.0.2.10]"),
            Route::Local(_)
        ));
        assert!(matches!(
            d.route_literal("bob", "[IPv6:2001:db8::10]"),
            Route::Local(_)
        ));
        assert_eq!(d.route_literal("alice", "[192.0.2.11]"), Route::NotLocal);
        assert_eq!(d.route_literal("nobody", "[192.0.2.10]"), Route::Unknown);
        assert_eq!(d.primary_domain(), "example.org");
    }

    #[test]
    fn a_tag_never_reaches_another_account() {
        let h = hash();
        let accounts = BTreeMap::from([
            ("alice@example.org".to_string(), account(&h, &[])),
            ("alice+bob@example.org".to_string(), account(&h, &[])),
        ]);
        let d = build(accounts, SecretFiles::Read, |_| {}).unwrap();
        let alice = d.accounts().find(|a| a.local == "alice").unwrap().clone();
        assert!(!d.may_send_as(&alice, "alice+bob", "example.org"));
        assert!(d.may_send_as(&alice, "alice+other", "example.org"));
    }

    #[test]
    fn verify_accepts_right_password_only() {
        let d = directory();
        assert!(d.verify("alice@example.org", b"secret").is_some());
        assert!(d.verify("ALICE@example.org", b"secret").is_some());
        assert!(d.verify("alice@example.org", b"wrong").is_none());
        assert!(d.verify("nobody@example.org", b"secret").is_none());
    }

    #[test]
    fn apop_digest_checks_against_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "tanstaaf\n").unwrap();
        let mut with_apop = account(&hash(), &[]);
        with_apop.apop_secret_file = Some(secret);
        let accounts = BTreeMap::from([
            ("mrose@example.org".to_string(), with_apop),
            ("plain@example.org".to_string(), account(&hash(), &[])),
        ]);
        let d = build(accounts, SecretFiles::Read, |_| {}).unwrap();
        assert!(d.offers_apop());
        // The example of RFC 1939 §7.
        let banner = "<1896.697170952@dbc.mtview.ca.us>";
        let digest = "c4c9334bac560ecc979e58001b3e22fb";
        assert!(d.verify_apop("mrose@example.org", banner, digest).is_some());
        assert!(
            d.verify_apop("mrose@example.org", "<other@x>", digest)
                .is_none()
        );
        assert!(d.verify_apop("plain@example.org", banner, digest).is_none());
        assert!(
            d.verify_apop("nobody@example.org", banner, digest)
                .is_none()
        );
        assert!(!directory().offers_apop());
    }

    #[test]
    fn debug_output_redacts_hash_and_apop_secret() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "apop-shared-secret\n").unwrap();
        let mut cfg = account(&hash(), &[]);
        cfg.apop_secret_file = Some(secret);
        let accounts = BTreeMap::from([("alice@example.org".to_string(), cfg)]);
        let d = build(accounts, SecretFiles::Read, |_| {}).unwrap();
        let alice = d.account("alice@example.org").unwrap();
        for shown in [
            format!("{alice:?}"),
            format!("{alice:#?}"),
            format!("{d:?}"),
        ] {
            assert!(!shown.contains(&hash()), "{shown}");
            assert!(!shown.contains("$argon2"), "{shown}");
            assert!(!shown.contains("apop-shared-secret"), "{shown}");
            assert!(shown.contains("alice@example.org"), "{shown}");
        }
        assert!(format!("{alice:?}").contains("<redacted>"));
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
