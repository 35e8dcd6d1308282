//! Address syntax: the normal form of domains (lower-case A-labels) and what a configured address may
//! look like (its parts name its Maildir).
//!
//! Addresses are compared case-insensitively (domains per RFC 5321 §2.4; local parts by our documented
//! choice, because users expect `Alice@` and `alice@` to be the same person).

use std::collections::BTreeSet;

/// A configured address must be plain and filesystem-safe, because its parts name its Maildir. Local
/// parts may be UTF-8 (RFC 6531) letters and digits; domains may be given as U-labels or A-labels.
pub fn split_config_address(
    address: &str,
    domains: &BTreeSet<String>,
) -> Result<(String, String), String> {
    let (local, domain) = address
        .rsplit_once('@')
        .ok_or_else(|| format!("{address:?} is not an address (local@domain)"))?;
    let local = local.to_lowercase();
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'));
    if !local_ok {
        return Err(format!(
            "{address:?}: the local part must be 1-64 octets of letters, digits and . - _ + (no leading, trailing or double dot)"
        ));
    }
    let domain = normalize_domain(domain)
        .filter(|d| domains.contains(d))
        .ok_or_else(|| format!("{address:?}: {domain} is not one of the local `domains`"))?;
    Ok((local, domain))
}

/// The comparable form of a domain: lower-case ASCII, internationalised labels in punycode (A-labels).
/// `None` if it is not a valid host name.
pub fn normalize_domain(domain: &str) -> Option<String> {
    let ascii = if domain.is_ascii() {
        domain.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(domain).ok()?
    };
    is_valid_domain(&ascii).then_some(ascii)
}

/// RFC 1035 host name syntax: dot-separated labels of letters, digits and inner hyphens.
pub fn is_valid_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 255
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}
