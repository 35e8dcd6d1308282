#!/usr/bin/env python3
"""What a server costs besides throughput, rustmail side by side with Postfix (SMTP) and Dovecot (POP3):

- start-up: exec until `READY=1` (rustmail, through a NOTIFY_SOCKET of our own) and until the first
  greeting on a fresh connection (every server; for Postfix from `postfix start`, for Dovecot from
  `dovecot`);
- a 50 MiB message in over SMTP and out over POP3: the peak resident memory (VmHWM) of the processes
  that handled it (rustmail: its one process; Postfix: smtpd, cleanup and virtual, summed, each with its
  own copy of the libraries in its RSS; Dovecot: the pop3 process and its login process, summed);
- fsync calls per message (fsync, fdatasync, sync_file_range, syncfs), counted by `strace -f` over 200
  messages sent by `smtp-source` (rustmail and Postfix).

    cargo build --release
    benches/footprint.py                         # 5 start-ups each, one 50 MiB message, 200 messages under strace
    benches/footprint.py --smoke --bin target/debug/rustmail   # 1 start-up, a 1 MiB message, 20 messages

Needs root, Postfix, Dovecot (dovecot-pop3d) and strace (`--install`); runs in namespaces of its own.
Asserts nothing about speed or size; it does check that the message came through intact.
"""

from __future__ import annotations

import argparse
import poplib
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import DOMAIN, PASSWORD, REPO, ensure_debian, in_namespaces, peak_rss_kib, report, sha512_crypt, work_dir
from servers import USER, Dovecot, Postfix, Rustmail


def greeting_after(port: int, t0: float, timeout: float = 30) -> float:
    """Seconds from `t0` until a connection to `port` reads a greeting (220 or +OK)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                if s.recv(512)[:3] in (b"220", b"+OK"):
                    return time.perf_counter() - t0
        except OSError:
            time.sleep(0.0005)
    raise SystemExit(f"no greeting on {port} within {timeout} s")


def rustmail_startup(server: Rustmail) -> dict:
    server.prepare()
    with tempfile.TemporaryDirectory() as d:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = f"{d}/notify"
        notify.bind(path)
        notify.settimeout(30)
        t0 = time.perf_counter()
        server.start(prepare=False, env_extra={"NOTIFY_SOCKET": path}, wait=False)
        try:
            while b"READY=1" not in notify.recv(4096):
                pass
            ready = time.perf_counter() - t0
            greeting = greeting_after(server.port, t0)
        finally:
            server.stop()
            notify.close()
    return {"server": "rustmail", "ready_ms": 1000 * ready, "greeting_ms": 1000 * greeting}


def peer_startup(server, port_attr: str) -> dict:
    server.prepare()
    t0 = time.perf_counter()
    server.start(prepare=False, wait=False)
    try:
        greeting = greeting_after(getattr(server, port_attr), t0)
    finally:
        server.stop()
    return {"server": server.name, "greeting_ms": 1000 * greeting}


def big_message(size: int) -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 +/=-_.:;\r\n"
    head = f"From: load@client.{DOMAIN}\r\nTo: {USER}\r\nSubject: {size // 2**20} MiB\r\n\r\n".encode()
    return head + line * ((size - len(head)) // len(line))


def send(port: int, msg: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=300) as s:
        s.sendmail(f"load@client.{DOMAIN}", [USER], msg)


def fetch(port: int, during=None) -> tuple[bytes, int]:
    """RETR 1 + DELE 1; `during()` is read before QUIT (while the server side is still alive)."""
    p = poplib.POP3("127.0.0.1", port, timeout=300)
    p._max_line = 1 << 20  # noqa: SLF001 - poplib's per-line limit is 2 KiB by default
    p.user(USER)
    p.pass_(PASSWORD)
    _, lines, _ = p.retr(1)
    p.dele(1)
    seen = during() if during else 0
    p.quit()
    return b"\r\n".join(lines) + b"\r\n", seen


def body_of(stored: bytes) -> bytes:
    """The body, as CRLF (servers add trace and missing headers, and store LF or CRLF)."""
    text = stored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return text[text.index(b"\r\n\r\n"):]


def large_rustmail(server: Rustmail, msg: bytes) -> dict:
    server.start()
    try:
        send(server.port, msg)
        after_in = peak_rss_kib(server.proc.pid)
        got, _ = fetch(server.pop3_port)
        after_out = peak_rss_kib(server.proc.pid)
        intact = body_of(got) == body_of(msg)
        return {"server": "rustmail", "in_peak_kib": after_in, "out_peak_kib": after_out, "intact": intact}
    finally:
        server.stop()


HANDLERS = ("smtpd", "cleanup", "virtual")  # the Postfix daemons a message passes through


def postfix_peak(postfix) -> dict[str, int]:
    """VmHWM of the Postfix daemons that handled the message, by name (the largest of each kind)."""
    peaks: dict[str, int] = {}
    for pid in postfix.pids()[1:]:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except FileNotFoundError:
            continue
        if name in HANDLERS:
            peaks[name] = max(peaks.get(name, 0), peak_rss_kib(pid))
    return peaks


def large_postfix(postfix, msg: bytes) -> dict:
    postfix.start()
    try:
        with smtplib.SMTP("127.0.0.1", postfix.port, timeout=300) as s:
            s.sendmail(f"load@client.{DOMAIN}", [USER], msg)
            deadline = time.monotonic() + 120
            while not list(postfix.maildir_new.glob("*")) and time.monotonic() < deadline:
                time.sleep(0.05)
            peaks = postfix_peak(postfix)  # smtpd is still in this session; cleanup, qmgr and virtual idle
        (stored,) = list(postfix.maildir_new.glob("*"))
        intact = body_of(stored.read_bytes()) == body_of(msg)
        return {"server": "postfix", "in_peak_kib": sum(peaks.values()), "in_peaks": peaks, "intact": intact}
    finally:
        postfix.stop()


def large_dovecot(dovecot, msg: bytes) -> dict:
    dovecot.prepare()
    md = dovecot.maildir(USER)
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True)
    stored = msg.replace(b"\r\n", b"\n")
    (md / "new" / f"1700000000.M1P1Q1.bench,S={len(stored)},W={len(msg)}").write_bytes(stored)
    dovecot.start(prepare=False)
    try:
        def peaks():
            return sum(peak_rss_kib(pid) for pid in dovecot.pids()[1:]
                       if Path(f"/proc/{pid}/comm").read_text().strip() in ("pop3", "pop3-login"))
        got, peak = fetch(dovecot.pop3_port, during=peaks)
        return {"server": "dovecot", "out_peak_kib": peak, "intact": body_of(got) == body_of(msg)}
    finally:
        dovecot.stop()


SYNC_CALLS = "fsync,fdatasync,sync_file_range,syncfs"


def fsyncs(server, pids: list[int], maildir_new: Path, messages: int) -> dict:
    """strace -f on the server's processes while smtp-source sends `messages` 4 KiB messages over 4
    connections; the sync calls per message until every message is in the Maildir."""
    with tempfile.NamedTemporaryFile(suffix=".strace") as out:
        attach = [a for pid in pids for a in ("-p", str(pid))]
        strace = subprocess.Popen(["strace", "-f", "-qq", "-c", "-e", f"trace={SYNC_CALLS}", "-o", out.name,
                                   *attach], stderr=subprocess.DEVNULL)
        time.sleep(1)  # attached
        subprocess.run(["smtp-source", "-d", "-s", "4", "-m", str(messages), "-l", "4096",
                        "-f", f"load@client.{DOMAIN}", "-t", USER, "-M", f"client.{DOMAIN}",
                        f"127.0.0.1:{server.port}"], check=True, capture_output=True, timeout=600)
        deadline = time.monotonic() + 120
        while sum(1 for _ in maildir_new.iterdir()) < messages and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)  # the last deliveries' bookkeeping
        strace.send_signal(2)
        strace.wait(timeout=30)
        # strace -c: "% time  seconds  usecs/call  calls  [errors]  syscall", one line per call.
        counts = {fields[-1]: int(fields[3]) for line in Path(out.name).read_text().splitlines()
                  if len(fields := line.split()) >= 5 and fields[-1] in SYNC_CALLS.split(",")}
        return {"server": server.name, "messages": messages, "sync_calls": counts,
                "per_message": sum(counts.values()) / messages}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "rustmail"), help="the rustmail binary")
    ap.add_argument("--startups", type=int, default=5, help="start-ups per server (default 5)")
    ap.add_argument("--large-mib", type=int, default=50, help="size of the large message (default 50 MiB)")
    ap.add_argument("--smoke", action="store_true", help="1 start-up, a 1 MiB message, 20 messages")
    ap.add_argument("--install", action="store_true", help="apt-get install postfix, dovecot-pop3d, strace")
    ap.add_argument("--json", help="also write every figure to this file")
    args = ap.parse_args()
    ensure_debian({"smtp-source": "postfix", "dovecot": "dovecot-pop3d", "strace": "strace"}, args.install,
                  preseed="postfix postfix/main_mailer_type select No configuration")
    in_namespaces("benches/footprint.py")
    binary = Path(args.bin)
    if not binary.is_file():
        sys.exit(f"{binary} is missing: cargo build --release (or pass --bin)")
    startups, mib, messages = (1, 1, 20) if args.smoke else (args.startups, args.large_mib, 200)
    work = work_dir()
    hashed = sha512_crypt(PASSWORD)
    # Both take the large message (their defaults refuse it: Postfix's above 10 MB).
    limit = (mib + 8) * 2**20
    rustmail = Rustmail(work, binary, [USER], hashed, max_message_size=limit)
    postfix, dovecot = Postfix(work, max_message_size=limit), Dovecot(work, [USER], hashed)
    results: dict = {"startup": [], "large": [], "fsync": []}
    problems = []
    try:
        for _ in range(startups):
            results["startup"].append(rustmail_startup(rustmail))
            results["startup"].append(peer_startup(postfix, "port"))
            results["startup"].append(peer_startup(dovecot, "pop3_port"))
        print("start-up, median of", startups)
        for name in ("rustmail", "postfix", "dovecot"):
            runs = [r for r in results["startup"] if r["server"] == name]
            ready = f"READY=1 {statistics.median(r['ready_ms'] for r in runs):6.1f} ms, " if name == "rustmail" else ""
            print(f"  {name:9} {ready}first greeting {statistics.median(r['greeting_ms'] for r in runs):7.1f} ms")

        msg = big_message(mib * 2**20)
        results["large"] = [large_rustmail(rustmail, msg), large_postfix(postfix, msg), large_dovecot(dovecot, msg)]
        print(f"a {mib} MiB message: peak resident memory (VmHWM)")
        for r in results["large"]:
            if not r["intact"]:
                problems.append(f"{r['server']}: the {mib} MiB message did not come through intact")
            parts = []
            if "in_peak_kib" in r:
                parts.append(f"in over SMTP {r['in_peak_kib'] / 1024:7.1f} MiB")
            if "out_peak_kib" in r:
                parts.append(f"{'then ' if parts else ''}out over POP3 {r['out_peak_kib'] / 1024:7.1f} MiB")
            extra = f"  ({', '.join(f'{k} {v / 1024:.1f}' for k, v in r['in_peaks'].items())})" if "in_peaks" in r else ""
            print(f"  {r['server']:9} {', '.join(parts)}{extra}")

        rustmail.start()
        try:
            results["fsync"].append(fsyncs(rustmail, rustmail.pids(), rustmail.maildir(USER) / "new", messages))
        finally:
            rustmail.stop()
        postfix.start()
        try:
            results["fsync"].append(fsyncs(postfix, postfix.pids(), postfix.maildir_new, messages))
        finally:
            postfix.stop()
        print(f"sync calls per message ({messages} x 4 KiB over 4 connections, strace -f)")
        for r in results["fsync"]:
            print(f"  {r['server']:9} {r['per_message']:5.2f}  {r['sync_calls']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report(problems, results, args.json)


if __name__ == "__main__":
    sys.exit(main())
