#!/usr/bin/env python3
"""POP3 on a large mailbox, rustmail side by side with Dovecot: login (with the first-login work of each:
rustmail moves new/ to cur/, Dovecot builds its index), STAT+LIST+UIDL, and RETR of every message, with
poplib, on identical copies of one Maildir and the same SHA-512-crypt password hash.

  cargo build --release
  apt-get install dovecot-pop3d        # optional: without it only rustmail is measured
  python3 benches/pop3_large_mailbox.py [--messages 10000] [--foreign] [--runs 3]

The Maildir is written directly (faster than 10,000 SMTP deliveries): with rustmail's file names (sizes in
the name) or, with --foreign, names as other delivery agents write them, so that sizes must be read from
the files. Prints the median of each figure and the ratio rustmail/Dovecot (below 1: rustmail is faster).
Asserts nothing about speed; it does check that both servers list the same messages and octets.
"""

import argparse
import poplib
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchlib import PASSWORD, REPO, sha512_crypt, work_dir
from servers import USER, Dovecot, Rustmail

def write_maildir(root: Path, messages: int, foreign: bool) -> int:
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True)
    body = b"".join(b"Line %d of a typical message body, long enough to look real.\n" % i for i in range(60))
    total = 0
    for i in range(messages):
        msg = b"Return-Path: <a@remote.test>\nSubject: message %d\n\n" % i + body
        wire = len(msg) + msg.count(b"\n")
        base = f"{1700000000 + i}.M{i:06d}P1Q{i}.bench"
        (root / "new" / (base if foreign else f"{base},S={len(msg)},W={wire}")).write_bytes(msg)
        total += wire
    return total


def session(port):
    """One POP3 session: (login s, STAT+LIST+UIDL s, RETR all s, count, octets)."""
    t0 = time.perf_counter()
    p = poplib.POP3("127.0.0.1", port)
    p.user(USER)
    p.pass_(PASSWORD)
    t1 = time.perf_counter()
    count, octets = p.stat()
    listing, uids = p.list()[1], p.uidl()[1]
    assert len(listing) == len(uids) == count
    t2 = time.perf_counter()
    for n in range(1, count + 1):
        p.retr(n)
    t3 = time.perf_counter()
    p.quit()
    return t1 - t0, t2 - t1, t3 - t2, count, octets


def measure(port, runs):
    first = session(port)
    later = [session(port) for _ in range(runs)]
    return {
        "first login": first[0],
        "login": statistics.median(r[0] for r in later),
        "STAT+LIST+UIDL": statistics.median(r[1] for r in later),
        "RETR all": statistics.median(r[2] for r in later),
        "count": first[3],
        "octets": first[4],
    }


def run_rustmail(work, maildir_src, hashed, binary, runs):
    server = Rustmail(work, Path(binary), [USER], hashed)
    server.prepare()
    shutil.copytree(maildir_src, server.maildir(USER))
    server.start(prepare=False)
    try:
        return measure(server.pop3_port, runs)
    finally:
        server.stop()


def run_dovecot(work, maildir_src, hashed, runs):
    if shutil.which("dovecot") is None:
        return None
    server = Dovecot(work, [USER], hashed)
    server.prepare()
    shutil.copytree(maildir_src, server.maildir(USER))
    server.start(prepare=False)
    try:
        return measure(server.pop3_port, runs)
    finally:
        server.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--foreign", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--binary", default=str(REPO / "target/release/rustmail"))
    args = ap.parse_args()

    work = work_dir()
    try:
        total = write_maildir(work / "source", args.messages, args.foreign)
        # The same SHA-512-crypt hash for both servers, so that password checking costs the same.
        hashed = sha512_crypt(PASSWORD)
        ours = run_rustmail(work, work / "source", hashed, args.binary, args.runs)
        theirs = run_dovecot(work, work / "source", hashed, args.runs)
        kind = "foreign names (sizes read from files)" if args.foreign else "rustmail names (sizes in names)"
        print(f"POP3, {args.messages} messages, {total / 1e6:.1f} MB, {kind}, median of {args.runs}:")
        for key in ("first login", "login", "STAT+LIST+UIDL", "RETR all"):
            line = f"  {key:15} rustmail {ours[key] * 1000:8.1f} ms"
            if theirs:
                line += f"   dovecot {theirs[key] * 1000:8.1f} ms   ratio {ours[key] / theirs[key]:.2f}"
            print(line)
        assert ours["count"] == args.messages and ours["octets"] == total, ours
        if theirs:
            assert (theirs["count"], theirs["octets"]) == (ours["count"], ours["octets"]), (theirs, ours)
        else:
            print("  (dovecot not installed: apt-get install dovecot-pop3d for the comparison)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
