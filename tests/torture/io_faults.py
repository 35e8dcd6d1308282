#!/usr/bin/env python3
"""Storage I/O errors aimed at files only: the storage root on forgetful_fs.py, whose control socket makes
chosen file operations fail with EIO while the real server runs (strace's injection cannot aim at files:
it also fails tokio's eventfd write()s, which stops the runtime, so tests/e2e/test_fault_injection.py
covers only fsync, link and unlink).

What must hold (failures make the exit status 1), for each fault in turn:
  - DATA while write, create, fsync or link fails: `451 4.3.0` (temporary, "try again"), never a
    250; nothing left in any new/, tmp/ or the spool; once healed, the next message gets 250 and is
    stored byte for byte for both recipients;
  - POP3 QUIT while unlink fails: `-ERR [SYS/TEMP]`, every message still there; healed, the next session
    deletes them;
  - POP3 RETR while read fails: an `-ERR` or a closed connection, never a message that looks complete
    but is not; healed, RETR gives the message exactly, and nothing was lost;
  - POP3 login while rename fails (moving new/ to cur/): the session either fails with -ERR or lists
    every message; healed, every message is listed and nothing was lost;
  - the server keeps running throughout and stops with exit status 0.

    io_faults.py [--bin BIN] [--keep]

Needs root, /dev/fuse, libfuse2 and fusepy (exit status 77 otherwise), like the power cuts.
"""

from __future__ import annotations

import argparse
import contextlib
import poplib
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from torture_lib import (DOMAIN, PASSWORD, Attempt, ConnectionLost, ForgetfulMount, SmtpConn, build_message,
                         count_files, digest, find_binary, make_server, power_cuts_unavailable, random_body,
                         scan_maildirs, stored_form)

ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
ACCOUNTS = [ALICE, BOB]


class Run:
    def __init__(self, binary: Path, workdir: Path) -> None:
        self.srv = make_server(binary, workdir, ["alice", "bob"])
        self.disk = ForgetfulMount(self.srv.state_dir, workdir)
        self.rng = random.Random(12)
        self.acked: dict[str, Attempt] = {}  # token -> its acked attempt
        self.messages: dict[str, bytes] = {}  # token -> the message sent
        self.deleted: set[str] = set()  # tokens deleted at a QUIT answered +OK
        self.problems: list[str] = []
        self.results: list[str] = []
        self.n = 0
        self.hits: dict[str, int] = {}  # fault -> failed operations

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(what)

    def send(self) -> Attempt:
        self.n += 1
        token = f"io{self.n}"
        message = build_message(token, 1, (ALICE, BOB), random_body(self.rng, self.rng.choice([300, 70_000])))
        attempt = Attempt(token, 1, (ALICE, BOB), digest(stored_form(message)), len(message))
        self.messages[token] = message
        conn = SmtpConn(self.srv.smtp_port)
        try:
            conn.send(attempt, message)
        except ConnectionLost as e:
            attempt.reply = f"connection lost: {e}"
        finally:
            conn.close()
        if attempt.outcome == "acked":
            self.acked[token] = attempt
        return attempt

    def leftovers(self) -> int:
        root = self.srv.state_dir
        return count_files(root / "spool") + sum(count_files(self.srv.maildir(a) / sub)
                                                 for a in ACCOUNTS for sub in ("tmp",))

    def stored_tokens(self) -> dict[str, list[str]]:
        """account -> tokens of the intact stored messages (a damaged file is a problem)."""
        out: dict[str, list[str]] = {a: [] for a in ACCOUNTS}
        for f in scan_maildirs(self.srv, ACCOUNTS):
            if f.problems or f.token not in self.messages \
                    or f.content_digest != digest(stored_form(self.messages[f.token])):
                self.problems.append(f"damaged file {f.path}: {f.problems}")
            else:
                out[f.account].append(f.token)
        return out

    def check_store(self, when: str) -> None:
        stored = self.stored_tokens()
        for account in ACCOUNTS:
            for token in self.acked:
                if token in self.deleted and account == ALICE:
                    continue
                self.check(token in stored[account], f"{when}: {token} acked but not in {account}'s Maildir")
            for token in stored[account]:
                self.check(token in self.acked, f"{when}: {token} stored for {account} without a 250")
        self.check(self.srv.running, f"{when}: the server died")

    # ------------------------------------------------------------------ the faults

    @contextlib.contextmanager
    def faulty(self, ops: str):
        """The operations `ops` fail with EIO inside the block; afterwards at least one must have been
        tried (otherwise the step tested nothing, and that is a problem too)."""
        before = self.disk.stats()
        self.disk.fail(ops)
        try:
            yield
        finally:
            self.disk.heal()
        after = self.disk.stats()
        hits = sum(after.get(f"failed_{op}", 0) - before.get(f"failed_{op}", 0) for op in ops.split(","))
        self.hits[ops] = hits
        self.check(hits > 0, f"{ops}: the fault was never hit (the step tested nothing)")

    def data_fault(self, ops: str) -> None:
        before_new = sum(count_files(self.srv.maildir(a) / "new") for a in ACCOUNTS)
        with self.faulty(ops):
            attempt = self.send()
        after_new = sum(count_files(self.srv.maildir(a) / "new") for a in ACCOUNTS)
        self.results.append(f"DATA while {ops} fails: {attempt.reply}")
        self.check(attempt.reply.startswith("451 4.3.0"), f"{ops}: DATA answered {attempt.reply!r}, not 451 4.3.0")
        self.check(after_new == before_new, f"{ops}: new/ went from {before_new} to {after_new} files")
        self.check(self.leftovers() == 0, f"{ops}: {self.leftovers()} files left in the spool or tmp/")
        healed = self.send()
        self.check(healed.outcome == "acked", f"{ops}: after healing, DATA answered {healed.reply!r}")
        self.check_store(f"after the {ops} fault")

    def pop3(self) -> poplib.POP3:
        p = poplib.POP3("127.0.0.1", self.srv.pop3_port, timeout=30)
        p.user(ALICE)
        p.pass_(PASSWORD)
        return p

    def listing(self, p: poplib.POP3) -> dict[int, str]:
        """message number -> token, from UIDL and the stored files' names."""
        by_uid = {f.uid: f.token for f in scan_maildirs(self.srv, [ALICE])}
        out = {}
        for line in p.uidl()[1]:
            number, uid = line.decode().split()
            out[int(number)] = by_uid.get(uid, f"unknown uid {uid}")
        return out

    def unlink_fault(self) -> None:
        p = self.pop3()
        listed = self.listing(p)
        p.dele(1)
        p.dele(2)
        with self.faulty("unlink"):
            try:
                answer = p.quit().decode()
            except poplib.error_proto as e:
                answer = e.args[0].decode(errors="replace")
        self.results.append(f"QUIT while unlink fails: {answer}")
        self.check(answer.startswith("-ERR [SYS/TEMP]"), f"unlink: QUIT answered {answer!r}")
        self.check_store("after the unlink fault")
        # Healed: the deletion goes through (once the failed session let go of the mailbox).
        p = self.srv_wait_pop3()
        self.check(self.listing(p) == listed, "unlink: the listing changed after a failed QUIT")
        p.dele(1)
        p.dele(2)
        answer = p.quit().decode()
        self.check(answer.startswith("+OK"), f"unlink: after healing, QUIT answered {answer!r}")
        self.deleted |= {listed[1], listed[2]}
        self.check_store("after the healed deletion")

    def srv_wait_pop3(self) -> poplib.POP3:
        deadline = time.monotonic() + 10
        while True:
            try:
                return self.pop3()
            except poplib.error_proto as e:
                if not e.args[0].startswith(b"-ERR [IN-USE]") or time.monotonic() > deadline:
                    raise

    def read_fault(self) -> None:
        p = self.pop3()
        listed = self.listing(p)
        with self.faulty("read"):
            try:
                lines = p.retr(1)[1]
                answer = f"+OK with {len(lines)} lines"
                self.check(False, f"read: RETR gave a message although every read failed ({answer})")
            except poplib.error_proto as e:
                answer = e.args[0].decode(errors="replace")
            except (OSError, EOFError) as e:
                answer = f"connection closed ({e!r})"
        self.results.append(f"RETR while read fails: {answer}")
        try:
            p.quit()
        except (poplib.error_proto, OSError, EOFError):
            pass
        p = self.srv_wait_pop3()
        lines = p.retr(1)[1]
        got = b"\n".join(lines) + b"\n"
        token = listed[1]
        self.check(got.endswith(stored_form(self.messages[token])), "read: after healing, RETR 1 is not the message")
        p.quit()
        self.check_store("after the read fault")

    def rename_fault(self) -> None:
        for _ in range(2):
            self.send()  # new mail in new/, moved to cur/ at the next login
        with self.faulty("rename"):
            try:
                p = self.pop3()
                count = len(self.listing(p))
                answer = f"+OK, {count} messages listed"
                p.quit()
            except poplib.error_proto as e:
                answer = e.args[0].decode(errors="replace")
        expected = len([t for t in self.acked if t not in self.deleted])
        self.results.append(f"login while rename fails: {answer} (of {expected})")
        self.check(answer.startswith("-ERR") or answer == f"+OK, {expected} messages listed",
                   f"rename: the login gave {answer!r} of {expected} messages")
        p = self.srv_wait_pop3()
        count = len(self.listing(p))
        p.quit()
        self.check(count == expected, f"rename: after healing, {count} of {expected} messages listed")
        self.check_store("after the rename fault")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", help="the rustmail binary (default $TORTURE_BIN or target/debug/rustmail)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory even when all is well")
    args = ap.parse_args()
    if why := power_cuts_unavailable():
        print(f"SKIPPED: the fault-injecting file system cannot run here: {why}")
        return 77
    workdir = Path(tempfile.mkdtemp(prefix="rustmail-io-faults-"))
    run = Run(find_binary(args.bin), workdir)
    status = None
    try:
        run.disk.start()
        run.srv.start()
        for _ in range(3):
            run.check(run.send().outcome == "acked", "a message before any fault was refused")
        for ops in ("write", "create", "fsync", "link"):
            run.data_fault(ops)
        run.unlink_fault()
        run.read_fault()
        run.rename_fault()
        status = run.srv.stop()
        run.check(status == 0, f"the server stopped with exit status {status}")
    except Exception as e:  # noqa: BLE001 - reported with the work directory
        run.problems.append(f"the test itself failed: {e!r}")
    finally:
        if run.srv.running:
            run.srv.kill()
        if run.disk.mounted():
            run.disk.power_off()
    for line in run.results:
        print(f"  {line}")
    print(f"  failed file operations per fault: {run.hits}")
    print(f"TORTURE io_faults acked={len(run.acked)} deleted={len(run.deleted)} problems={len(run.problems)}")
    if run.problems:
        for p in run.problems[:30]:
            print(f"PROBLEM: {p}")
        print(f"work directory kept: {workdir}")
        return 1
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
