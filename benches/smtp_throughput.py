#!/usr/bin/env python3
"""SMTP receipt side by side: rustmail and Postfix as equivalent local servers (accept for one local
domain, store durably in a Maildir), driven by Postfix's `smtp-source`, with `smtp-sink` (which stores
nothing) as the ceiling. Each figure is messages per second from the first connection until the last
message is a file in the Maildir's new/.

    cargo build --release
    benches/smtp_throughput.py                        # every scenario, 3 alternating runs each
    benches/smtp_throughput.py --runs 5 --messages 5000
    benches/smtp_throughput.py --smoke                # 200 messages, one scenario, one run: does it work

Needs root: it runs in network and mount namespaces of its own (`unshare`), on loopback only, where the
Postfix instance's configuration directory is bind-mounted over /etc/postfix (so the machine's Postfix,
if any, is untouched). Needs Debian's postfix (smtp-source, smtp-sink, the daemons); with `--install` it
runs `apt-get install postfix` when they are missing. Prints a table of medians, the spread (min-max),
and ratios; with --json FILE also writes the raw runs. Asserts nothing about speed; it does check that
every message arrived, and exits 1 if one did not.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import (DOMAIN, PASSWORD, REPO, count_files, ensure_debian, idle_connections, in_namespaces, reaped_children_cpu,
                      report, sha512_crypt, work_dir)
from servers import USER, Postfix, Rustmail, Sink

SCENARIOS = [  # (message size in octets, parallel connections)
    (4096, 1), (4096, 16), (4096, 64), (102400, 1), (102400, 16), (102400, 64),
]


def one_run(server, size: int, sessions: int, messages: int) -> dict:
    server.start()
    try:
        before = count_files(server.maildir_new) if server.maildir_new else 0
        cpu0, client0 = server.cpu(), reaped_children_cpu()
        t0 = time.perf_counter()
        src = subprocess.run(["smtp-source", "-d", "-s", str(sessions), "-m", str(messages), "-l", str(size),
                              "-f", f"load@client.{DOMAIN}", "-t", USER, "-M", f"client.{DOMAIN}",
                              f"127.0.0.1:{server.port}"], capture_output=True, text=True, timeout=3600)
        sent = time.perf_counter() - t0
        client = reaped_children_cpu() - client0
        if src.returncode != 0:
            raise SystemExit(f"smtp-source against {server.name} failed: {src.stderr[-500:]}")
        arrived = messages
        if server.maildir_new is not None:
            deadline = time.monotonic() + 120
            while (arrived := count_files(server.maildir_new) - before) < messages and time.monotonic() < deadline:
                time.sleep(0.005)
        elapsed = time.perf_counter() - t0
        cpu = server.cpu() - cpu0
        return {"server": server.name, "size": size, "sessions": sessions, "messages": messages,
                "arrived": arrived, "seconds": elapsed, "sent_seconds": sent, "msg_per_s": messages / elapsed,
                "cpu_ms_per_msg": 1000 * cpu / messages, "client_cpu_ms_per_msg": 1000 * client / messages}
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="alternating runs per scenario and server (default 3)")
    ap.add_argument("--messages", type=int, default=5000, help="messages per run (default 5000)")
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "rustmail"), help="the rustmail binary")
    ap.add_argument("--smoke", action="store_true", help="200 messages, 16 connections, one run")
    ap.add_argument("--idle-only", action="store_true", help="only the idle-connection figure")
    ap.add_argument("--install", action="store_true", help="apt-get install postfix when it is missing")
    ap.add_argument("--json", help="also write every run to this file")
    args = ap.parse_args()
    ensure_debian({"smtp-source": "postfix"}, args.install,
                  preseed="postfix postfix/main_mailer_type select No configuration")
    in_namespaces("benches/smtp_throughput.py")
    binary = Path(args.bin)
    if not binary.is_file():
        sys.exit(f"{binary} is missing: cargo build --release (or pass --bin)")
    scenarios = [(4096, 16)] if args.smoke else [] if args.idle_only else SCENARIOS
    runs, messages = (1, 200) if args.smoke else (args.runs, args.messages)
    work = work_dir()
    servers = [Rustmail(work, binary, [USER], sha512_crypt(PASSWORD)), Postfix(work), Sink(work)]
    results = []
    problems = []
    try:
        return measure(args, servers, scenarios, runs, messages, results, problems)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args, servers, scenarios, runs, messages, results, problems) -> int:
    for size, sessions in scenarios:
        for r in range(runs):
            for server in servers:  # alternating, so that a slow moment hits every server
                res = one_run(server, size, sessions, messages)
                results.append(res)
                print(f"  {server.name:9} {size // 1024:>4} KiB x {sessions:>2}: {res['msg_per_s']:8.0f} msg/s "
                      f"({res['arrived']}/{messages} arrived, {res['cpu_ms_per_msg']:.2f} ms CPU/msg, "
                      f"smtp-source {res['client_cpu_ms_per_msg']:.2f})", flush=True)
                if res["arrived"] != messages:
                    problems.append(f"{server.name}: {res['arrived']} of {messages} arrived")
    print()
    print(f"{'scenario':18} {'rustmail msg/s':>16} {'postfix msg/s':>16} {'smtp-sink':>10} {'ratio':>6} "
          f"{'of sink':>8} {'CPU ms/msg r/p':>15} {'smtp-source ms/msg r/p':>23}")
    for size, sessions in scenarios:
        def pick(name, key="msg_per_s"):
            return [x[key] for x in results if x["server"] == name and x["size"] == size and x["sessions"] == sessions]
        r, p, s = pick("rustmail"), pick("postfix"), pick("smtp-sink")
        fmt = lambda v: f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})"  # noqa: E731
        print(f"{size // 1024:>4} KiB x {sessions:>2} conn  {fmt(r):>16} {fmt(p):>16} {statistics.median(s):>10.0f} "
              f"{statistics.median(r) / statistics.median(p):>5.2f}x {100 * statistics.median(r) / statistics.median(s):>7.0f}% "
              f"{statistics.median(pick('rustmail', 'cpu_ms_per_msg')):>7.2f}/"
              f"{statistics.median(pick('postfix', 'cpu_ms_per_msg')):.2f} "
              f"{statistics.median(pick('rustmail', 'client_cpu_ms_per_msg')):>15.2f}/"
              f"{statistics.median(pick('postfix', 'client_cpu_ms_per_msg')):.2f}")
    if not args.smoke:
        print()
        print(f"{'1,000 idle SMTP connections':30} {'greeted':>8} {'PSS before':>11} {'PSS with them':>14} {'processes':>10}")
        for server in servers[:2]:
            res = idle_connections(server, "port", b"220")
            results.append(res)
            print(f"{server.name:30} {res['greeted']:>8} {res['pss_kib_before'] / 1024:>9.1f} MiB"
                  f" {res['pss_kib'] / 1024:>11.1f} MiB {res['processes']:>10}")
    return report(problems, results, args.json)


if __name__ == "__main__":
    sys.exit(main())
