//! The account directory: local domains, accounts, aliases, the postmaster and catch-all accounts, and
//! the routing of a recipient address to the mailboxes that receive it; also who may send as whom
//! (RFC 6409 §8.1) and the checks of a login against it. It knows nothing of the configuration file:
//! `config` builds it (see `Directory::from_config` there) through the methods below.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::Account;
use super::address::{normalize_domain, split_config_address};
use super::passwords::{dummy_hash, verify_password};

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
    /// An empty directory for these local `domains` (normalised, see [`normalize_domain`]);
    /// `primary_domain` is what `<postmaster>` and local address literals mean, `address_literals`
    /// this server's addresses.
    pub(crate) fn new(
        domains: BTreeSet<String>,
        primary_domain: String,
        address_literals: Vec<std::net::IpAddr>,
    ) -> Directory {
        Directory {
            domains,
            primary_domain,
            address_literals,
            ..Directory::default()
        }
    }

    /// Adds an account; `None` when its address is already an account.
    pub(crate) fn add_account(&mut self, account: Account) -> Option<Arc<Account>> {
        if self.accounts.contains_key(&account.address) {
            return None;
        }
        let account = Arc::new(account);
        self.routes
            .entry(account.address.clone())
            .or_default()
            .push(account.clone());
        self.accounts
            .insert(account.address.clone(), account.clone());
        Some(account)
    }

    /// Mail for `alias` (canonical, `local@domain`) goes to `account` too; an alias listed by several
    /// accounts reaches them all. `false` when `alias` is an account of its own.
    pub(crate) fn add_alias(&mut self, alias: String, account: &Arc<Account>) -> bool {
        if self.accounts.contains_key(&alias) {
            return false;
        }
        let targets = self.routes.entry(alias).or_default();
        if !targets.contains(account) {
            targets.push(account.clone());
        }
        true
    }

    /// RFC 5321 §4.5.1: the account receiving `postmaster@` of every local domain without such an
    /// address of its own.
    pub(crate) fn set_postmaster(&mut self, account: Option<Arc<Account>>) {
        self.postmaster = account;
    }

    /// The account receiving mail for the unknown addresses of local `domain` (normalised).
    pub(crate) fn set_catch_all(&mut self, domain: String, account: Arc<Account>) {
        self.catch_all.insert(domain, account);
    }

    /// RFC 5233 sub-addressing: `user+tag@domain` (with `+` as separator) goes to `user@domain`.
    pub(crate) fn set_subaddress_separator(&mut self, separator: Option<char>) {
        self.subaddress_separator = separator;
    }

    /// The account a configured address names (any case, U-labels or A-labels).
    pub(crate) fn account_named(&self, address: &str) -> Option<Arc<Account>> {
        split_config_address(address, &self.domains)
            .ok()
            .and_then(|(local, domain)| self.accounts.get(&format!("{local}@{domain}")))
            .cloned()
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
        // RFC 5321 §4.1.3: an IPv6 literal carries its "IPv6:" tag, an IPv4 one is a bare dotted
        // quad; "[::1]" and "[IPv6:192.0.2.1]" are neither.
        let ip: Option<std::net::IpAddr> = match inner.get(..5) {
            Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => inner[5..]
                .parse::<std::net::Ipv6Addr>()
                .ok()
                .map(Into::into),
            _ => inner.parse::<std::net::Ipv4Addr>().ok().map(Into::into),
        };
        match ip {
            Some(ip) if self.address_literals.contains(&ip) => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::hash_password;
    use std::sync::OnceLock;

    fn domains() -> BTreeSet<String> {
        ["example.org".to_string(), "xn--mnchen-3ya.de".to_string()].into()
    }

    fn hash() -> String {
        static HASH: OnceLock<String> = OnceLock::new();
        HASH.get_or_init(|| hash_password(b"secret")).clone()
    }

    fn account(local: &str, apop_secret: Option<&str>) -> Account {
        Account::new(
            local.into(),
            "example.org".into(),
            hash(),
            apop_secret.map(str::to_string),
        )
    }

    /// alice and bob of example.org, both listing the alias team@, alice the postmaster, `+` tags;
    /// then as `tweak` leaves it.
    fn directory_with(tweak: impl FnOnce(&mut Directory)) -> Directory {
        let mut d = Directory::new(domains(), "example.org".into(), vec![]);
        let alice = d.add_account(account("alice", None)).unwrap();
        let bob = d.add_account(account("bob", None)).unwrap();
        assert!(d.add_alias("team@example.org".into(), &alice));
        assert!(d.add_alias("team@example.org".into(), &bob));
        d.set_postmaster(Some(alice));
        d.set_subaddress_separator(Some('+'));
        tweak(&mut d);
        d
    }

    fn directory() -> Directory {
        directory_with(|_| {})
    }

    fn named(d: &Directory, address: &str) -> Arc<Account> {
        d.account(address).unwrap().clone()
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
    fn an_account_is_added_once_and_an_alias_never_shadows_one() {
        let mut d = directory();
        assert!(d.add_account(account("alice", None)).is_none());
        let bob = named(&d, "bob@example.org");
        assert!(!d.add_alias("alice@example.org".into(), &bob));
        assert_eq!(routed(&d, "alice", "example.org"), ["alice@example.org"]);
        assert!(d.add_alias("team@example.org".into(), &bob), "listed twice");
        assert_eq!(
            routed(&d, "team", "example.org").len(),
            2,
            "still once each"
        );
    }

    #[test]
    fn subaddress_goes_to_the_base_address() {
        let d = directory();
        assert_eq!(routed(&d, "bob+lists", "example.org"), ["bob@example.org"]);
        assert_eq!(routed(&d, "team+x+y", "example.org").len(), 2);
        assert_eq!(d.route("+x", "example.org"), Route::Unknown);
        let off = directory_with(|d| d.set_subaddress_separator(None));
        assert_eq!(off.route("bob+lists", "example.org"), Route::Unknown);
        let dash = directory_with(|d| d.set_subaddress_separator(Some('-')));
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
        let d = directory_with(|d| d.set_postmaster(Some(named(d, "bob@example.org"))));
        assert_eq!(routed(&d, "postmaster", "example.org"), ["bob@example.org"]);
    }

    #[test]
    fn catch_all_takes_unknown_addresses_of_its_domain_only() {
        let d =
            directory_with(|d| d.set_catch_all("example.org".into(), named(d, "bob@example.org")));
        assert_eq!(routed(&d, "anything", "example.org"), ["bob@example.org"]);
        assert_eq!(routed(&d, "alice", "example.org"), ["alice@example.org"]);
        assert_eq!(d.route("anything", "münchen.de"), Route::Unknown);
        assert_eq!(directory().route("anything", "example.org"), Route::Unknown);
    }

    #[test]
    fn configured_addresses_name_accounts_in_any_spelling() {
        let d = directory();
        assert_eq!(
            d.account_named("Alice@EXAMPLE.org").unwrap().address,
            "alice@example.org"
        );
        assert!(d.account_named("carol@example.org").is_none());
        assert!(d.account_named("alice@elsewhere.org").is_none());
    }

    #[test]
    fn may_send_as_own_addresses_aliases_and_tags_only() {
        let d = directory_with(|d| {
            d.set_catch_all("example.org".into(), named(d, "alice@example.org"))
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
        let literals = vec![
            "192.0.2.10".parse().unwrap(),
            "2001:db8::10".parse().unwrap(),
        ];
        let mut d = Directory::new(domains(), "example.org".into(), literals);
        d.add_account(account("alice", None)).unwrap();
        d.add_account(account("bob", None)).unwrap();
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
        // RFC 5321 §4.1.3: the IPv6 form needs its tag, and the tag only fits IPv6 (both were taken
        // as local before).
        assert_eq!(d.route_literal("bob", "[2001:db8::10]"), Route::NotLocal);
        assert_eq!(
            d.route_literal("alice", "[IPv6:192.0.2.10]"),
            Route::NotLocal
        );
        assert!(matches!(
            d.route_literal("bob", "[ipv6:2001:DB8::10]"),
            Route::Local(_)
        ));
    }

    #[test]
    fn a_tag_never_reaches_another_account() {
        let mut d = Directory::new(domains(), "example.org".into(), vec![]);
        d.set_subaddress_separator(Some('+'));
        let alice = d.add_account(account("alice", None)).unwrap();
        d.add_account(account("alice+bob", None)).unwrap();
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
        let d = directory_with(|d| {
            d.add_account(account("mrose", Some("tanstaaf"))).unwrap();
            d.add_account(account("plain", None)).unwrap();
        });
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
        let d = directory_with(|d| {
            d.add_account(account("carol", Some("apop-shared-secret")))
                .unwrap();
        });
        let carol = d.account("carol@example.org").unwrap();
        for shown in [
            format!("{carol:?}"),
            format!("{carol:#?}"),
            format!("{d:?}"),
        ] {
            assert!(!shown.contains(&hash()), "{shown}");
            assert!(!shown.contains("$argon2"), "{shown}");
            assert!(!shown.contains("apop-shared-secret"), "{shown}");
            assert!(shown.contains("carol@example.org"), "{shown}");
        }
        assert!(format!("{carol:?}").contains("<redacted>"));
    }
}
