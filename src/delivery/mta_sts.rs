//! MTA-STS (RFC 8461): a domain's published promise that its MX hosts have valid certificates.
//!
//! Before delivering to a domain, its `_mta-sts` TXT record is looked up; when it names a policy id
//! not cached yet, the policy is fetched from `https://mta-sts.<domain>/.well-known/mta-sts.txt` (TLS
//! verified, no redirects, at most 64 KiB) and cached (in memory and under the storage root) for its
//! `max_age`. A policy in `enforce` mode limits delivery to the MX hosts it lists, over TLS verified
//! for their names; `testing` only logs what enforcing would have refused. A failed lookup or fetch
//! keeps using a cached, unexpired policy (§5.1), so an attacker who blocks the fetch gains nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::route::Resolver;
use super::tls::ClientTls;

/// RFC 8461 §3.2: policies are small; refuse anything larger.
const MAX_POLICY: usize = 64 * 1024;
/// RFC 8461 §3.2: max_age is at most a year.
const MAX_AGE: u64 = 31_557_600;
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The `id=` of the TXT record it was fetched for.
    pub id: String,
    pub mode: Mode,
    /// MX patterns: `mx.example.com` or `*.example.com` (one leftmost label).
    pub mx: Vec<String>,
    /// Unix time after which it no longer applies.
    pub expires: u64,
}

impl Policy {
    /// Whether `host` (an MX host name) is one the policy allows (RFC 8461 §4.1).
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(suffix) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
                None => host == *pattern,
            })
    }
}

/// Parses a policy body (RFC 8461 §3.2): `key: value` lines, CRLF or LF.
pub fn parse_policy(text: &str, id: &str, now: u64) -> Result<Policy, String> {
    let (mut version, mut mode, mut max_age) = (None, None, None);
    let mut mx = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(format!("not a policy line: {line:?}"));
        };
        let value = value.trim();
        match key.trim() {
            "version" => version = Some(value.to_string()),
            "mode" => {
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    other => return Err(format!("unknown mode {other:?}")),
                })
            }
            "max_age" => {
                let age: u64 = value
                    .parse()
                    .ok()
                    .filter(|_| value.len() <= 10 && value.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| format!("bad max_age {value:?}"))?;
                max_age = Some(age.min(MAX_AGE));
            }
            "mx" => mx.push(value.trim_end_matches('.').to_ascii_lowercase()),
            // §3.2: unknown fields are ignored.
            _ => {}
        }
    }
    if version.as_deref() != Some("STSv1") {
        return Err("missing or unknown version (STSv1 expected)".into());
    }
    let mode = mode.ok_or("no mode")?;
    let max_age = max_age.ok_or("no max_age")?;
    if mode != Mode::None && mx.is_empty() {
        return Err("no mx".into());
    }
    Ok(Policy {
        id: id.to_string(),
        mode,
        mx,
        expires: now + max_age,
    })
}

/// The `id=` of a `v=STSv1; id=…;` TXT record, if it is one.
pub fn parse_record(txt: &str) -> Option<String> {
    let mut fields = txt.split(';').map(str::trim).filter(|f| !f.is_empty());
    if fields.next()? != "v=STSv1" {
        return None;
    }
    fields
        .filter_map(|f| f.strip_prefix("id="))
        .find(|id| {
            !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric())
        })
        .map(str::to_string)
}

/// Policies known, by domain, remembered under `dir` across restarts.
pub struct Cache {
    dir: PathBuf,
    /// The HTTPS port of policy hosts: 443 (another only for test networks).
    port: u16,
    policies: Mutex<HashMap<String, Policy>>,
}

impl Cache {
    pub fn new(dir: PathBuf, port: u16) -> Cache {
        let _ = std::fs::create_dir_all(&dir);
        let mut policies = HashMap::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(domain) = name.strip_suffix(".json") else {
                    continue;
                };
                if let Some(policy) = std::fs::read(entry.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Policy>(&b).ok())
                {
                    policies.insert(domain.to_string(), policy);
                }
            }
        }
        Cache {
            dir,
            port,
            policies: Mutex::new(policies),
        }
    }

    fn cached(&self, domain: &str, now: u64) -> Option<Policy> {
        let policies = self.policies.lock().unwrap_or_else(|e| e.into_inner());
        policies.get(domain).filter(|p| p.expires > now).cloned()
    }

    fn remember(&self, domain: &str, policy: &Policy) {
        self.policies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(domain.to_string(), policy.clone());
        // Best effort: losing the file only means fetching the policy again.
        if let Ok(json) = serde_json::to_vec(policy) {
            let tmp = self.dir.join(format!("{domain}.tmp"));
            if std::fs::write(&tmp, json).is_ok() {
                let _ = std::fs::rename(&tmp, self.dir.join(format!("{domain}.json")));
            }
        }
    }

    /// The policy that applies to `domain` now, if any (ASCII, lower case).
    pub async fn policy(
        &self,
        resolver: &Resolver,
        tls: &ClientTls,
        domain: &str,
        now: u64,
    ) -> Option<Policy> {
        let cached = self.cached(domain, now);
        let id = match resolver.txt(&format!("_mta-sts.{domain}")).await {
            Ok(records) => records.iter().find_map(|r| parse_record(r)),
            Err(e) => {
                tracing::info!(domain, error = %e, "MTA-STS record lookup failed; using the cached policy if any");
                return cached;
            }
        };
        let Some(id) = id else {
            // No record: a cached policy still applies until it expires (§5.1).
            return cached;
        };
        if let Some(policy) = cached.as_ref().filter(|p| p.id == id) {
            return Some(policy.clone());
        }
        match fetch(resolver, tls, domain, self.port)
            .await
            .and_then(|text| parse_policy(&text, &id, now))
        {
            Ok(policy) => {
                tracing::info!(domain, id = %policy.id, mode = ?policy.mode, mx = ?policy.mx, "MTA-STS policy fetched");
                self.remember(domain, &policy);
                Some(policy)
            }
            Err(e) => {
                tracing::warn!(domain, error = %e, "MTA-STS policy fetch failed; using the cached policy if any");
                cached
            }
        }
    }
}

/// GET https://mta-sts.DOMAIN/.well-known/mta-sts.txt with a verified certificate; 200 and
/// text/plain only (no redirects, RFC 8461 §3.3).
async fn fetch(
    resolver: &Resolver,
    tls: &ClientTls,
    domain: &str,
    port: u16,
) -> Result<String, String> {
    let host = format!("mta-sts.{domain}");
    let address = resolver
        .host(&host)
        .await
        .map_err(|e| format!("{host}: {e:?}"))?
        .addresses
        .into_iter()
        .next()
        .ok_or_else(|| format!("{host} has no address"))?;
    let work = async {
        let tcp = TcpStream::connect(SocketAddr::new(address, port))
            .await
            .map_err(|e| format!("connect to {host}: {e}"))?;
        let (config, _) = tls.connection(super::tls::Check::WebPki {
            require_valid: true,
        });
        let name =
            rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(&config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = hyper::Request::get("/.well-known/mta-sts.txt")
            .header(hyper::header::HOST, &host)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        if response.status() != hyper::StatusCode::OK {
            return Err(format!("{host} answered {}", response.status()));
        }
        let text_plain = response
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("text/plain"));
        if !text_plain {
            return Err(format!("{host}: the policy is not text/plain"));
        }
        let body = Limited::new(response.into_body(), MAX_POLICY)
            .collect()
            .await
            .map_err(|e| format!("{host}: {e}"))?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| format!("{host}: the policy is not UTF-8"))
    };
    timeout(FETCH_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(format!("{host}: timed out")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_parses_and_matches_its_mx_patterns() {
        let text = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.backup.example.com\r\nmax_age: 86400\r\n";
        let policy = parse_policy(text, "20240101", 1000).unwrap();
        assert_eq!(policy.mode, Mode::Enforce);
        assert_eq!(policy.expires, 1000 + 86400);
        assert!(policy.allows("mail.example.com") && policy.allows("MAIL.example.com."));
        assert!(policy.allows("mx1.backup.example.com"));
        assert!(
            !policy.allows("backup.example.com"),
            "the wildcard needs one more label"
        );
        assert!(!policy.allows("a.b.backup.example.com"), "and only one");
        assert!(!policy.allows("evil.example.com"));
    }

    #[test]
    fn bad_policies_are_refused() {
        for text in [
            "mode: enforce\nmx: a.example\nmax_age: 1\n",
            "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
            "version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a.example\n",
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -5\n",
            "<html>",
        ] {
            assert!(parse_policy(text, "1", 0).is_err(), "{text:?}");
        }
        let capped = parse_policy(
            "version: STSv1\nmode: testing\nmx: a\nmax_age: 99999999999\n",
            "1",
            0,
        );
        assert!(capped.is_err() || capped.unwrap().expires <= MAX_AGE);
    }

    #[test]
    fn records_give_their_id() {
        assert_eq!(
            parse_record("v=STSv1; id=20160831085700Z;").as_deref(),
            Some("20160831085700Z")
        );
        assert_eq!(parse_record("v=STSv1;id=abc"), Some("abc".into()));
        assert_eq!(parse_record("v=spf1 -all"), None);
        assert_eq!(parse_record("v=STSv1; id=has-dash;"), None);
    }
}
