"""The durability order, seen in the system calls of the real binary under strace: nothing is
acknowledged before it is on disk.

- SMTP `250` after DATA, a small message (the journal, src/storage/journal.rs): its record is written
  to a journal segment and that segment fdatasynced before the `250`; after that it is written into an
  unnamed file (O_TMPFILE) and linked straight into each recipient's new/ (no name in tmp/ or the spool
  at all); later the settling thread fsyncs the file, then each new/, then writes and fdatasyncs a
  checkpoint, in that order.
- SMTP `250` after DATA, a message too large for the journal: the spool file is fsynced, linked into
  each recipient's tmp/ and new/, and each new/ directory is fsynced, all before the `250` is sent.
- POP3 `+OK` of QUIT: the deleted files are unlinked and their directory fsynced before the `+OK`.
"""

from __future__ import annotations

import poplib
import re
import smtplib
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ALICE, BOB, PASSWORDS
from e2e_helpers import make_message, strace_attached, wait_until

SYSCALLS = "fsync,fdatasync,pwrite64,link,linkat,rename,renameat,renameat2,unlink,unlinkat,sendto,write,writev"

LINE = re.compile(r"^(\d+) +(.*)$")
RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
CALL = re.compile(r"^(\w+)\((.*)$")


@dataclass
class Call:
    name: str
    text: str  # the arguments as strace printed them (paths resolved with -y)
    entered: int  # index of the line where the call began
    finished: int  # index of the line where it returned


def parse_strace(path: Path) -> list[Call]:
    """Every call, with where it began and ended (strace -f splits overlapping calls into an
    `<unfinished ...>` line and a `<... resumed>` line)."""
    calls: list[Call] = []
    pending: dict[tuple[str, str], Call] = {}
    for i, raw in enumerate(path.read_text(errors="replace").splitlines()):
        m = LINE.match(raw)
        if not m:
            continue
        pid, rest = m.groups()
        if r := RESUMED.match(rest):
            call = pending.pop((pid, r.group(1)), None)
            if call:
                call.finished = i
                call.text += r.group(2)
            continue
        if c := CALL.match(rest):
            call = Call(c.group(1), c.group(2), i, i)
            calls.append(call)
            if rest.endswith("<unfinished ...>"):
                pending[(pid, call.name)] = call
    return calls


def first(calls: list[Call], name: str | tuple[str, ...], *needles: str) -> Call:
    names = (name,) if isinstance(name, str) else name
    for call in calls:
        if call.name in names and all(n in call.text for n in needles):
            return call
    raise AssertionError(f"no {names} call with {needles}")


def before(a: Call, b: Call) -> bool:
    """`a` returned before `b` began."""
    return a.finished < b.entered


@pytest.fixture
def traced(server_factory, tmp_path):
    """A running server with strace attached to all its threads (attached rather than started under
    strace, so that the server's own exit code still counts at teardown)."""
    srv = server_factory()
    srv.start()
    trace = tmp_path / "strace.txt"
    with strace_attached(srv.proc.pid, "-y", "-s", "256", "-e", f"trace={SYSCALLS}", "-o", str(trace)):
        yield srv, trace


def send_to_both(srv, body_lines: list[bytes]) -> str:
    """Sends one message to alice and bob; its queue id."""
    _, msg = make_message(ALICE, body_lines=body_lines)
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=30) as c:
        c.ehlo("client.test")
        c.mail("sender@client.test")
        c.rcpt(ALICE)
        c.rcpt(BOB)
        code, reply = c.data(msg)
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def acknowledged(trace: Path, queue_id: str, more=lambda calls: True):
    calls = wait_until(lambda: (calls := parse_strace(trace)) and any(
        c.name == "sendto" and f"queued as {queue_id}" in c.text for c in calls) and more(calls) and calls,
        timeout=10, message="the 250 (and what follows it) in the trace")
    return calls, first(calls, ("sendto", "write", "writev"), f"queued as {queue_id}")


def unnamed_link(calls: list[Call], queue_id: str, address: str) -> tuple[Call, str, int]:
    """The link of an unnamed file (/proc/self/fd/N) into `address`'s new/, that Maildir's path and N."""
    local, domain = address.split("@")
    maildir = f"/mail/{domain}/{local}"
    into_new = first(calls, ("link", "linkat"), '"/proc/self/fd/', f"{maildir}/new/{queue_id}")
    assert "AT_SYMLINK_FOLLOW" in into_new.text, into_new.text
    fd = int(re.search(r'"/proc/self/fd/(\d+)"', into_new.text).group(1))
    return into_new, maildir, fd


def links(calls: list[Call], source: str, queue_id: str, address: str) -> tuple[Call, Call, str]:
    """The link into tmp/ and the move into new/ of `address`'s Maildir, and that Maildir's path."""
    local, domain = address.split("@")
    maildir = f"/mail/{domain}/{local}"
    into_tmp = first(calls, ("link", "linkat"), source, f"{maildir}/tmp/")
    into_new = first(calls, ("link", "linkat", "rename", "renameat", "renameat2"),
                     f"{maildir}/tmp/{queue_id}", f"{maildir}/new/{queue_id}")
    assert before(into_tmp, into_new), f"{address}: tmp/ before new/"
    return into_tmp, into_new, maildir


def syncs_of(calls: list[Call], needle: str, after: Call) -> list[Call]:
    return [c for c in calls if c.name in ("fsync", "fdatasync") and needle in c.text and c.entered > after.finished]


def test_250_of_a_small_message_only_after_its_journal_record_is_fdatasynced(traced):
    srv, trace = traced
    queue_id = send_to_both(srv, [b"durable"] * 50)

    def settled(calls):  # the checkpoint after the new/ fsyncs, when the settling thread has run
        try:
            return bool(checkpoint_after_settling(calls))
        except AssertionError:
            return False

    def checkpoint_after_settling(calls):
        new_syncs = []
        for address in (ALICE, BOB):
            into_new, maildir, fd = unnamed_link(calls, queue_id, address)
            file_sync = [c for c in calls if c.name == "fsync" and c.text.startswith(f"{fd}<")
                         and c.entered > into_new.finished]
            assert file_sync, f"{address}: the message file fsynced after the link"
            dir_sync = syncs_of(calls, f"{maildir}/new>", file_sync[0])
            assert dir_sync, f"{address}: new/ fsynced after the file"
            new_syncs.append(dir_sync[0])
        last = max(new_syncs, key=lambda c: c.finished)
        return syncs_of(calls, "/journal/", last)

    calls, ack = acknowledged(trace, queue_id, settled)
    record = first(calls, "pwrite64", "/journal/", queue_id)
    journal_sync = syncs_of(calls, "/journal/", record)
    assert journal_sync and before(journal_sync[0], ack), "the journal fdatasynced after the record, before the 250"
    for address in (ALICE, BOB):
        into_new, maildir, fd = unnamed_link(calls, queue_id, address)
        assert before(journal_sync[0], into_new), f"{address}: linked after the journal fdatasync"
        assert before(into_new, ack), f"{address}: in new/ before the 250"
        assert not [c for c in calls if c.name == "fsync" and c.text.startswith(f"{fd}<") and c.finished < ack.entered], \
            "no fsync of the message file before the 250 (the journal stands in for it)"
    names = [f"/spool/{queue_id}"] + [f"/mail/example.test/{a.split('@')[0]}/tmp/{queue_id}" for a in (ALICE, BOB)]
    named = [c for c in calls if c.name in ("link", "linkat", "rename", "renameat", "renameat2", "unlink", "unlinkat")
             and (any(n in c.text for n in names) or (c.name.startswith("unlink") and queue_id in c.text))]
    assert not named, f"a small message never gets a name in tmp/ or the spool: {named}"
    assert checkpoint_after_settling(calls), "a checkpoint fdatasynced after the files and new/ were"


def test_250_of_a_message_too_large_for_the_journal_only_after_spool_fsync_links_and_new_fsyncs(traced):
    srv, trace = traced
    queue_id = send_to_both(srv, [b"x" * 998] * 1200)  # 1.2 MB: above the journal's 1 MiB
    calls, ack = acknowledged(trace, queue_id)
    assert not [c for c in calls if c.name == "pwrite64" and queue_id in c.text], "not journalled"
    spool_fsync = first(calls, ("fsync", "fdatasync"), f"/spool/{queue_id}")
    assert before(spool_fsync, ack), "spool file fsynced before the 250"
    for address in (ALICE, BOB):
        into_tmp, into_new, maildir = links(calls, f"/spool/{queue_id}", queue_id, address)
        new_fsync = syncs_of(calls, f"{maildir}/new>", into_new)
        assert before(spool_fsync, into_tmp), f"{address}: linked after the spool fsync"
        assert new_fsync, f"{address}: new/ fsynced after the link"
        assert before(new_fsync[0], ack), f"{address}: new/ fsynced before the 250"


def test_quit_ok_only_after_deleted_files_are_unlinked_and_their_directory_fsynced(traced):
    srv, trace = traced
    srv.send([ALICE], make_message(ALICE, body_lines=[b"to delete"])[1])
    p = poplib.POP3("127.0.0.1", srv.pop3_port, timeout=30)
    p.user(ALICE)
    p.pass_(PASSWORDS[ALICE])
    (_, listing, _) = p.uidl()
    assert len(listing) == 1
    p.dele(1)
    assert p.quit().startswith(b"+OK")

    def quit_seen():
        calls = parse_strace(trace)
        return any(c.name == "sendto" and "signing off" in c.text for c in calls) and calls

    calls = wait_until(quit_seen, timeout=10, message="the +OK of QUIT in the trace")
    ok = first(calls, ("sendto", "write", "writev"), "signing off")
    unlink = first(calls, ("unlink", "unlinkat"), "/mail/example.test/alice/cur/")
    cur_fsync = [c for c in calls if c.name in ("fsync", "fdatasync")
                 and "/mail/example.test/alice/cur>" in c.text and c.entered > unlink.finished]
    assert before(unlink, ok), "the message is unlinked before the +OK"
    assert cur_fsync and before(cur_fsync[0], ok), "cur/ is fsynced after the unlink, before the +OK"
