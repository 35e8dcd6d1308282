#!/usr/bin/env python3
"""A mail client for the system tests (NixOS VM tests and their nspawn twins), standard library only.

  mailclient --host H send --sender A --to B [--to C] --subject S --body TEXT [--expect-code N]
             [--port 587 --starttls | --port 465 --ssl] [--login USER:PASSWORD] [--cafile CERT]
  mailclient --host H fetch --user U --password P [--stls | --ssl --pop3-port 995] [--cafile CERT]
                                                            print every message (RETR), one after another
  mailclient --host H uidl --user U --password P           print "n uid" lines
  mailclient --host H hammer --seconds N --out FILE        connect/QUIT in a loop, write counts as JSON

Exit status 0 when the exchange went as expected, 1 otherwise (with the reason on stderr).
"""

import argparse
import json
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


def hammer(args):
    """Opens SMTP sessions back to back; every connection must be accepted and greeted."""
    ok = failed = 0
    errors = []
    deadline = time.time() + args.seconds
    while time.time() < deadline:
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
        except OSError as e:
            failed += 1
            errors.append(str(e))
        time.sleep(0.02)
    with open(args.out, "w") as f:
        json.dump({"ok": ok, "failed": failed, "errors": errors[:20]}, f)


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
    for name, run in (("fetch", fetch), ("uidl", uidl)):
        p = sub.add_parser(name)
        p.add_argument("--user", required=True)
        p.add_argument("--password", required=True)
        p.add_argument("--stls", action="store_true")
        p.set_defaults(run=run)
    h = sub.add_parser("hammer")
    h.add_argument("--seconds", type=float, default=5)
    h.add_argument("--out", required=True)
    h.set_defaults(run=hammer)
    args = ap.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
