#!/usr/bin/env python3
"""Crash consistency: SIGKILL the real server at random moments under SMTP and POP3 load, restart it on
the same storage root and ports, and at the end compare what was acknowledged with what is on disk.

SMTP half. Worker threads send messages (random bodies, one to three local recipients, a unique token
and an attempt number in the header) over their own connections, pipelining MAIL/RCPT/DATA. Each attempt
ends as `acked` (250, with its queue id), `refused` (a reply other than 250), `no-reply` (the final dot
was sent, no answer came) or `unsent` (the connection died before the final dot was handed to the
kernel). A message that is not acked is retried as a new attempt, as a real client would. At the end:
  - every acked attempt is in the Maildir of each of its recipients (new/ or cur/), under the queue id of
    its 250, byte for byte as sent (after the Return-Path:/Received: the server prepends; LF endings),
    unless a POP3 QUIT deleted it: zero lost, zero corrupt;
  - no stored file is corrupt or partial (content, S=/W= in the name, trace headers), none is in the
    Maildir of an account that was not a recipient, none belongs to an attempt that was refused or never
    ended (those must not be stored at all); stored copies of attempts that got no answer are allowed and
    counted (`stored_unacked`), and so are duplicates: a second copy of one message in one Maildir,
    the known cost of a reply lost in a crash followed by the client's retry;
  - after each restart the spool holds no file of the killed process (it is emptied at start), and after
    the final clean stop it is empty.

POP3 half. One worker per POP3 account logs in, lists (UIDL), RETRs some messages (checking their
content), DELEs some, and then QUITs (recording which QUITs got +OK) or, now and then, drops the
connection. Kills hit these sessions too. At every login, and again at the end:
  - a message deleted at a QUIT that got +OK never reappears (`resurrected`);
  - a message listed before and not deleted at any QUIT that was sent is there (`pop3_lost`);
  - a message acked (250) before the login began, and not deleted since, is listed
    (`invisible_after_250`: a 250 given before the message was in the Maildir).

Usage: crash_loop.py [--kills N] [--seed S] [--bin PATH]; see --help. Exit status 0 when nothing was
lost, corrupt, misdelivered, stored against a refusal, or resurrected.
"""

from __future__ import annotations

import argparse
import collections
import poplib
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from torture_lib import (DOMAIN, PASSWORD, Attempt, ConnectionLost, ForgetfulMount, SmtpConn,
                         build_message, count_files, digest, find_binary, make_server, parse_stored,
                         power_cuts_unavailable, random_body, scan_maildirs, stored_form)

SMTP_LOCALS = ["alice", "bob", "carol", "dave"]
# poplib refuses lines over 2048 octets; the messages have longer ones (the server allows any length).
poplib._MAXLINE = 1 << 20
MAX_ATTEMPTS = 8


class Ledger:
    """Everything the clients learnt, shared by the worker threads under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: dict[str, Attempt] = {}
        self.problems: list[str] = []
        self.counts: collections.Counter = collections.Counter()
        self.broken: collections.Counter = collections.Counter()  # POP3 sessions cut short, by error
        # POP3, per account: UIDs listed, UIDs DELEd at a QUIT that was sent, UIDs DELEd at a QUIT that got +OK.
        self.seen: dict[str, set[str]] = collections.defaultdict(set)
        self.delete_sent: dict[str, set[str]] = collections.defaultdict(set)
        self.delete_confirmed: dict[str, set[str]] = collections.defaultdict(set)
        # Violations, each message once: lost after a listing, resurrected, acked but not listed.
        self.lost: dict[str, set[str]] = collections.defaultdict(set)
        self.resurrected: dict[str, set[str]] = collections.defaultdict(set)
        self.invisible: set[tuple[str, str]] = set()
        # Set by the clients at the two commit points, for the kills aimed at them.
        self.dot_sent = threading.Event()
        self.quit_sending = threading.Event()
        # Acked deliveries per account, in order: (time of the 250, uid).
        self.acks: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


class SmtpWorker(threading.Thread):
    def __init__(self, index: int, seed: str, port: int, accounts: list[str], ledger: Ledger,
                 stop: threading.Event) -> None:
        super().__init__(name=f"smtp-{index}", daemon=True)
        self.index, self.port, self.accounts, self.ledger, self.stop = index, port, accounts, ledger, stop
        self.rng = random.Random(f"{seed}/smtp/{index}")
        self.seq = 0

    def run(self) -> None:
        try:
            self.loop()
        except Exception as e:  # noqa: BLE001 - a worker's failure is the test's failure
            self.ledger.problem(f"{self.name} failed: {e!r}")

    def next_message(self) -> tuple[str, tuple[str, ...], bytes]:
        self.seq += 1
        token = f"T{self.index}-{self.seq}"
        rcpts = tuple(sorted(self.rng.sample(self.accounts, self.rng.choice((1, 1, 1, 2, 3)))))
        r = self.rng.random()
        size = (self.rng.randint(100_000, 400_000) if r < 0.04
                else self.rng.randint(3_000, 40_000) if r < 0.30
                else self.rng.randint(100, 3_000))
        return token, rcpts, random_body(self.rng, size)

    def loop(self) -> None:
        conn: SmtpConn | None = None
        current = None  # (token, rcpts, body, attempt number)
        while not self.stop.is_set():
            if current is None:
                current = (*self.next_message(), 1)
            token, rcpts, body, number = current
            if conn is None:
                try:
                    conn = SmtpConn(self.port)
                except (OSError, ConnectionLost):
                    time.sleep(0.02)  # the server is down or restarting
                    continue
            message = build_message(token, number, rcpts, body)
            attempt = Attempt(token, number, rcpts, digest(stored_form(message)), len(message))
            with self.ledger.lock:
                self.ledger.attempts[attempt.key] = attempt
            try:
                conn.send(attempt, message, self.ledger.dot_sent)
            except ConnectionLost:
                conn.close()
                conn = None
            with self.ledger.lock:
                self.ledger.counts[f"smtp_{attempt.outcome}"] += 1
                if attempt.outcome == "acked":
                    attempt.acked_at = time.monotonic()
                    for r in rcpts:
                        self.ledger.acks[r].append((attempt.acked_at, attempt.uid))
                elif attempt.outcome == "refused":
                    self.ledger.counts[f"smtp_reply_{attempt.code}"] += 1
            if attempt.outcome == "refused" and attempt.code >= 500:
                self.ledger.problem(f"{attempt.key} refused permanently ({attempt.code})")
            if attempt.outcome == "acked" or number >= MAX_ATTEMPTS:
                current = None
            else:
                current = (token, rcpts, body, number + 1)
        if conn is not None:
            conn.close()


class Pop3Worker(threading.Thread):
    """The only POP3 client of its account, so that nothing but the server changes what it saw."""

    def __init__(self, index: int, seed: str, port: int, account: str, ledger: Ledger,
                 stop: threading.Event) -> None:
        super().__init__(name=f"pop3-{index}", daemon=True)
        self.port, self.account, self.ledger, self.stop = port, account, ledger, stop
        self.rng = random.Random(f"{seed}/pop3/{index}")
        self.checked_acks = 0  # acks of this account already added to `seen`

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.session()
                time.sleep(self.rng.uniform(0.0, 0.15))
        except Exception as e:  # noqa: BLE001
            self.ledger.problem(f"{self.name} failed: {e!r}")

    def session(self) -> None:
        began = time.monotonic()
        try:
            p = poplib.POP3("127.0.0.1", self.port, timeout=30)
        except (OSError, EOFError, poplib.error_proto):
            # Down or restarting; or accepted by a server killed before its greeting (-ERR EOF).
            time.sleep(0.02)
            return
        try:
            self.logged_in(p, began)
        except (OSError, EOFError, poplib.error_proto) as e:
            # A kill (connection reset or closed), or a login refused while the previous session of this
            # account is still being torn down ([IN-USE]).
            with self.ledger.lock:
                self.ledger.counts["pop3_sessions_broken"] += 1
                kind = "[IN-USE]" if "IN-USE" in str(e) else type(e).__name__
                self.ledger.broken[kind] += 1
        finally:
            try:
                p.close()
            except OSError:
                pass

    def logged_in(self, p: poplib.POP3, began: float) -> None:
        p.user(self.account)
        p.pass_(PASSWORD)
        _, lines, _ = p.uidl()
        listing = dict(line.decode().split(" ", 1) for line in lines)  # number -> uid
        self.check_listing(set(listing.values()), began)
        chosen = self.rng.sample(sorted(listing, key=int), min(len(listing), self.rng.randint(0, 4)))
        deleted = set()
        for number in chosen:
            _, lines, _ = p.retr(int(number))
            self.check_content(listing[number], b"\n".join(lines) + b"\n")
            if self.rng.random() < 0.7:
                p.dele(int(number))
                deleted.add(listing[number])
        if self.rng.random() < 0.1:
            with self.ledger.lock:
                self.ledger.counts["pop3_dropped_without_quit"] += 1
            return  # closed without QUIT: nothing may be deleted
        with self.ledger.lock:
            self.ledger.delete_sent[self.account] |= deleted
            self.ledger.counts["pop3_quits_sent"] += 1
        self.ledger.quit_sending.set()
        reply = p.quit()  # poplib raises on -ERR
        if reply.startswith(b"+OK"):
            with self.ledger.lock:
                self.ledger.delete_confirmed[self.account] |= deleted
                self.ledger.counts["pop3_quits_confirmed"] += 1
                self.ledger.counts["pop3_deletes_confirmed"] += len(deleted)

    def check_listing(self, uids: set[str], began: float) -> None:
        """What a login lists against what this client knew before it connected. Each violation is
        counted once per message (it would show again at every later login)."""
        a, led = self.account, self.ledger
        with led.lock:
            acks = led.acks[a]
            acked_before = set()
            while self.checked_acks < len(acks) and acks[self.checked_acks][0] < began:
                acked_before.add(acks[self.checked_acks][1])
                self.checked_acks += 1
            for uid in sorted((led.seen[a] - led.delete_sent[a]) - uids - led.lost[a]):
                led.lost[a].add(uid)
                led.problems.append(f"POP3 {a}: {uid} listed before, never deleted at a QUIT, "
                                    f"missing from a later listing")
            for uid in sorted((acked_before - led.delete_sent[a]) - uids):
                led.invisible.add((a, uid))
                led.problems.append(f"POP3 {a}: {uid} acked before the login began, not listed")
            for uid in sorted(uids & led.delete_confirmed[a] - led.resurrected[a]):
                led.resurrected[a].add(uid)
                led.problems.append(f"POP3 {a}: {uid} deleted at a QUIT that got +OK, listed again")
            led.seen[a] |= uids
            led.counts["pop3_logins"] += 1

    def check_content(self, uid: str, data: bytes) -> None:
        qid, key, content, problems = parse_stored(data)
        with self.ledger.lock:
            attempt = self.ledger.attempts.get(key)
            self.ledger.counts["pop3_retrieved"] += 1
            if attempt is None or attempt.digest != content or problems or not uid.startswith(f"{qid}."):
                self.ledger.problems.append(f"POP3 {self.account}: RETR of {uid} ({key}) does not match "
                                            f"what was sent {problems}")
                self.ledger.counts["pop3_corrupt"] += 1


def spool_files_of(spool: Path, pid: int) -> list[str]:
    return [p.name for p in spool.iterdir() if f"P{pid}Q" in p.name]


def verify(srv, ledger: Ledger, accounts: list[str]) -> collections.Counter:
    """The end state on disk against the ledger; adds to ledger.problems and returns the figures."""
    c = collections.Counter()
    files = scan_maildirs(srv, accounts)
    present = {(f.account, f.uid): f for f in files}
    stored_attempts = set()
    for f in files:
        a = ledger.attempts.get(f.attempt_key)
        where = f"{f.account} {f.sub}/{f.path.name}"
        if a is None or a.digest != f.content_digest or f.problems:
            c["corrupt"] += 1
            ledger.problems.append(f"corrupt or partial: {where} ({f.attempt_key}): "
                                   f"{f.problems or 'content differs from what was sent'}")
        if a is None:
            continue
        if f.account not in a.rcpts:
            c["misdelivered"] += 1
            ledger.problems.append(f"misdelivered: {where} ({a.key}) was for {a.rcpts}")
        if a.outcome in ("unsent", "refused"):
            c["stored_against_refusal"] += 1
            ledger.problems.append(f"stored although {a.outcome} ({a.code}): {where} ({a.key})")
        elif a.outcome == "acked" and f.uid != a.uid:
            c["corrupt"] += 1
            ledger.problems.append(f"{where} holds {a.key}, acked under {a.uid}")
        elif a.outcome == "no-reply":
            stored_attempts.add(a.key)
    c["stored_unacked"] = len(stored_attempts)
    copies = collections.Counter((f.account, f.token) for f in files if f.token)
    c["duplicates"] = sum(n - 1 for n in copies.values() if n > 1)
    for a in ledger.attempts.values():
        if a.outcome != "acked":
            continue
        c["acked"] += 1
        for r in a.rcpts:
            c["deliveries"] += 1
            if (r, a.uid) in present:
                c["found"] += 1
            elif a.uid in ledger.delete_sent[r]:
                c["deleted_by_pop3"] += 1
            else:
                c["lost"] += 1
                ledger.problems.append(f"LOST: {a.key} acked as {a.qid}, not in the Maildir of {r}")
    for account in accounts:
        for uid in sorted(ledger.delete_confirmed[account] - ledger.resurrected[account]):
            if (account, uid) in present:
                ledger.resurrected[account].add(uid)
                ledger.problems.append(f"resurrected: {account} {uid}, deleted at a QUIT that got +OK")
        for uid in sorted(ledger.seen[account] - ledger.delete_sent[account] - ledger.lost[account]):
            if (account, uid) not in present:
                ledger.lost[account].add(uid)
                ledger.problems.append(f"POP3 lost: {account} {uid}, listed, never deleted at a QUIT")
        c["resurrected"] += len(ledger.resurrected[account])
        c["pop3_lost"] += len(ledger.lost[account])
    c["invisible_after_250"] = len(ledger.invisible)
    c["tmp_leftovers"] = sum(count_files(srv.maildir(a) / "tmp") for a in accounts)
    return c


class CrashLoop:
    """The server, its clients and the kills; then the comparison and the report."""

    def __init__(self, args, seed: str) -> None:
        self.args, self.seed = args, seed
        self.workdir = Path(tempfile.mkdtemp(prefix="rustmail-crash-loop-"))
        self.pop_locals = [f"pop{i + 1}" for i in range(args.pop3_clients)]
        self.srv = make_server(find_binary(args.bin), self.workdir, SMTP_LOCALS + self.pop_locals)
        self.accounts = [f"{local}@{DOMAIN}" for local in SMTP_LOCALS + self.pop_locals]
        self.ledger, self.stop = Ledger(), threading.Event()
        self.rng = random.Random(f"{seed}/kills")
        self.spool = self.srv.state_dir / "spool"
        self.spool_left: list[int] = []  # spool files found after each kill
        self.kills = collections.Counter()  # by aim
        self.restart_secs: list[float] = []
        self.workers: list[threading.Thread] = []
        # --power-cuts: the storage root on a disk that forgets what was not made durable.
        self.disk = ForgetfulMount(self.srv.state_dir, self.workdir) if args.power_cuts else None

    def run(self) -> collections.Counter:
        srv, ledger = self.srv, self.ledger
        try:
            if self.disk:
                self.disk.start()
            srv.start()
            self.workers = [SmtpWorker(i, self.seed, srv.smtp_port, self.accounts, ledger, self.stop)
                            for i in range(self.args.smtp_clients)]
            self.workers += [Pop3Worker(i, self.seed, srv.pop3_port, f"{local}@{DOMAIN}", ledger, self.stop)
                             for i, local in enumerate(self.pop_locals)]
            for w in self.workers:
                w.start()
            for _ in range(self.args.kills):
                self.kill_and_restart()
            self.finish()
            if self.disk:
                # What is compared is what the disk holds for good: one more cut, after the clean stop.
                self.fs_stats = self.disk.stats()
                self.disk.cut()
                self.disk.power_off()
                self.disk.power_on()
            return verify(srv, ledger, self.accounts)
        finally:
            self.stop.set()
            srv.kill()
            if self.disk:
                self.disk.power_off()

    def kill_and_restart(self) -> None:
        srv, ledger = self.srv, self.ledger
        aim = self.rng.choice(("random", "random", "after-dot", "at-quit"))
        self.kills[aim] += 1
        time.sleep(self.rng.uniform(*self.args.gap))
        if aim != "random":
            # Aimed at a commit point: just after a final dot (the delivery) or as a QUIT goes out (the
            # deletions), give or take a few milliseconds.
            event = ledger.dot_sent if aim == "after-dot" else ledger.quit_sending
            event.clear()
            if not event.wait(timeout=10):
                self.kills[f"{aim} (timed out)"] += 1
            time.sleep(self.rng.uniform(0, 0.004))
        pid = srv.proc.pid
        if not srv.running:
            ledger.problem(f"the server exited on its own (code {srv.proc.returncode}) before a kill")
        if self.disk:
            # The power fails: the disk first (nothing more reaches it), then the server dies with it.
            # The server is reaped only once the disk's process is gone: a process that dies with files
            # open on a FUSE mount waits for the file system to answer their closing.
            self.disk.cut()
            srv.proc.kill()
            self.disk.power_off()
            srv.kill()
            self.disk.power_on()
        else:
            srv.kill()
        self.spool_left.append(count_files(self.spool))
        t = time.monotonic()
        srv.start()
        self.restart_secs.append(time.monotonic() - t)
        if left := spool_files_of(self.spool, pid):
            ledger.problem(f"spool files of the killed process {pid} after the restart: {left}")

    def finish(self) -> None:
        """A graceful stop under load, then one more start with no clients at all."""
        srv, ledger = self.srv, self.ledger
        time.sleep(self.rng.uniform(*self.args.gap))
        if (code := srv.stop(signal.SIGTERM)) != 0:
            ledger.problem(f"SIGTERM under load: exit code {code}")
        self.stop.set()
        for w in self.workers:
            w.join(timeout=60)
            if w.is_alive():
                ledger.problem(f"{w.name} did not stop")
        if left := count_files(self.spool):
            ledger.problem(f"{left} spool files after the graceful stop")
        srv.start()
        if left := count_files(self.spool):
            ledger.problem(f"{left} spool files after the final start")
        if (code := srv.stop(signal.SIGTERM)) != 0:
            ledger.problem(f"final SIGTERM: exit code {code}")

    def report(self, figures: collections.Counter, elapsed: float) -> None:
        n, ledger = self.ledger.counts, self.ledger
        replies = ", ".join(f"{k[11:]}: {v}" for k, v in sorted(n.items()) if k.startswith("smtp_reply_"))
        print(f"  attempts: {n['smtp_acked']} acked, {n['smtp_no-reply']} ended without an answer, "
              f"{n['smtp_unsent']} cut before the final dot, {n['smtp_refused']} refused ({replies or 'none'})")
        print(f"  kills: {', '.join(f'{v} {k}' for k, v in sorted(self.kills.items()))}")
        print(f"  kills that left spool files: {sum(1 for x in self.spool_left if x)} of {len(self.spool_left)}; "
              f"restart {min(self.restart_secs, default=0):.2f}-{max(self.restart_secs, default=0):.2f} s; "
              f"tmp/ leftovers at the end: {figures['tmp_leftovers']}")
        print(f"  POP3: {n['pop3_logins']} logins, {n['pop3_retrieved']} RETR, {n['pop3_quits_sent']} QUITs "
              f"sent, {n['pop3_quits_confirmed']} got +OK, {n['pop3_dropped_without_quit']} dropped without "
              f"QUIT, {n['pop3_sessions_broken']} cut short "
              f"({', '.join(f'{k}: {v}' for k, v in ledger.broken.most_common()) or 'none'})")
        f = figures
        name, kills = "crash_loop", f"kills={self.args.kills}"
        if self.disk:
            acked = max(n["smtp_acked"], 1)
            print(f"  disk: {self.disk.cuts} power cuts (the last after the clean stop); per acked message "
                  f"{self.fs_stats.get('fsync', 0) / acked:.2f} file fsyncs and "
                  f"{self.fs_stats.get('fsyncdir', 0) / acked:.2f} directory fsyncs (POP3's included)")
            name, kills = "power_cut", f"power_cuts={self.disk.cuts}"
        print(f"TORTURE {name} seed={self.seed} {kills} acked={f['acked']} "
              f"deliveries={f['deliveries']} found={f['found']} deleted_by_pop3={f['deleted_by_pop3']} "
              f"lost={f['lost']} corrupt={f['corrupt']} misdelivered={f['misdelivered']} "
              f"stored_against_refusal={f['stored_against_refusal']} duplicates={f['duplicates']} "
              f"stored_unacked={f['stored_unacked']} pop3_deletes_confirmed={n['pop3_deletes_confirmed']} "
              f"resurrected={f['resurrected']} pop3_lost={f['pop3_lost']} "
              f"invisible_after_250={f['invisible_after_250']} pop3_corrupt={n['pop3_corrupt']} "
              f"elapsed={elapsed:.1f}s", flush=True)

    def verdict(self, figures: collections.Counter) -> int:
        problems = self.ledger.problems
        if not problems and (figures["acked"] == 0 or self.ledger.counts["pop3_quits_confirmed"] == 0):
            problems.append("the load did not get through: nothing acked, or no QUIT confirmed")
        if problems:
            print(f"FAILED: {len(problems)} problems (work directory kept: {self.workdir}; "
                  f"server log {self.srv.log_path}):")
            # The first ones (seen while running) and the last ones (the final comparison).
            shown = problems if len(problems) <= 40 else (
                problems[:20] + [f"... {len(problems) - 40} more ..."] + problems[-20:])
            for line in shown:
                print(f"  {line}")
            return 1
        if self.args.keep:
            print(f"work directory kept: {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs under load (default 20)")
    ap.add_argument("--seed", help="seed of every random choice (default: a random one, printed)")
    ap.add_argument("--bin", help="the rustmail binary (default $TORTURE_BIN or target/debug/rustmail)")
    ap.add_argument("--smtp-clients", type=int, default=5, help="SMTP connections (default 5)")
    ap.add_argument("--pop3-clients", type=int, default=2, help="POP3 connections, one account each (default 2)")
    ap.add_argument("--gap", type=float, nargs=2, default=(0.2, 1.2), metavar=("MIN", "MAX"),
                    help="seconds of load before each kill, drawn uniformly (default 0.2 1.2)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory even when all is well")
    ap.add_argument("--power-cuts", action="store_true",
                    help="the storage root on forgetful_fs.py: every kill is a power cut that loses what was "
                         "not fsynced (needs root, libfuse2 and fusepy; exit status 77 when missing)")
    args = ap.parse_args()
    if args.power_cuts and (why := power_cuts_unavailable()):
        print(f"SKIPPED: power cuts cannot run here: {why}")
        return 77
    seed = args.seed or str(random.SystemRandom().randrange(10**9))
    print(f"crash_loop: seed {seed} (rerun with --seed {seed}), {args.kills} {'power cuts' if args.power_cuts else 'kills'}, "
          f"{args.smtp_clients} SMTP + {args.pop3_clients} POP3 clients", flush=True)
    started = time.monotonic()
    loop = CrashLoop(args, seed)
    try:
        figures = loop.run()
    except Exception:
        print(f"FAILED: the run broke off (work directory kept: {loop.workdir}; "
              f"server log {loop.srv.log_path})", flush=True)
        raise
    loop.report(figures, time.monotonic() - started)
    return loop.verdict(figures)


if __name__ == "__main__":
    sys.exit(main())
