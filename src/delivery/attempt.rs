//! One delivery job: the due messages of one domain, over one connection to the first of its hosts
//! that answers (and meets the TLS policy), each message one transaction, with per-recipient results.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::client::{Client, Failure};
use super::route::{Host, NoRoute, Resolver, Tlsa};
use super::tls::{Check, ClientTls};
use super::wire::{Capabilities, Reply, crlf_form, data_wire_form, without_return_path};
use crate::config::outbound::{Outbound, TlsPolicy};
use crate::storage::queue::{Entry, Queue};

/// What delivery needs, shared by all jobs.
pub struct Context {
    pub queue: Queue,
    pub resolver: Resolver,
    pub tls: ClientTls,
    pub mta_sts: super::mta_sts::Cache,
}

/// The due recipients (indexes into `entry.recipients`) of one message, all of one domain.
#[derive(Debug, Clone)]
pub struct JobMessage {
    pub entry: Entry,
    pub rcpts: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `relayed`: the peer offers no DSN, so no notification will come from further on.
    Delivered { host: String, relayed: bool },
    /// Try again later.
    Deferred { host: Option<String>, error: String },
    /// Never: bounce.
    Failed { host: Option<String>, error: String },
}

/// Per message (queue id): the outcome of each recipient attempted.
pub type Results = Vec<(String, Vec<(usize, Outcome)>)>;

/// The same outcome for each of `rcpts` (indexes into one entry's recipients).
pub fn each(rcpts: &[usize], outcome: &Outcome) -> Vec<(usize, Outcome)> {
    rcpts.iter().map(|&i| (i, outcome.clone())).collect()
}

pub async fn run(
    ctx: &Context,
    outbound: &Arc<Outbound>,
    helo: &str,
    domain: &str,
    messages: Vec<JobMessage>,
) -> Results {
    let all = |outcome: Outcome| -> Results {
        messages
            .iter()
            .map(|m| {
                for &i in &m.rcpts {
                    log_outcome(&m.entry, i, None, "none", &outcome);
                }
                (m.entry.id.clone(), each(&m.rcpts, &outcome))
            })
            .collect()
    };
    // Where to connect: the smarthost for everything, or the domain's MX hosts.
    let (hosts, path) = match &outbound.smarthost {
        Some(relay) => (
            ctx.resolver.host(&relay.host).await.map(|h| vec![h]),
            Path {
                port: relay.port,
                policy: TlsPolicy::Verified,
                implicit_tls: relay.implicit_tls,
                credentials: relay.credentials.as_ref(),
                dane: None,
            },
        ),
        None => (
            ctx.resolver.hosts(domain).await,
            Path {
                port: outbound.port,
                policy: outbound.tls_for(domain),
                implicit_tls: false,
                credentials: None,
                dane: None,
            },
        ),
    };
    let mut path = path;
    let hosts = match hosts {
        Ok(hosts)
            if outbound.smarthost.is_none() && outbound.mta_sts && !domain.starts_with('[') =>
        {
            match apply_mta_sts(ctx, domain, hosts, &mut path).await {
                Ok(hosts) => hosts,
                Err(error) => {
                    return all(Outcome::Deferred { host: None, error });
                }
            }
        }
        Ok(hosts) => hosts,
        Err(NoRoute::Permanent(code, text)) => {
            return all(Outcome::Failed {
                host: None,
                error: format!("550 {code} {text}"),
            });
        }
        Err(NoRoute::Temporary(text)) => {
            return all(Outcome::Deferred {
                host: None,
                error: format!("451 4.4.3 {text}"),
            });
        }
    };
    let connect = Duration::from_secs(outbound.connect_timeout_secs);
    let command = Duration::from_secs(outbound.command_timeout_secs);
    let mut client = None;
    let mut errors = Vec::new();
    'hosts: for host in &hosts {
        let path = match for_host(ctx, host, &path).await {
            Ok(path) => path,
            Err(e) => {
                tracing::warn!(domain, mx = %host.name, error = %e, "cannot use this host (DANE), trying the next");
                errors.push(Failure::Connection(e));
                continue;
            }
        };
        for ip in &host.addresses {
            let addr = SocketAddr::new(*ip, path.port);
            match open(ctx, addr, &host.name, &path, helo, connect, command).await {
                Ok(c) => {
                    client = Some(c);
                    break 'hosts;
                }
                Err(e) => {
                    tracing::info!(domain, mx = %host.name, ip = %ip, error = %e.text(), "cannot use this host, trying the next");
                    errors.push(e);
                }
            }
        }
    }
    let Some(mut client) = client else {
        // Every host refused or failed: a 5xx greeting from all of them is a refusal for good.
        let all_refused = !errors.is_empty()
            && errors
                .iter()
                .all(|e| matches!(e, Failure::Refused(r) if r.is_permanent()));
        let error = errors
            .last()
            .map_or_else(|| "no host".to_string(), Failure::text);
        let error = format!("all hosts for {domain} failed, last: {error}");
        return all(if all_refused {
            Outcome::Failed { host: None, error }
        } else {
            Outcome::Deferred { host: None, error }
        });
    };
    let mut results = Vec::new();
    let mut broken: Option<String> = None;
    for message in messages {
        let id = message.entry.id.clone();
        if let Some(error) = &broken {
            let outcome = Outcome::Deferred {
                host: Some(client.host.clone()),
                error: error.clone(),
            };
            results.push((id, each(&message.rcpts, &outcome)));
            continue;
        }
        let (outcomes, failure) = transaction(ctx, outbound, &mut client, &message).await;
        for (i, outcome) in &outcomes {
            log_outcome(
                &message.entry,
                *i,
                Some(&client.host),
                client.tls.name(),
                outcome,
            );
        }
        results.push((id, outcomes));
        if let Some(failure) = failure {
            broken = Some(failure);
        }
    }
    if broken.is_none() {
        client.quit().await;
    }
    results
}

/// The domain's MTA-STS policy applied to its MX hosts: in `enforce` mode only the hosts it lists
/// remain, with TLS verified for their names (none left: a temporary failure, RFC 8461 §5.1); in
/// `testing` mode what enforcing would refuse is logged.
async fn apply_mta_sts(
    ctx: &Context,
    domain: &str,
    hosts: Vec<super::route::Host>,
    path: &mut Path<'_>,
) -> Result<Vec<super::route::Host>, String> {
    use super::mta_sts::Mode;
    let Some(policy) = ctx
        .mta_sts
        .policy(&ctx.resolver, &ctx.tls, domain, super::now())
        .await
    else {
        return Ok(hosts);
    };
    match policy.mode {
        Mode::Enforce => {
            let (allowed, refused): (Vec<_>, Vec<_>) =
                hosts.into_iter().partition(|h| policy.allows(&h.name));
            for host in &refused {
                tracing::warn!(domain, mx = %host.name, "MTA-STS (enforce): this MX host is not in the policy; skipped");
            }
            if allowed.is_empty() {
                return Err(format!(
                    "451 4.7.5 MTA-STS policy of {domain} (enforce) allows none of its MX hosts"
                ));
            }
            path.policy = TlsPolicy::Verified;
            Ok(allowed)
        }
        Mode::Testing => {
            for host in hosts.iter().filter(|h| !policy.allows(&h.name)) {
                tracing::warn!(domain, mx = %host.name, "MTA-STS (testing): enforcing would skip this MX host");
            }
            Ok(hosts)
        }
        Mode::None => Ok(hosts),
    }
}

/// How to reach the hosts of a job.
#[derive(Clone)]
struct Path<'a> {
    port: u16,
    policy: TlsPolicy,
    implicit_tls: bool,
    credentials: Option<&'a (String, String)>,
    /// The host's usable TLSA records: its certificate is checked against them, not WebPKI.
    dane: Option<Arc<Vec<hickory_resolver::proto::rr::rdata::TLSA>>>,
}

/// How to reach one host: as the job's path says, unless the host's name and its TLSA records are
/// DNSSEC-signed (RFC 7672 §2.2). Then usable records make TLS mandatory and authenticated by them
/// (DANE takes precedence over MTA-STS, RFC 8461 §2); signed records none of which is usable make
/// TLS mandatory without authentication (RFC 7672 §2.2). A TLSA lookup that fails rules the host
/// out: an attacker able to make it fail could otherwise strip TLS.
async fn for_host<'a>(ctx: &Context, host: &Host, path: &Path<'a>) -> Result<Path<'a>, String> {
    let mut path = path.clone();
    if !host.secure {
        return Ok(path);
    }
    match ctx.resolver.tlsa(&host.name, path.port).await? {
        Tlsa::Absent => {}
        Tlsa::Secure(records) => {
            let usable = super::dane::usable(&records);
            if usable.is_empty() {
                tracing::info!(mx = %host.name, "signed TLSA records, none usable for SMTP: TLS required, not authenticated");
                if path.policy == TlsPolicy::Opportunistic {
                    path.policy = TlsPolicy::Required;
                }
            } else {
                path.policy = TlsPolicy::Verified;
                path.dane = Some(Arc::new(usable));
            }
        }
    }
    Ok(path)
}

/// A connection ready for MAIL: greeted, EHLO done, TLS as the policy wants, logged in if asked.
async fn open(
    ctx: &Context,
    addr: SocketAddr,
    host: &str,
    path: &Path<'_>,
    helo: &str,
    connect: Duration,
    command: Duration,
) -> Result<Client, Failure> {
    let verified = path.policy == TlsPolicy::Verified;
    let implicit = path.implicit_tls.then_some((&ctx.tls, verified));
    let check = match &path.dane {
        Some(records) => Check::Dane(records.clone()),
        None => Check::WebPki {
            require_valid: verified,
        },
    };
    let mut client = Client::connect(addr, host, connect, command, implicit).await?;
    client.hello(helo).await?;
    if client.tls.is_encrypted() {
        // Implicit TLS: already encrypted.
    } else if client.caps.starttls {
        match client.starttls(&ctx.tls, check, helo).await {
            Ok(()) => {}
            // As Postfix's "may" level: a peer whose TLS is broken still gets its mail, in plain
            // text (an attacker able to break the handshake could as well have hidden STARTTLS).
            Err(e) if path.policy == TlsPolicy::Opportunistic => {
                tracing::info!(mx = host, error = %e.text(), "STARTTLS failed; opportunistic TLS: connecting again in plain text");
                client = Client::connect(addr, host, connect, command, None).await?;
                client.hello(helo).await?;
            }
            Err(e) => return Err(e),
        }
    } else if path.policy != TlsPolicy::Opportunistic {
        let _ = client.command("QUIT").await;
        let why = if path.dane.is_some() {
            "its TLSA records (DANE) require TLS".to_string()
        } else {
            format!("TLS is {} for this domain", path.policy.name())
        };
        return Err(Failure::Connection(format!(
            "{host} does not offer STARTTLS, and {why}"
        )));
    }
    if let Some((user, password)) = path.credentials {
        client.authenticate(user, password).await?;
    }
    Ok(client)
}

/// One log line per recipient and attempt: queue id, recipient, host, TLS state, result, reply.
fn log_outcome(entry: &Entry, i: usize, mx: Option<&str>, tls: &str, outcome: &Outcome) {
    let rcpt = &entry.recipients[i].address;
    let (result, reply) = match outcome {
        Outcome::Delivered { .. } => ("delivered", "accepted"),
        Outcome::Deferred { error, .. } => ("deferred", error.as_str()),
        Outcome::Failed { error, .. } => ("failed", error.as_str()),
    };
    let mx = mx.unwrap_or("-");
    tracing::info!(
        queue_id = %entry.id, rcpt = %rcpt, mx, tls, result, reply,
        "delivery {result}: {} to <{rcpt}> via {mx} (tls {tls}): {reply}", entry.id
    );
}

/// What DATA sends (dot-stuffed, with the final dot), the DKIM selectors that signed it, and its
/// size as RFC 1870 counts it; `None` from the read: it cannot be converted to 7 bit.
type Payload = (Vec<u8>, Vec<String>, u64);

/// One message over an open connection. The second value: the connection cannot be used any more.
async fn transaction(
    ctx: &Context,
    outbound: &Arc<Outbound>,
    client: &mut Client,
    message: &JobMessage,
) -> (Vec<(usize, Outcome)>, Option<String>) {
    let entry = &message.entry;
    let host = Some(client.host.clone());
    let every = |outcome: Outcome| each(&message.rcpts, &outcome);
    // What the server said it cannot take is not sent (RFC 1870, RFC 6152, RFC 6531).
    if let Some(error) = cannot_take(entry, &client.caps, &client.host) {
        return (every(Outcome::Failed { host, error }), None);
    }
    // 8-bit content to a server without 8BITMIME is sent converted to 7 bit (RFC 6152 §3).
    let downgrade = entry.eight_bit && !client.caps.eight_bit_mime;
    let payload = {
        let (queue, id) = (ctx.queue.clone(), entry.id.clone());
        let (outbound, envelope_from) = (outbound.clone(), entry.from.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<Option<Payload>> {
            let read = std::fs::read(queue.message_path(&id))?;
            let mut stored = without_return_path(&read);
            let converted;
            if downgrade {
                let Some(seven) = super::seven_bit::seven_bit(stored) else {
                    return Ok(None);
                };
                converted = seven;
                stored = &converted;
            }
            let crlf = crlf_form(stored);
            let mut prefix = Vec::new();
            let mut selectors = Vec::new();
            for key in signing_keys(&outbound, &envelope_from, stored) {
                match key.sign(&crlf) {
                    Ok(header) => {
                        prefix.extend_from_slice(header.as_bytes());
                        selectors.push(format!("{}/{}", key.domain, key.selector));
                    }
                    Err(error) => {
                        tracing::error!(queue_id = %id, %error, "DKIM signing failed")
                    }
                }
            }
            // RFC 1870's size: CRLF lines, no dot-stuffing, the last line completed.
            let unfinished = !crlf.is_empty() && !crlf.ends_with(b"\n");
            let size = (prefix.len() + crlf.len() + if unfinished { 2 } else { 0 }) as u64;
            Ok(Some((data_wire_form(&prefix, stored), selectors, size)))
        })
        .await
        .expect("the message read task does not panic")
    };
    let (payload, selectors, converted_size) = match payload {
        Ok(Some(p)) => p,
        Ok(None) => {
            let error = format!(
                "554 5.6.3 {} does not accept 8-bit messages (no 8BITMIME), and this one cannot \
                 be converted to 7 bit (8-bit octets in a header, or in content declared base64 \
                 or quoted-printable)",
                client.host
            );
            return (every(Outcome::Failed { host, error }), None);
        }
        Err(e) => {
            tracing::error!(queue_id = %entry.id, error = %e, "cannot read the queued message");
            return (
                every(Outcome::Deferred {
                    host,
                    error: format!("451 4.3.0 cannot read the queued message: {e}"),
                }),
                None,
            );
        }
    };
    let size = if downgrade {
        tracing::info!(queue_id = %entry.id, mx = %client.host, "converted to 7 bit: the server does not offer 8BITMIME");
        let size = converted_size;
        if client.caps.refuses_size(size) {
            let error = format!(
                "552 5.3.4 message of {size} octets (converted to 7 bit) is over {}'s limit of {}",
                client.host,
                client.caps.size.unwrap_or(0)
            );
            return (every(Outcome::Failed { host, error }), None);
        }
        size
    } else {
        entry.wire_size()
    };
    if !selectors.is_empty() {
        tracing::info!(queue_id = %entry.id, dkim = %selectors.join(","), "signed");
    }
    let mut mail = format!("MAIL FROM:<{}>", entry.from);
    // RFC 1870 §6: SIZE= only to a server that offered SIZE.
    if client.caps.size.is_some() {
        mail.push_str(&format!(" SIZE={size}"));
    }
    if entry.eight_bit && !downgrade {
        mail.push_str(" BODY=8BITMIME");
    }
    if entry.smtputf8 {
        mail.push_str(" SMTPUTF8");
    }
    // RFC 3461: what the sender asked of notifications goes on to a peer that offers DSN.
    let dsn = client.caps.dsn;
    if dsn {
        if let Some(full) = entry.ret_full {
            mail.push_str(if full { " RET=FULL" } else { " RET=HDRS" });
        }
        if let Some(envid) = &entry.envid {
            mail.push_str(&format!(" ENVID={envid}"));
        }
    }
    let mut commands = vec![mail];
    commands.extend(message.rcpts.iter().map(|&i| {
        let r = &entry.recipients[i];
        let mut rcpt = format!("RCPT TO:<{}>", r.address);
        if dsn {
            if let Some(notify) = r.notify {
                rcpt.push_str(&format!(" NOTIFY={}", notify.value()));
            }
            if let Some(orcpt) = &r.orcpt {
                rcpt.push_str(&format!(" ORCPT={orcpt}"));
            }
        }
        rcpt
    }));
    commands.push("DATA".into());
    let replies = match exchange(client, &commands).await {
        Ok(replies) => replies,
        Err(e) => {
            return (
                every(Outcome::Deferred {
                    host,
                    error: e.text(),
                }),
                Some(e.text()),
            );
        }
    };
    let peer = client.host.clone();
    // Only the reply to the final dot may say "delivered": a refusal before it either fails the
    // recipient (5xx) or defers it, and a positive reply out of place is a peer out of step.
    let refusal = |reply: &Reply| {
        if reply.is_permanent() {
            Outcome::Failed {
                host: Some(peer.clone()),
                error: reply.text(),
            }
        } else {
            Outcome::Deferred {
                host: Some(peer.clone()),
                error: reply.text(),
            }
        }
    };
    let mail_reply = &replies[0];
    if mail_reply.code != 250 {
        // Replies not in step (or a failed RSET) make the connection unusable for the next message.
        let broken = reset(client).await.err().map(|e| e.text());
        return (every(refusal(mail_reply)), broken);
    }
    let mut outcomes = Vec::new();
    let mut accepted = Vec::new();
    for (k, &i) in message.rcpts.iter().enumerate() {
        let reply = &replies[1 + k];
        if reply.is_positive() {
            accepted.push(i);
        } else {
            outcomes.push((i, refusal(reply)));
        }
    }
    let data_reply = &replies[commands.len() - 1];
    if data_reply.code == 354 && accepted.is_empty() {
        // RFC 2920 §3.1: a pipelined DATA accepted although no recipient was: send an empty message
        // (the server must refuse it), not the content.
        let ended = match client.send(b".\r\n").await {
            Ok(()) => client.read_reply().await.map(|_| ()),
            Err(e) => Err(e),
        };
        return (outcomes, ended.err().map(|e| e.text()));
    }
    if data_reply.code != 354 {
        // DATA refused: the transaction is over for the accepted recipients too.
        outcomes.extend(each(&accepted, &refusal(data_reply)));
        let broken = reset(client).await.err().map(|e| e.text());
        return (outcomes, broken);
    }
    let final_reply = match client.send_data(&payload).await {
        Ok(()) => client.read_final_reply().await,
        Err(e) => Err(e),
    };
    match final_reply {
        Ok(reply) => {
            let outcome = if reply.is_positive() {
                Outcome::Delivered {
                    host: peer.clone(),
                    relayed: !dsn,
                }
            } else {
                refusal(&reply)
            };
            outcomes.extend(each(&accepted, &outcome));
            (outcomes, None)
        }
        Err(e) => {
            // Without the final reply nothing is known: the message may have arrived (a retry may
            // duplicate it, which RFC 5321 §6.1 prefers to losing it).
            let outcome = Outcome::Deferred {
                host,
                error: e.text(),
            };
            outcomes.extend(each(&accepted, &outcome));
            (outcomes, Some(e.text()))
        }
    }
}

/// Why a server with these capabilities cannot take this message, if it cannot.
fn cannot_take(entry: &Entry, caps: &Capabilities, host: &str) -> Option<String> {
    if caps.refuses_size(entry.wire_size()) {
        Some(format!(
            "552 5.3.4 message of {} octets is over {host}'s limit of {}",
            entry.wire_size(),
            caps.size.unwrap_or(0)
        ))
    } else if entry.smtputf8 && !caps.smtputf8 {
        Some(format!(
            "553 5.6.7 {host} does not accept internationalised addresses (no SMTPUTF8)"
        ))
    } else {
        None
    }
}

/// The commands and their replies: in one write when the server offers PIPELINING (RFC 2920), one
/// by one otherwise (stopping at a refused MAIL, or before DATA when no recipient was accepted; the
/// replies not received are then copies of the last one).
async fn exchange(client: &mut Client, commands: &[String]) -> Result<Vec<Reply>, Failure> {
    let mut replies = Vec::with_capacity(commands.len());
    if client.caps.pipelining {
        let batch: String = commands.iter().map(|c| format!("{c}\r\n")).collect();
        client.send(batch.as_bytes()).await?;
        for _ in commands {
            replies.push(client.read_reply().await?);
        }
        return Ok(replies);
    }
    for (k, command) in commands.iter().enumerate() {
        let is_data = k == commands.len() - 1;
        if is_data && !replies[1..].iter().any(Reply::is_positive) {
            let last = replies.last().cloned().expect("MAIL was answered");
            replies.push(last);
            break;
        }
        let reply = client.command(command).await?;
        let stop = k == 0 && reply.code != 250;
        replies.push(reply);
        if stop {
            while replies.len() < commands.len() {
                replies.push(replies[0].clone());
            }
            break;
        }
    }
    Ok(replies)
}

/// RSET after a transaction that did not complete.
async fn reset(client: &mut Client) -> Result<(), Failure> {
    let reply = client.command("RSET").await?;
    if reply.code != 250 {
        return Err(Failure::Refused(reply));
    }
    Ok(())
}

/// The keys for the message's `From:` domain, or else for its envelope sender's domain.
fn signing_keys<'a>(
    outbound: &'a Outbound,
    envelope_from: &str,
    stored: &[u8],
) -> Vec<&'a crate::dkim::DkimKey> {
    if outbound.dkim.is_empty() {
        return Vec::new();
    }
    // Keys are configured under the A-label form of their domain.
    let normal = |d: String| crate::accounts::normalize_domain(&d).unwrap_or(d);
    let from_header = header_from_domain(stored).map(normal);
    let envelope = envelope_from
        .rsplit_once('@')
        .map(|(_, d)| normal(d.to_ascii_lowercase()));
    for domain in [from_header, envelope].into_iter().flatten() {
        let keys: Vec<_> = outbound.dkim_for(&domain).collect();
        if !keys.is_empty() {
            return keys;
        }
    }
    Vec::new()
}

/// The domain of the first `From:` address of a stored message.
pub fn header_from_domain(stored: &[u8]) -> Option<String> {
    let message = mail_parser::MessageParser::default().parse_headers(stored)?;
    let address = message.from()?.first()?.address()?.to_string();
    address
        .rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
}
