#!/usr/bin/env python3
"""Measures POP3 on a large mailbox: login (scan + moving new/ to cur/), STAT, LIST, UIDL, and RETR of
every message, with poplib against the release binary.

  cargo build --release && python3 benches/pop3_large_mailbox.py [--messages 10000] [--foreign]

The Maildir is written directly (much faster than delivering 10,000 messages over SMTP): with rustmail's
own file names (sizes in the name), or with --foreign, names as other delivery agents write them, so
that the sizes must be computed by reading every file. Prints one line of figures; asserts nothing.
"""

import argparse
import os
import poplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--foreign", action="store_true")
    ap.add_argument("--binary", default=str(REPO / "target/release/rustmail"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rustmail-bench-"))
    maildir = work / "state/mail/example.test/alice"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    body = b"".join(b"Line %d of a typical message body, long enough to look real.\n" % i for i in range(60))
    total = 0
    for i in range(args.messages):
        msg = b"Return-Path: <a@remote.test>\nSubject: message %d\n\n" % i + body
        base = f"{1700000000 + i}.M{i:06d}P1Q{i}.bench"
        wire = len(msg) + msg.count(b"\n")
        name = base if args.foreign else f"{base},S={len(msg)},W={wire}"
        (maildir / "new" / name).write_bytes(msg)
        total += wire

    hashed = subprocess.run([args.binary, "hash-password"], input=b"pw\n", capture_output=True, check=True).stdout.decode().strip()
    smtp, pop3 = free_port(), free_port()
    (work / "c.toml").write_text(f"""hostname = "mx.test"
domains = ["example.test"]
storage_root = "{work / 'state'}"
[listen]
smtp = ["127.0.0.1:{smtp}"]
pop3 = ["127.0.0.1:{pop3}"]
[accounts."alice@example.test"]
password_hash = "{hashed}"
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUSTMAIL_")}
    server = subprocess.Popen([args.binary, "serve", "--config", str(work / "c.toml")],
                              stderr=subprocess.DEVNULL, env=env)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", pop3)).close()
                break
            except OSError:
                time.sleep(0.02)
        figures = {}
        for run in ("first login (moves new/ to cur/)", "second login"):
            t0 = time.perf_counter()
            p = poplib.POP3("127.0.0.1", pop3)
            p.user("alice@example.test")
            p.pass_("pw")
            t1 = time.perf_counter()
            count, octets = p.stat()
            _, listing, _ = p.list()
            _, uids, _ = p.uidl()
            t2 = time.perf_counter()
            figures[run] = (t1 - t0, t2 - t1)
            if run == "second login":
                got = 0
                t3 = time.perf_counter()
                for n in range(1, count + 1):
                    got += p.retr(n)[2]
                figures["retr"] = time.perf_counter() - t3
            p.quit()
        assert count == args.messages and octets == total and len(listing) == len(uids) == count
        kind = "foreign names (sizes read from files)" if args.foreign else "rustmail names (sizes in names)"
        first, second = figures["first login (moves new/ to cur/)"], figures["second login"]
        print(f"{args.messages} messages, {octets / 1e6:.1f} MB, {kind}: "
              f"login {first[0] * 1000:.0f} ms first / {second[0] * 1000:.0f} ms again "
              f"(argon2 included), STAT+LIST+UIDL {second[1] * 1000:.0f} ms, "
              f"RETR all {figures['retr']:.2f} s ({octets / 1e6 / figures['retr']:.0f} MB/s)")
    finally:
        server.terminate()
        server.wait()
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    sys.exit(main())
