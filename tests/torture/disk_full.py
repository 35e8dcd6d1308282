#!/usr/bin/env python3
"""A full disk: the storage root on a tiny tmpfs (2 MiB), mail sent until it no longer fits.

What must hold (failures make the exit status 1):
  - the refusal is temporary and says why: `452 4.3.1` (RFC 3463: mail system full);
  - never a 250 for a message that was not stored: every 250 is in new/ (or cur/), byte for byte, and no
    refused message is anywhere;
  - no partial file in any new/ or cur/, and neither spool/ nor any tmp/ keeps a file after a refusal;
  - the server keeps serving: once POP3 deletes mail (QUIT +OK on the full disk), mail is accepted again;
  - a message larger than the whole file system is refused for good: `552 5.3.4` (RFC 5321 §4.2.2's "exceeded
    storage allocation", since retrying cannot help) and the space it took comes back.
What is recorded, not judged: whether the server starts
again while the disk is full (its start-up probe writes a file).

Needs root (mount). The tmpfs is unmounted at the end whatever happens.
"""

from __future__ import annotations

import argparse
import os
import poplib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from torture_lib import (DOMAIN, PASSWORD, Attempt, ConnectionLost, SmtpConn, build_message, count_files,
                         digest, find_binary, make_server, random_body, scan_maildirs, stored_form)

FS_SIZE = 2 * 1024 * 1024
# RFC 3463 4.3.1 "mail system full"; a 451 4.3.0 here would say "try again" without saying why.
EXPECTED_FULL = ("452 4.3.1",)
# RFC 5321 §4.2.2 552 "exceeded storage allocation", RFC 3463 5.3.4 "message too big for system".
EXPECTED_NEVER_FITS = "552 5.3.4"
ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"


class Run:
    def __init__(self, srv, seed: str) -> None:
        self.srv = srv
        self.rng = random.Random(seed)
        self.attempts: dict[str, Attempt] = {}
        self.problems: list[str] = []
        self.deleted: set[tuple[str, str]] = set()  # (account, uid) deleted over POP3
        self.seq = 0

    def send(self, rcpts: tuple[str, ...], size: int) -> Attempt:
        self.seq += 1
        token = f"D{self.seq}"
        message = build_message(token, 1, rcpts, random_body(self.rng, size))
        attempt = Attempt(token, 1, rcpts, digest(stored_form(message)), len(message))
        self.attempts[attempt.key] = attempt
        conn = SmtpConn(self.srv.smtp_port)
        try:
            conn.send(attempt, message)
        except ConnectionLost as e:
            self.problems.append(f"{token}: connection lost ({e}); outcome {attempt.outcome}")
        finally:
            conn.close()
        return attempt

    def check_disk(self, when: str) -> None:
        """Every stored file intact and belonging to a 250; every 250 stored; spool/ and tmp/ empty."""
        accounts = [ALICE, BOB]
        files = scan_maildirs(self.srv, accounts)
        present = {(f.account, f.uid) for f in files}
        for f in files:
            a = self.attempts.get(f.attempt_key)
            if a is None or a.digest != f.content_digest or f.problems:
                self.problems.append(f"{when}: corrupt or partial file {f.account} {f.sub}/{f.path.name}")
            elif a.outcome != "acked":
                self.problems.append(f"{when}: {a.key} is stored although answered {a.reply!r}")
        for a in self.attempts.values():
            for r in a.rcpts:
                if a.outcome == "acked" and (r, a.uid) not in present | self.deleted:
                    self.problems.append(f"{when}: {a.key} got a 250 ({a.qid}) but is not in the Maildir of {r}")
        # A refused message's spool file is removed off the session's task: give it a moment.
        deadline = time.monotonic() + 3
        while count_files(self.srv.state_dir / "spool") and time.monotonic() < deadline:
            time.sleep(0.05)
        leftovers = count_files(self.srv.state_dir / "spool")
        leftovers += sum(count_files(self.srv.maildir(a) / "tmp") for a in accounts)
        if leftovers:
            self.problems.append(f"{when}: {leftovers} files left in spool/ or tmp/")

    def fill(self) -> list[Attempt]:
        """Sends 40-140 KiB messages until three in a row are refused; returns the refused ones."""
        refused, streak = [], 0
        for _ in range(100):
            rcpts = (ALICE,) if self.rng.random() < 0.7 else (ALICE, BOB)
            a = self.send(rcpts, self.rng.randint(40_000, 140_000))
            if a.outcome == "acked":
                streak = 0
                continue
            refused.append(a)
            streak += 1
            if streak == 3:
                break
        return refused


def df(path: Path) -> str:
    st = os.statvfs(path)
    return f"{st.f_bavail * st.f_frsize // 1024} KiB free of {st.f_blocks * st.f_frsize // 1024} KiB"


def pop3_delete(srv, account: str, share: float) -> tuple[int, bytes]:
    """Deletes about `share` of the account's messages over POP3; returns (count, QUIT reply)."""
    p = poplib.POP3("127.0.0.1", srv.pop3_port, timeout=30)
    try:
        p.user(account)
        p.pass_(PASSWORD)
        count, _ = p.stat()
        doomed = list(range(1, count + 1))[: max(1, int(count * share))] if count else []
        for n in doomed:
            p.dele(n)
        return len(doomed), p.quit()
    finally:
        p.close()


def scenario(run: Run) -> dict:
    srv = run.srv
    figures = {}
    srv.start()

    refused = run.fill()
    acked = [a for a in run.attempts.values() if a.outcome == "acked"]
    figures["accepted_until_full"] = len(acked)
    figures["full_replies"] = sorted({a.reply for a in refused})
    if not refused:
        run.problems.append("the disk never filled: 100 messages accepted on a 2 MiB file system")
    for a in refused:
        if not a.reply.startswith(EXPECTED_FULL):
            run.problems.append(f"full disk answered {a.reply!r}, expected one of {EXPECTED_FULL}")
    run.check_disk("after filling")
    figures["df_when_full"] = df(srv.state_dir)
    small = run.send((ALICE,), 200)
    figures["small_message_when_full"] = small.reply
    run.check_disk("after a small message on the full disk")

    # Space comes back the way a user frees it: POP3 deletions, on the full disk.
    alice = {a.uid for a in run.attempts.values() if a.outcome == "acked" and ALICE in a.rcpts}
    deleted, quit_reply = pop3_delete(srv, ALICE, 0.5)
    figures["pop3_quit_on_full_disk"] = quit_reply.decode(errors="replace")
    gone = alice - {f.uid for f in scan_maildirs(srv, [ALICE])}
    run.deleted |= {(ALICE, uid) for uid in gone}
    if len(gone) != deleted:
        run.problems.append(f"POP3 deleted {deleted} messages, {len(gone)} are gone")
    figures["df_after_pop3_delete"] = df(srv.state_dir)
    again = [run.send((ALICE,), run.rng.randint(20_000, 60_000)) for _ in range(3)]
    figures["accepted_after_delete"] = sum(a.outcome == "acked" for a in again)
    if figures["accepted_after_delete"] != 3:
        run.problems.append(f"after deletions freed space: {[a.reply for a in again]}")
    run.check_disk("after space came back")

    # A message larger than the whole file system.
    huge = run.send((BOB,), FS_SIZE + FS_SIZE // 2)
    figures["larger_than_fs"] = huge.reply
    if huge.outcome == "acked":
        run.problems.append(f"a {huge.size}-octet message got a 250 on a {FS_SIZE}-octet file system")
    elif not huge.reply.startswith(EXPECTED_NEVER_FITS):
        run.problems.append(f"a message larger than the file system got {huge.reply!r}, not a permanent "
                            f"{EXPECTED_NEVER_FITS} (retrying cannot help)")
    after = run.send((BOB,), 1_000)
    figures["small_after_larger_than_fs"] = after.reply
    if after.outcome != "acked":
        run.problems.append(f"after the oversized message, a small one got {after.reply!r}")
    run.check_disk("after the oversized message")

    # Observation: does the server start again with the disk full to the last page?
    run.fill()
    for _ in range(1000):
        if run.send((BOB,), 200).outcome != "acked":
            break
    figures["df_before_restart"] = df(srv.state_dir)
    run.check_disk("after filling again")
    code = srv.stop(signal.SIGTERM)
    if code != 0:
        run.problems.append(f"SIGTERM on a full disk: exit code {code}")
    offset = srv.log_size()
    # A full disk must not keep the server down: it starts, refuses new mail with 452, and lets POP3
    # users delete mail to make room.
    try:
        srv.start(timeout=15)
        figures["restart_on_full_disk"] = "started"
    except AssertionError:
        lines = [ln for ln in srv.log_since(offset).splitlines() if ln.strip() and not ln.startswith("=====")]
        figures["restart_on_full_disk"] = "refused: " + (lines[-1].strip() if lines else "(no log)")
        run.problems.append(f"the server does not start on a full disk: {figures['restart_on_full_disk']}")
        return figures
    full = run.send((BOB,), 200)
    figures["after_restart_on_full_disk"] = full.reply
    if not full.reply.startswith(EXPECTED_FULL):
        run.problems.append(f"after a restart on the full disk, a message got {full.reply!r}")
    bob = {a.uid for a in run.attempts.values() if a.outcome == "acked" and BOB in a.rcpts}
    deleted, quit_reply = pop3_delete(srv, BOB, 0.5)
    figures["pop3_after_restart_on_full_disk"] = f"{deleted} deleted: {quit_reply.decode(errors='replace')}"
    if not quit_reply.startswith(b"+OK"):
        run.problems.append(f"POP3 QUIT after a restart on the full disk: {quit_reply!r}")
    gone = bob - {f.uid for f in scan_maildirs(srv, [BOB])}
    run.deleted |= {(BOB, uid) for uid in gone}
    if len(gone) != deleted:
        run.problems.append(f"POP3 deleted {deleted} messages, {len(gone)} are gone")
    again = run.send((BOB,), 1_000)
    if again.outcome != "acked":
        run.problems.append(f"after POP3 made room, a message got {again.reply!r}")
    run.check_disk("after a restart on the full disk")
    return figures


def mount_tmpfs(path: Path) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0700", "tmpfs", str(path)], check=True)


def unmount(path: Path) -> None:
    for _ in range(20):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.25)
    subprocess.run(["umount", "--lazy", str(path)], check=False)
    print(f"disk_full: {path} was busy; unmounted lazily", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", help="the rustmail binary (default $TORTURE_BIN or target/debug/rustmail)")
    ap.add_argument("--seed", default="disk-full", help="seed of the message sizes and bodies")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("disk_full: SKIPPED: mounting a tmpfs needs root")
        return 77
    binary = find_binary(args.bin)
    workdir = Path(tempfile.mkdtemp(prefix="rustmail-disk-full-"))
    srv = make_server(binary, workdir, ["alice", "bob"])
    # SIGTERM to this script must still unmount: make it an exception that runs the finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    mount_tmpfs(srv.state_dir)
    run = Run(srv, args.seed)
    figures = {}
    try:
        try:
            figures = scenario(run)
        finally:
            srv.kill()
    except Exception as e:  # noqa: BLE001 - reported with the figures so far
        run.problems.append(f"{type(e).__name__}: {e}")
    finally:
        unmount(srv.state_dir)
    for key, value in figures.items():
        print(f"  {key}: {value}")
    print(f"TORTURE disk_full fs={FS_SIZE // 1024}KiB accepted_until_full={figures.get('accepted_until_full')} "
          f"full_reply={figures.get('full_replies')!r} larger_than_fs={figures.get('larger_than_fs')!r} "
          f"recovered={figures.get('accepted_after_delete')}/3 "
          f"restart_on_full_disk={figures.get('restart_on_full_disk')!r} problems={len(run.problems)}")
    if run.problems:
        print(f"FAILED (work directory kept: {workdir}; server log {srv.log_path}):")
        for p in run.problems:
            print(f"  {p}")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
