#!/usr/bin/env python3
"""A mail client for the system tests (NixOS VM tests and their nspawn twins), standard library only
(dkim-verify excepted).

  mailclient --host H send --sender A --to B [--to C] --subject S --body TEXT [--expect-code N]
             [--port 587 --starttls | --port 465 --ssl] [--login USER:PASSWORD] [--cafile CERT]
  mailclient --host H fetch --user U --password P [--stls | --ssl --pop3-port 995] [--cafile CERT]
                                                            print every message (RETR), one after another
  mailclient --host H uidl --user U --password P           print "n uid" lines
  mailclient --host H closed --port N                      succeed only if nothing accepts a connection there
  mailclient sink --listen ADDR --port N --out FILE [--timeout S]
                         a receiving SMTP server (no STARTTLS) for one message: writes the envelope
                         (MAIL/RCPT lines) and the message, dot-stuffing undone, to FILE, then exits
  mailclient dkim-verify --dns IP FILE
                         verify the DKIM signature of the message in FILE, looking the key up on the DNS
                         server at IP (needs dkimpy and dnspython); prints d= and s= of the signature
  mailclient --host H hammer --out FILE [--seconds N] [--stop-file F] [--progress F]
                         connect/QUIT in a loop until F exists (at most N s), write counts as JSON to
                         FILE at the end ("failed" counts every session that went wrong, "refused" those
                         whose connection was refused), and the count served so far to the progress file

Exit status 0 when the exchange went as expected, 1 otherwise (with the reason on stderr).
--expect-code N: the exchange is expected to end in an N refusal, of the sender (MAIL FROM), a recipient
or the message (after DATA).
"""

import argparse
import json
import os
import poplib
import smtplib
import socket
import ssl
import sys
import time
from email.message import EmailMessage


def send(args):
    msg = EmailMessage()
    msg["From"] = args.sender
    msg["To"] = ", ".join(args.to)
    msg["Subject"] = args.subject
    msg.set_content(args.body)
    ctx = tls_context(args)
    port = args.port or args.smtp_port
    client = smtplib.SMTP_SSL(args.host, port, timeout=30, context=ctx) if args.ssl else smtplib.SMTP(args.host, port, timeout=30)
    with client as s:
        if args.starttls:
            s.starttls(context=ctx)
        if args.login:
            user, password = args.login.split(":", 1)
            s.login(user, password)
        try:
            refused = s.send_message(msg)
        except smtplib.SMTPRecipientsRefused as e:
            refused = e.recipients
        except smtplib.SMTPSenderRefused as e:
            refused = {f"MAIL FROM:<{e.sender}>": (e.smtp_code, e.smtp_error)}
        except smtplib.SMTPDataError as e:
            refused = {"DATA": (e.smtp_code, e.smtp_error)}
        codes = sorted({code for code, _ in refused.values()})
    if args.expect_code:
        if args.expect_code not in codes:
            sys.exit(f"expected a {args.expect_code} refusal, got {refused or 'acceptance'}")
    elif refused:
        sys.exit(f"recipients refused: {refused}")
    print("refused" if refused else "sent", json.dumps({k: [c, m.decode()] for k, (c, m) in refused.items()}))


def tls_context(args):
    return ssl.create_default_context(cafile=args.cafile) if args.cafile else ssl.create_default_context()


def login(args):
    if args.ssl:
        p = poplib.POP3_SSL(args.host, args.pop3_port, timeout=30, context=tls_context(args))
    else:
        p = poplib.POP3(args.host, args.pop3_port, timeout=30)
        if args.stls:
            p.stls(context=tls_context(args))
    p.user(args.user)
    p.pass_(args.password)
    return p


def fetch(args):
    p = login(args)
    count, _ = p.stat()
    for n in range(1, count + 1):
        _, lines, _ = p.retr(n)
        sys.stdout.write(b"\n".join(lines).decode("utf-8", "replace") + "\n")
    p.quit()


def uidl(args):
    p = login(args)
    _, lines, _ = p.uidl()
    for line in lines:
        print(line.decode())
    p.quit()


def closed(args):
    """Succeeds when the port accepts no TCP connection: refused, or (behind a firewall that drops) no
    answer. A listener that accepts and then says nothing counts as open."""
    try:
        socket.create_connection((args.host, args.port), timeout=args.timeout).close()
    except (ConnectionRefusedError, TimeoutError) as e:
        print(f"closed: {args.host}:{args.port}: {e}")
        return
    sys.exit(f"{args.host}:{args.port} accepts connections")


def write_atomically(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def hammer(args):
    """Opens SMTP sessions back to back; every connection must be accepted and greeted. The progress
    file lets a test see that the load runs before, and still runs after, what it does meanwhile."""
    ok = failed = refused = 0
    errors = []
    deadline = time.time() + args.seconds
    while time.time() < deadline and not (args.stop_file and os.path.exists(args.stop_file)):
        try:
            with socket.create_connection((args.host, args.smtp_port), timeout=30) as c:
                f = c.makefile("rb")
                greeting = f.readline()
                c.sendall(b"QUIT\r\n")
                reply = f.readline()
            # 421 at QUIT is a stop reaching a safe point: the connection itself was served.
            if greeting.startswith(b"220") and reply[:3] in (b"221", b"421"):
                ok += 1
            else:
                failed += 1
                errors.append(f"{greeting!r} {reply!r}")
        except ConnectionRefusedError as e:
            refused += 1
            failed += 1
            errors.append(str(e))
        except OSError as e:
            failed += 1
            errors.append(str(e))
        if args.progress:
            write_atomically(args.progress, f"{ok}\n")
        time.sleep(0.02)
    write_atomically(args.out, json.dumps({"ok": ok, "failed": failed, "refused": refused, "errors": errors[:20]}))


def sink(args):
    """Takes one message as a receiving server would, for outbound delivery tests. Connections that
    end before a message was taken (a port probe) are ignored."""
    deadline = time.time() + args.timeout
    with socket.create_server((args.listen, args.port)) as server:
        while time.time() < deadline:
            server.settimeout(max(0.1, deadline - time.time()))
            conn, _ = server.accept()
            with conn:
                conn.settimeout(max(0.1, deadline - time.time()))
                taken = sink_session(conn)
            if taken is not None:
                write_atomically(args.out, taken)
                return
    sys.exit("no message arrived in time")


def sink_session(conn):
    """One SMTP session (no STARTTLS): the envelope lines and the message, dot-stuffing undone, or
    None when the client left before a message was complete."""
    f = conn.makefile("rb")
    conn.sendall(b"220 sink.test ESMTP\r\n")
    envelope, lines, in_data, taken = [], [], False, None
    while True:
        line = f.readline()
        if not line:
            return taken
        if in_data:
            if line == b".\r\n":
                in_data = False
                taken = "\n".join(envelope) + "\n\n" + b"".join(lines).decode(errors="replace")
                conn.sendall(b"250 2.0.0 stored\r\n")
                continue
            lines.append(line[1:] if line.startswith(b".") else line)
            continue
        verb = line[:4].upper()
        if verb in (b"EHLO", b"HELO"):
            conn.sendall(b"250-sink.test\r\n250-8BITMIME\r\n250 SIZE 10000000\r\n")
        elif verb in (b"MAIL", b"RCPT"):
            envelope.append(line.decode(errors="replace").rstrip())
            conn.sendall(b"250 2.1.0 ok\r\n")
        elif verb == b"DATA":
            in_data = True
            conn.sendall(b"354 go ahead\r\n")
        elif verb == b"QUIT":
            conn.sendall(b"221 2.0.0 bye\r\n")
            return taken
        else:
            conn.sendall(b"250 2.0.0 ok\r\n")


def dkim_verify(args):
    """An independent verifier (dkimpy), with the key from the test's DNS server rather than the host's
    resolver."""
    import dkim
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [args.dns]

    def txt(name, timeout=5):
        name = name.decode() if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(name, "TXT", lifetime=timeout)
        except Exception as e:  # dkimpy takes "no record" as an empty answer
            print(f"TXT {name}: {e}", file=sys.stderr)
            return b""
        return b"".join(answer[0].strings)

    with open(args.file, "rb") as f:
        data = f.read()
    # poplib gives lines without their CRLF; the signature covers the CRLF form.
    if b"\r\n" not in data:
        data = data.replace(b"\n", b"\r\n")
    verifier = dkim.DKIM(data)
    if not verifier.verify(dnsfunc=txt):
        sys.exit(f"DKIM verification failed: {verifier.signature_fields or 'no signature'}")
    print(f"dkim pass d={verifier.domain.decode()} s={verifier.selector.decode()}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="localhost")
    ap.add_argument("--smtp-port", type=int, default=25)
    ap.add_argument("--pop3-port", type=int, default=110)
    ap.add_argument("--cafile", help="CA certificate that signs the server's certificate")
    ap.add_argument("--ssl", action="store_true", help="implicit TLS (SMTPS 465, POP3S 995)")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("send")
    s.add_argument("--sender", required=True)
    s.add_argument("--to", action="append", required=True)
    s.add_argument("--subject", default="test")
    s.add_argument("--body", default="test body")
    s.add_argument("--expect-code", type=int)
    s.add_argument("--port", type=int, help="SMTP port (default --smtp-port)")
    s.add_argument("--starttls", action="store_true")
    s.add_argument("--login", help="USER:PASSWORD for AUTH")
    s.set_defaults(run=send)
    c = sub.add_parser("closed")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--timeout", type=float, default=5)
    c.set_defaults(run=closed)
    for name, run in (("fetch", fetch), ("uidl", uidl)):
        p = sub.add_parser(name)
        p.add_argument("--user", required=True)
        p.add_argument("--password", required=True)
        p.add_argument("--stls", action="store_true")
        p.set_defaults(run=run)
    k = sub.add_parser("sink")
    k.add_argument("--listen", required=True)
    k.add_argument("--port", type=int, required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--timeout", type=float, default=120)
    k.set_defaults(run=sink)
    d = sub.add_parser("dkim-verify")
    d.add_argument("--dns", required=True, help="the DNS server holding the public key")
    d.add_argument("file")
    d.set_defaults(run=dkim_verify)
    h = sub.add_parser("hammer")
    h.add_argument("--seconds", type=float, default=5, help="at most this long")
    h.add_argument("--out", required=True)
    h.add_argument("--stop-file", help="stop as soon as this file exists")
    h.add_argument("--progress", help="file holding the count of sessions served so far")
    h.set_defaults(run=hammer)
    args = ap.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
