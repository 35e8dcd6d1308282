#!/usr/bin/env python3
"""POP3 download and delete side by side: rustmail and Dovecot serving identical Maildirs, emptied by
`mpop` (a C client, the same for both, delivering to a Maildir on tmpfs so that the client's own writes
cost nothing), one mpop per session, all sessions at once. A figure is messages per second from the
start of the clients until the last one has quit (every message downloaded, and deleted at QUIT).
Also: PSS with 1,000 idle POP3 connections.

    cargo build --release
    benches/pop3_throughput.py                  # 1 and 16 sessions x 1,000 messages of 4 KiB, 3 alternating runs
    benches/pop3_throughput.py --smoke --bin target/debug/rustmail   # 50 messages, one session, one run

Needs root (network and mount namespaces of its own, Dovecot's users), Debian's dovecot-pop3d and mpop
(`--install` runs apt-get for them). Asserts nothing about speed; it does check that every message was
downloaded intact and that every mailbox is empty afterwards, and exits 1 if not.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import (DOMAIN, PASSWORD, REPO, ensure_debian, idle_connections, in_namespaces, median_spread, reaped_children_cpu,
                      report, sha512_crypt, work_dir)
from servers import Dovecot, Rustmail

CLIENTS = Path("/dev/shm/rustmail-bench-pop3")


def message(i: int, size: int) -> bytes:
    head = b"Return-Path: <load@client.bench.test>\nFrom: load@client.bench.test\nSubject: message %d\n\n" % i
    line = b"Line of a typical message body, long enough to look real, and then some.\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head) - 1)]
    return head + body + b"\n"


def fill_maildir(root: Path, messages: int, size: int, owner: str | None = None) -> None:
    """`messages` files in new/, named as rustmail names what it delivers (sizes in the name, which
    Dovecot reads too)."""
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True)
    for i in range(messages):
        msg = message(i, size)
        wire = len(msg) + msg.count(b"\n")
        (root / "new" / f"{1700000000 + i}.M{i:06d}P1Q{i}.bench,S={len(msg)},W={wire}").write_bytes(msg)
    if owner:
        subprocess.run(["chown", "-R", owner, str(root)], check=True)


def users_for(sessions: int) -> list[str]:
    return [f"user{i}@{DOMAIN}" for i in range(sessions)]


def mpop(server, user: str, client: Path) -> subprocess.Popen:
    for sub in ("cur", "new", "tmp"):
        (client / "Maildir" / sub).mkdir(parents=True)
    return subprocess.Popen(
        ["mpop", "--host=127.0.0.1", f"--port={server.pop3_port}", "--tls=off", "--auth=user", f"--user={user}",
         f"--passwordeval=echo {PASSWORD}", "--keep=off", "--only-new=off", "--received-header=off",
         f"--uidls-file={client / 'uidls'}", f"--delivery=maildir,{client / 'Maildir'}", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def one_run(server, sessions: int, messages: int, size: int) -> dict:
    users = users_for(sessions)
    server.prepare()
    for u in users:
        fill_maildir(server.maildir(u), messages, size)
    server.start(prepare=False)
    shutil.rmtree(CLIENTS, ignore_errors=True)
    try:
        cpu0, client0 = server.cpu(), reaped_children_cpu()
        t0 = time.perf_counter()
        clients = [mpop(server, u, CLIENTS / u) for u in users]
        outputs = [(c.wait(timeout=3600), c.stdout.read().decode(errors="replace")) for c in clients]
        elapsed = time.perf_counter() - t0
        client = reaped_children_cpu() - client0
        time.sleep(0.5)  # Dovecot's master reaps the pop3 processes (their CPU then counts through it)
        cpu = server.cpu() - cpu0
        problems = [f"{server.name}: mpop for {u} exited {rc}: {out.strip()[-300:]}"
                    for u, (rc, out) in zip(users, outputs) if rc != 0]
        downloaded = 0
        for u in users:
            got = sorted((CLIENTS / u / "Maildir" / "new").iterdir())
            downloaded += len(got)
            bodies = {p.read_bytes() for p in got}
            if bodies != {message(i, size) for i in range(messages)}:
                problems.append(f"{server.name}: {u} downloaded {len(got)} messages, not the {messages} stored")
            left = [p.name for sub in ("new", "cur") for p in (server.maildir(u) / sub).iterdir()]
            if left:
                problems.append(f"{server.name}: {len(left)} messages left in {u}'s mailbox after QUIT")
        total = sessions * messages
        return {"server": server.name, "sessions": sessions, "messages": total, "downloaded": downloaded,
                "seconds": elapsed, "msg_per_s": total / elapsed, "cpu_ms_per_msg": 1000 * cpu / total,
                "client_cpu_ms_per_msg": 1000 * client / total,
                "problems": problems}
    finally:
        server.stop()
        shutil.rmtree(CLIENTS, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="alternating runs per scenario and server (default 3)")
    ap.add_argument("--messages", type=int, default=1000, help="messages per session (default 1000)")
    ap.add_argument("--size", type=int, default=4096, help="octets per message (default 4096)")
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "rustmail"), help="the rustmail binary")
    ap.add_argument("--smoke", action="store_true", help="50 messages, one session, one run, no idle figure")
    ap.add_argument("--idle-only", action="store_true", help="only the idle-connection figure")
    ap.add_argument("--install", action="store_true", help="apt-get install dovecot-pop3d and mpop when missing")
    ap.add_argument("--json", help="also write every run to this file")
    args = ap.parse_args()
    ensure_debian({"dovecot": "dovecot-pop3d", "mpop": "mpop"}, args.install)
    in_namespaces("benches/pop3_throughput.py")
    binary = Path(args.bin)
    if not binary.is_file():
        sys.exit(f"{binary} is missing: cargo build --release (or pass --bin)")
    scenarios = [1] if args.smoke else [] if args.idle_only else [1, 16]
    runs, messages = (1, 50) if args.smoke else (args.runs, args.messages)
    work = work_dir()
    hashed = sha512_crypt(PASSWORD)
    results, problems = [], []
    try:
        for sessions in scenarios:
            users = users_for(sessions)
            servers = [Rustmail(work, binary, users, hashed), Dovecot(work, users, hashed)]
            for _ in range(runs):
                for server in servers:  # alternating, so that a slow moment hits both
                    res = one_run(server, sessions, messages, args.size)
                    results.append(res)
                    problems += res["problems"]
                    print(f"  {server.name:9} {sessions:>2} x {messages}: {res['msg_per_s']:8.0f} msg/s "
                          f"({res['downloaded']}/{res['messages']} downloaded, "
                          f"{res['cpu_ms_per_msg']:.3f} ms CPU/msg, "
                          f"mpop {res['client_cpu_ms_per_msg']:.3f})", flush=True)
        print()
        print(f"{'scenario':26} {'rustmail msg/s':>20} {'dovecot msg/s':>20} {'ratio':>6} {'CPU ms/msg r/d':>15} {'mpop ms/msg r/d':>16}")
        for sessions in scenarios:
            def pick(name, key="msg_per_s"):
                return [x[key] for x in results if x.get("sessions") == sessions and x["server"] == name]
            r, d = pick("rustmail"), pick("dovecot")
            print(f"{sessions:>2} x {messages} x {args.size // 1024} KiB {'':9} {median_spread(r):>20} "
                  f"{median_spread(d):>20} {statistics.median(r) / statistics.median(d):>5.2f}x "
                  f"{statistics.median(pick('rustmail', 'cpu_ms_per_msg')):>7.3f}/"
                  f"{statistics.median(pick('dovecot', 'cpu_ms_per_msg')):.3f} "
                  f"{statistics.median(pick('rustmail', 'client_cpu_ms_per_msg')):>9.3f}/"
                  f"{statistics.median(pick('dovecot', 'client_cpu_ms_per_msg')):.3f}")
        if not args.smoke:
            print()
            print(f"{'1,000 idle POP3 connections':30} {'greeted':>8} {'PSS before':>11} {'PSS with them':>14} "
                  f"{'processes':>10}")
            users = users_for(1)
            for server in (Rustmail(work, binary, users, hashed), Dovecot(work, users, hashed)):
                res = idle_connections(server, "pop3_port", b"+OK")
                results.append(res)
                print(f"{server.name:30} {res['greeted']:>8} {res['pss_kib_before'] / 1024:>9.1f} MiB"
                      f" {res['pss_kib'] / 1024:>11.1f} MiB {res['processes']:>10}")
                if res["greeted"] != 1000:
                    problems.append(f"{server.name}: {res['greeted']} of 1000 idle connections greeted")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report(problems, results, args.json)


if __name__ == "__main__":
    sys.exit(main())
