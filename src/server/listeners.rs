//! Opening the listeners: inherited systemd sockets matched by name, or addresses bound here.
//!
//! A listener takes the inherited sockets named in its `systemd:NAME` endpoints. A listener without such
//! endpoints takes the inherited sockets named after it (`smtp`, `pop3`, …) *instead of* binding its
//! addresses, so one config file serves both a socket-activated and a standalone start. Start-up fails,
//! loudly, on a `systemd:NAME` without such a socket, on an inherited socket that no listener uses,
//! and when there is no listener at all.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Socket, Type};

use crate::config::{Endpoint, ListenerSpec, Protocol};
use crate::systemd::InheritedSocket;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "listen.{listener}: no socket named {name:?} was passed by systemd (check FileDescriptorName= in the .socket unit)"
    )]
    MissingSocket {
        listener: &'static str,
        name: String,
    },
    #[error(
        "systemd passed socket(s) named {0:?} that no listener uses (add \"systemd:NAME\" to a [listen] list or fix FileDescriptorName=)"
    )]
    UnusedSockets(Vec<String>),
    #[error("no listeners: every [listen] list is empty")]
    NoListeners,
    #[error(
        "listen.{listener}: the socket {name:?} passed by systemd is not a listening TCP socket"
    )]
    NotAListener {
        listener: &'static str,
        name: String,
    },
    #[error("listen.{listener}: cannot listen on {addr}: {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Where each socket of each listener comes from: an index into the inherited sockets, or an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Inherited(usize),
    Bind(SocketAddr),
}

/// The pure part: decides, from the listener specs and the names of the inherited sockets, which
/// socket serves which listener.
pub fn plan(
    specs: &[ListenerSpec],
    inherited: &[&str],
) -> Result<Vec<(Protocol, Source)>, ListenError> {
    let mut by_name: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, name) in inherited.iter().enumerate() {
        by_name.entry(name).or_default().push(i);
    }
    let mut out = Vec::new();
    for spec in specs {
        let listener = spec.protocol.name();
        let named: Vec<&str> = spec
            .endpoints
            .iter()
            .filter_map(|e| match e {
                Endpoint::Systemd(name) => Some(name.as_str()),
                Endpoint::Bind(_) => None,
            })
            .collect();
        if named.is_empty()
            && let Some(fds) = by_name.remove(listener)
        {
            out.extend(
                fds.into_iter()
                    .map(|i| (spec.protocol, Source::Inherited(i))),
            );
            continue;
        }
        for endpoint in &spec.endpoints {
            match endpoint {
                Endpoint::Bind(addr) => out.push((spec.protocol, Source::Bind(*addr))),
                Endpoint::Systemd(name) => {
                    let fds = by_name.remove(name.as_str()).ok_or_else(|| {
                        ListenError::MissingSocket {
                            listener,
                            name: name.clone(),
                        }
                    })?;
                    out.extend(
                        fds.into_iter()
                            .map(|i| (spec.protocol, Source::Inherited(i))),
                    );
                }
            }
        }
    }
    if !by_name.is_empty() {
        return Err(ListenError::UnusedSockets(
            by_name.into_keys().map(String::from).collect(),
        ));
    }
    if out.is_empty() {
        return Err(ListenError::NoListeners);
    }
    Ok(out)
}

/// Opens every listener, non-blocking, ready for tokio.
pub fn open(
    specs: &[ListenerSpec],
    inherited: Vec<InheritedSocket>,
) -> Result<Vec<(Protocol, TcpListener)>, ListenError> {
    let names: Vec<&str> = inherited.iter().map(|s| s.name.as_str()).collect();
    let plan = plan(specs, &names)?;
    let mut inherited: Vec<Option<InheritedSocket>> = inherited.into_iter().map(Some).collect();
    let mut out = Vec::new();
    for (protocol, source) in plan {
        let listener = protocol.name();
        let socket = match source {
            Source::Inherited(i) => {
                let s = inherited[i]
                    .take()
                    .expect("the plan uses each inherited socket once");
                let socket = Socket::from(s.fd);
                let is_tcp_listener = socket.r#type().is_ok_and(|t| t == Type::STREAM)
                    && socket.is_listener().unwrap_or(false)
                    && socket.local_addr().is_ok_and(|a| a.as_socket().is_some());
                if !is_tcp_listener {
                    return Err(ListenError::NotAListener {
                        listener,
                        name: s.name,
                    });
                }
                tracing::info!(listener, name = %s.name, addr = ?socket.local_addr().ok().and_then(|a| a.as_socket()), "using socket passed by systemd");
                socket
            }
            Source::Bind(addr) => {
                let socket = bind(addr).map_err(|source| ListenError::Bind {
                    listener,
                    addr,
                    source,
                })?;
                tracing::info!(listener, %addr, "listening");
                socket
            }
        };
        socket
            .set_nonblocking(true)
            .map_err(|source| ListenError::Bind {
                listener,
                addr: local(&socket),
                source,
            })?;
        out.push((protocol, TcpListener::from(socket)));
    }
    Ok(out)
}

fn local(socket: &Socket) -> SocketAddr {
    socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
}

fn bind(addr: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // So that "0.0.0.0:25" and "[::]:25" can both be listed.
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(protocol: Protocol, endpoints: &[&str]) -> ListenerSpec {
        ListenerSpec {
            protocol,
            endpoints: endpoints
                .iter()
                .map(|e| match e.strip_prefix("systemd:") {
                    Some(n) => Endpoint::Systemd(n.into()),
                    None => Endpoint::Bind(e.parse().unwrap()),
                })
                .collect(),
        }
    }

    #[test]
    fn without_inherited_sockets_addresses_are_bound() {
        let p = plan(&[spec(Protocol::Smtp, &["127.0.0.1:25", "[::1]:25"])], &[]).unwrap();
        assert_eq!(p.len(), 2);
        assert!(matches!(p[0].1, Source::Bind(_)));
    }

    #[test]
    fn inherited_socket_named_after_listener_replaces_its_addresses() {
        let specs = [
            spec(Protocol::Smtp, &["192.0.2.1:25"]),
            spec(Protocol::Pop3, &["systemd:pop3"]),
        ];
        let p = plan(&specs, &["pop3", "smtp"]).unwrap();
        assert_eq!(
            p,
            vec![
                (Protocol::Smtp, Source::Inherited(1)),
                (Protocol::Pop3, Source::Inherited(0))
            ]
        );
    }

    #[test]
    fn several_sockets_with_one_name() {
        let p = plan(&[spec(Protocol::Smtp, &["systemd:mx"])], &["mx", "mx"]).unwrap();
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn missing_named_socket_fails() {
        let err = plan(&[spec(Protocol::Smtp, &["systemd:smtp"])], &[]).unwrap_err();
        assert!(err.to_string().contains("listen.smtp"), "{err}");
    }

    #[test]
    fn unused_inherited_socket_fails() {
        let err = plan(
            &[spec(Protocol::Smtp, &["systemd:smtp"])],
            &["smtp", "imap"],
        )
        .unwrap_err();
        assert!(
            matches!(err, ListenError::UnusedSockets(ref n) if n == &["imap"]),
            "{err}"
        );
    }

    #[test]
    fn zero_listeners_fails() {
        assert!(matches!(plan(&[], &[]), Err(ListenError::NoListeners)));
    }
}
