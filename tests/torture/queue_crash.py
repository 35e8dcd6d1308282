#!/usr/bin/env python3
"""Crash consistency of the outbound queue: SIGKILL the real server at random moments while users submit
mail for other hosts and the server delivers it, restart it, repeat; at the end every message that got
`250` must have reached its receiving server, byte for byte.

Users submit over 587 (STARTTLS, AUTH) to addresses at two address literals, `[127.0.0.2]` and
`[127.0.0.3]` (no DNS needed), where Postfix's smtp-sink takes the mail (`-w 1`: it waits a second
before answering DATA, so kills land while deliveries are in flight). Each message carries a unique
token and a random body. At the end (after a clean restart and the queue draining):
  - lost: acknowledged tokens no sink received (must be 0);
  - corrupt: received copies whose body differs from what was sent (must be 0);
  - duplicates: further copies of one token, the documented cost of a kill between a peer's 250 and
    the queue update (counted, allowed);
  - unacked_delivered: messages whose 250 was lost in a kill but which were queued and delivered;
  - transactions cut off: deliveries a kill interrupted before the final dot (smtp-sink leaves an empty
    file for each; the message is delivered again later).

Usage: queue_crash.py [--kills N] [--seed S] [--bin PATH]. Needs smtp-sink (Debian: postfix) and
openssl; exit status 0 when nothing was lost or corrupt, 77 when smtp-sink is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from torture_lib import PASSWORD, DOMAIN, ForgetfulMount, find_binary, make_server, power_cuts_unavailable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from e2e_helpers import free_port, make_ca_and_cert, port_accepts, wait_until  # noqa: E402

SINKS = ["127.0.0.2", "127.0.0.3"]
ALICE = f"alice@{DOMAIN}"


def body_of(dump: str) -> tuple[str | None, str]:
    """The token and the body (after the blank line) of an smtp-sink dump."""
    # smtp-sink's X- envelope lines, its Received:, then the message: the first empty line ends its header.
    token = re.search(r"^X-Token: (\S+)$", dump, re.M)
    body = dump.split("\n\n", 1)[1] if "\n\n" in dump else ""
    # smtp-sink ends each dump with an empty line of its own (the bodies here never end with one).
    if body.endswith("\n\n"):
        body = body[:-1]
    return (token.group(1) if token else None), body


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--bin", default=None)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--power-cuts", action="store_true",
                    help="the storage root on forgetful_fs.py: every kill is a power cut that loses what was "
                         "not fsynced (needs root, libfuse2 and fusepy; exit status 77 when missing)")
    args = ap.parse_args()
    if args.power_cuts and (why := power_cuts_unavailable()):
        print(f"SKIPPED: power cuts cannot run here: {why}")
        return 77
    if shutil.which("smtp-sink") is None and not os.path.exists("/usr/sbin/smtp-sink"):
        print("SKIP: smtp-sink (Debian package postfix) is not installed")
        return 77
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    rng = random.Random(seed)
    binary = find_binary(args.bin)
    work = Path(tempfile.mkdtemp(prefix="rustmail-queue-crash-"))
    dumps = Path(tempfile.mkdtemp(prefix="rustmail-queue-sink-"))
    dumps.chmod(0o777)
    ca, cert, key = make_ca_and_cert(work, ["127.0.0.1"])
    port = free_port()
    sinks = [subprocess.Popen(["smtp-sink", "-u", "nobody", "-w", "1", "-d", f"{dumps}/%H%M%S.",
                               f"{ip}:{port}", "64"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
             for ip in SINKS]
    srv = make_server(binary, work / "server", ["alice"], tls={"certificate": cert, "key": key},
                      extra_listeners=("submission",),
                      extra_toml=f"\n[outbound]\nport = {port}\nretry_intervals_secs = [1]\n"
                                 "connect_timeout_secs = 5\nmax_connections_per_domain = 4\n")
    disk = ForgetfulMount(srv.state_dir, work) if args.power_cuts else None
    sent: dict[str, str] = {}  # token -> sha256 of the body
    acked: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()
    counter = [0]

    def worker(n: int) -> None:
        wrng = random.Random(seed * 31 + n)
        ctx = ssl.create_default_context(cafile=str(ca))
        while not stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30) as s:
                    s.starttls(context=ctx)
                    s.login(ALICE, PASSWORD)
                    while not stop.is_set():
                        with lock:
                            counter[0] += 1
                            token = f"T{n}x{counter[0]}"
                        lines = ["".join(wrng.choice("abcdefghij .,;:-") for _ in range(wrng.randint(1, 200)))
                                 for _ in range(wrng.randint(1, 40))]
                        lines += [". a dot line", ".", ".."] if wrng.random() < 0.3 else []
                        body = "\r\n".join(lines) + "\r\n"
                        rcpt = f"u{wrng.randint(1, 5)}@[{wrng.choice(SINKS)}]"
                        msg = (f"From: {ALICE}\r\nTo: {rcpt}\r\nSubject: queue torture\r\nX-Token: {token}\r\n"
                               f"Message-ID: <{token}@{DOMAIN}>\r\nDate: Wed, 2 Dec 2026 00:00:00 +0000\r\n"
                               f"\r\n{body}")
                        with lock:
                            sent[token] = hashlib.sha256(body.replace("\r\n", "\n").encode()).hexdigest()
                        s.sendmail(ALICE, [rcpt], msg.encode())
                        with lock:
                            acked.add(token)
                        time.sleep(wrng.random() * 0.05)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.1)

    started = time.time()
    try:
        for ip in SINKS:
            wait_until(lambda ip=ip: port_accepts(port, ip), timeout=10, message="smtp-sink did not start")
        if disk:
            disk.start()
        srv.start()
        threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(args.workers)]
        for t in threads:
            t.start()
        for kill in range(args.kills):
            time.sleep(rng.uniform(0.3, 2.0))
            if disk:
                # As in crash_loop.py: the disk freezes first, the server is reaped once the disk's
                # process is gone, and the disk comes back with what was durable at the cut.
                disk.cut()
                os.kill(srv.proc.pid, signal.SIGKILL)
                disk.power_off()
                srv.proc.wait(timeout=10)
                disk.power_on()
            else:
                os.kill(srv.proc.pid, signal.SIGKILL)
                srv.proc.wait(timeout=10)
            srv.start()
        stop.set()
        for t in threads:
            t.join(timeout=60)
        # Drain: the queue empties once everything acknowledged is delivered.
        queue = lambda: subprocess.run([str(binary), "queue", "list", "--config", str(srv.config_path)],  # noqa: E731
                                       capture_output=True, text=True).stdout
        # The sinks take about 8 messages a second: a long run leaves a long queue. It must keep
        # moving (a new copy at least every 60 s) until it is empty.
        drained, seen, last_progress = False, -1, time.time()
        while time.time() - last_progress < 60:
            if "is empty" in queue():
                drained = True
                break
            copies = len(list(dumps.iterdir()))
            if copies != seen:
                seen, last_progress = copies, time.time()
            time.sleep(1)
        if not drained:
            print(f"the queue stopped moving before it was empty:\n{queue()[:2000]}")
        srv.stop_ok()
    finally:
        stop.set()
        if srv.running:
            srv.kill()
        if disk:
            disk.power_off()
        for p in sinks:
            p.terminate()
            p.wait(timeout=10)
    received: dict[str, int] = {}
    corrupt = 0
    aborted = 0
    for path in dumps.iterdir():
        text = path.read_text(errors="replace")
        if not text:
            # smtp-sink creates the file when a transaction starts: one cut off by a kill stays empty.
            aborted += 1
            continue
        token, body = body_of(text)
        if token is None:
            corrupt += 1
            print(f"a copy without its token: {path}")
            continue
        received[token] = received.get(token, 0) + 1
        if hashlib.sha256(body.encode()).hexdigest() != sent.get(token):
            if os.environ.get("QUEUE_CRASH_DEBUG"):
                print(repr(body[-200:]))
            corrupt += 1
            print(f"corrupt copy of {token}: {path}")
    lost = sorted(acked - set(received))
    duplicates = sum(n - 1 for n in received.values())
    unacked_delivered = len(set(received) - acked)
    what = "power cuts" if disk else "kills"
    print(f"queue crash: seed {seed}, {args.kills} {what} in {time.time() - started:.0f} s: "
          f"{len(acked)} acknowledged, {len(received)} delivered ({sum(received.values())} copies), "
          f"{len(lost)} lost, {corrupt} corrupt, {duplicates} duplicates, "
          f"{unacked_delivered} delivered without their 250, {aborted} transactions cut off")
    if lost:
        print(f"lost: {lost[:20]}")
    if lost or corrupt or not drained:
        print(f"kept {work} and {dumps} for inspection")
        return 1
    shutil.rmtree(dumps, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
