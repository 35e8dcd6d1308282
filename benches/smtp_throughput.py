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
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOMAIN = "bench.test"
USER = f"user@{DOMAIN}"
WORK_PARENT = "/var/lib/rustmail-bench"
SCENARIOS = [  # (message size in octets, parallel connections)
    (4096, 1), (4096, 16), (4096, 64), (102400, 1), (102400, 16), (102400, 64),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listens on 127.0.0.1:{port}")
            time.sleep(0.02)


def count_files(d: Path) -> int:
    try:
        return sum(1 for _ in os.scandir(d))
    except FileNotFoundError:
        return 0


def cpu_seconds(pids: list[int], children: bool = False) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks = int(fields[11]) + int(fields[12])
        if children:
            ticks += int(fields[13]) + int(fields[14])
        total += ticks / os.sysconf("SC_CLK_TCK")
    return total


class Rustmail:
    name = "rustmail"

    def __init__(self, work: Path, binary: Path) -> None:
        self.work, self.binary = work / "rustmail", binary
        self.proc = None

    def start(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.port = free_port()
        hashed = subprocess.run([str(self.binary), "hash-password"], input=b"bench-password\n",
                                capture_output=True, check=True).stdout.decode().split()[-1]
        config = self.work / "rustmail.toml"
        config.write_text(f"""hostname = "mx.{DOMAIN}"
domains = ["{DOMAIN}"]
storage_root = "{self.work / 'state'}"
[listen]
smtp = ["127.0.0.1:{self.port}"]
pop3 = []
[limits]
max_connections = 1100
max_connections_per_ip = 1100
[accounts."{USER}"]
password_hash = "{hashed}"
""")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUSTMAIL_")}
        env["RUST_LOG"] = "warn"
        self.log = open(self.work / "server.log", "wb")
        self.proc = subprocess.Popen([str(self.binary), "serve", "--config", str(config)],
                                     stdout=self.log, stderr=self.log, env=env)
        wait_port(self.port)

    @property
    def maildir_new(self) -> Path:
        return self.work / "state" / "mail" / DOMAIN / "user" / "new"

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.log.close()


class Postfix:
    """A Postfix instance of its own: smtpd on one loopback port, virtual(8) delivering to a Maildir as
    nobody, no chroot, every other daemon as Debian ships it. Postfix fsyncs the queue file before its
    250, and virtual(8) fsyncs the Maildir file before it reports the delivery."""

    name = "postfix"

    def __init__(self, work: Path) -> None:
        self.work = work / "postfix"

    def start(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        etc = self.work / "etc"
        shutil.copytree("/etc/postfix", etc, symlinks=True)
        (etc / "main.cf").unlink(missing_ok=True)
        self.port = free_port()
        master = []
        for line in (etc / "master.cf").read_text().splitlines():
            fields = line.split()
            if line[:1] not in ("#", " ", "\t", "") and len(fields) >= 8:
                if fields[0] == "smtp" and fields[1] == "inet":
                    fields[0] = f"127.0.0.1:{self.port}"
                fields[4] = "n"  # no chroot: the queue is outside /var/spool/postfix
                line = "  ".join(fields)
            master.append(line)
        (etc / "master.cf").write_text("\n".join(master) + "\n")
        for d in ("spool", "data"):
            (self.work / d).mkdir()
        shutil.chown(self.work / "data", "postfix", "postfix")
        mail = self.work / "mail"
        mail.mkdir(parents=True)
        shutil.chown(mail, "nobody", "nogroup")
        os.chmod(self.work, 0o755)
        (etc / "main.cf").write_text(f"""compatibility_level = 3.6
myhostname = mx.{DOMAIN}
mydomain = {DOMAIN}
myorigin = {DOMAIN}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
queue_directory = {self.work / 'spool'}
data_directory = {self.work / 'data'}
maillog_file = {self.work / 'maillog'}
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {mail}
virtual_mailbox_maps = inline:{{ {USER}={DOMAIN}/user/ }}
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
virtual_minimum_uid = 1
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
default_process_limit = 1100
biff = no
""")
        # The machine's /etc/postfix stays as it is: this mount namespace sees ours there.
        subprocess.run(["mount", "--bind", str(etc), "/etc/postfix"], check=True)
        started = subprocess.run(["postfix", "start"], capture_output=True, text=True)
        if started.returncode != 0:
            raise SystemExit(f"postfix start failed: {started.stdout}{started.stderr}")
        wait_port(self.port)

    @property
    def maildir_new(self) -> Path:
        return self.work / "mail" / DOMAIN / "user" / "new"

    def pids(self) -> list[int]:
        """The master and its children (each daemon's CPU, and the reaped ones' through the master)."""
        master = int((self.work / "spool" / "pid" / "master.pid").read_text().split()[0])
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True)
        return [master] + [int(p) for p in out.stdout.split()]

    def cpu(self) -> float:
        pids = self.pids()
        return cpu_seconds(pids[:1], children=True) + cpu_seconds(pids[1:])

    def stop(self) -> None:
        subprocess.run(["postfix", "stop"], capture_output=True)
        subprocess.run(["umount", "/etc/postfix"], capture_output=True)


class Sink:
    """smtp-sink: answers everything, stores nothing; the ceiling of what smtp-source can send."""

    name = "smtp-sink"
    maildir_new = None

    def __init__(self, work: Path) -> None:
        self.proc = None

    def start(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{self.port}", "256"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def cpu(self) -> float:
        return cpu_seconds([self.proc.pid])

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def one_run(server, size: int, sessions: int, messages: int) -> dict:
    server.start()
    try:
        before = count_files(server.maildir_new) if server.maildir_new else 0
        cpu0 = server.cpu()
        t0 = time.perf_counter()
        src = subprocess.run(["smtp-source", "-d", "-s", str(sessions), "-m", str(messages), "-l", str(size),
                              "-f", f"load@client.{DOMAIN}", "-t", USER, "-M", f"client.{DOMAIN}",
                              f"127.0.0.1:{server.port}"], capture_output=True, text=True, timeout=3600)
        sent = time.perf_counter() - t0
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
                "cpu_ms_per_msg": 1000 * cpu / messages}
    finally:
        server.stop()


def pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def idle_run(server, connections: int) -> dict:
    """Opens `connections` idle SMTP connections (5 per source address, so that no per-address limit
    applies), waits for the greetings that come, and reads the proportional set size of every process
    of the server."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    server.start()
    socks = []
    try:
        base = pss_kib(server.pids())
        for i in range(connections):
            s = socket.socket()
            s.bind((f"127.9.{i // 5 // 250}.{1 + (i // 5) % 250}", 0))
            s.connect(("127.0.0.1", server.port))
            socks.append(s)
        greeted = 0
        for s in socks:
            s.settimeout(5)
            try:
                greeted += s.recv(512).startswith(b"220")
            except OSError:
                pass
        pss = pss_kib(server.pids())
        return {"server": server.name, "connections": connections, "greeted": greeted,
                "pss_kib_before": base, "pss_kib": pss, "processes": len(server.pids())}
    finally:
        for s in socks:
            s.close()
        server.stop()


def in_namespaces() -> None:
    """Re-executes this script in network and mount namespaces of its own, with loopback up."""
    if os.environ.get("RUSTMAIL_BENCH_NS") == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    if os.geteuid() != 0:
        sys.exit("benches/smtp_throughput.py needs root (namespaces, mount, postfix)")
    env = dict(os.environ, RUSTMAIL_BENCH_NS="1")
    os.execvpe("unshare", ["unshare", "--net", "--mount", "--propagation", "private", "--",
                           sys.executable, *sys.argv], env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="alternating runs per scenario and server (default 3)")
    ap.add_argument("--messages", type=int, default=5000, help="messages per run (default 5000)")
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "rustmail"), help="the rustmail binary")
    ap.add_argument("--smoke", action="store_true", help="200 messages, 16 connections, one run")
    ap.add_argument("--install", action="store_true", help="apt-get install postfix when it is missing")
    ap.add_argument("--json", help="also write every run to this file")
    args = ap.parse_args()
    if shutil.which("smtp-source") is None:
        if not args.install:
            sys.exit("smtp-source is missing: apt-get install postfix (or pass --install)")
        subprocess.run("echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections"
                       " && apt-get install -y -q --no-install-recommends postfix", shell=True, check=True)
    in_namespaces()
    binary = Path(args.bin)
    if not binary.is_file():
        sys.exit(f"{binary} is missing: cargo build --release (or pass --bin)")
    scenarios = [(4096, 16)] if args.smoke else SCENARIOS
    runs, messages = (1, 200) if args.smoke else (args.runs, args.messages)
    # Not under /tmp: `postfix check` refuses a queue below a world-writable directory (silently: it
    # says so only to syslog).
    Path(WORK_PARENT).mkdir(mode=0o755, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=WORK_PARENT))
    os.chmod(work, 0o755)
    servers = [Rustmail(work, binary), Postfix(work), Sink(work)]
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
                      f"({res['arrived']}/{messages} arrived, {res['cpu_ms_per_msg']:.2f} ms CPU/msg)", flush=True)
                if res["arrived"] != messages:
                    problems.append(f"{server.name}: {res['arrived']} of {messages} arrived")
    print()
    print(f"{'scenario':18} {'rustmail msg/s':>16} {'postfix msg/s':>16} {'smtp-sink':>10} {'ratio':>6} "
          f"{'of sink':>8} {'CPU ms/msg r/p':>15}")
    for size, sessions in scenarios:
        def pick(name, key="msg_per_s"):
            return [x[key] for x in results if x["server"] == name and x["size"] == size and x["sessions"] == sessions]
        r, p, s = pick("rustmail"), pick("postfix"), pick("smtp-sink")
        fmt = lambda v: f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})"  # noqa: E731
        print(f"{size // 1024:>4} KiB x {sessions:>2} conn  {fmt(r):>16} {fmt(p):>16} {statistics.median(s):>10.0f} "
              f"{statistics.median(r) / statistics.median(p):>5.2f}x {100 * statistics.median(r) / statistics.median(s):>7.0f}% "
              f"{statistics.median(pick('rustmail', 'cpu_ms_per_msg')):>7.2f}/"
              f"{statistics.median(pick('postfix', 'cpu_ms_per_msg')):.2f}")
    if not args.smoke:
        print()
        print(f"{'1,000 idle SMTP connections':30} {'greeted':>8} {'PSS before':>11} {'PSS with them':>14} {'processes':>10}")
        for server in servers[:2]:
            res = idle_run(server, 1000)
            results.append(res)
            print(f"{server.name:30} {res['greeted']:>8} {res['pss_kib_before'] / 1024:>9.1f} MiB"
                  f" {res['pss_kib'] / 1024:>11.1f} MiB {res['processes']:>10}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
