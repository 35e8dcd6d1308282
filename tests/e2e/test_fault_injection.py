"""Storage faults injected into the real binary's system calls (strace -e inject=…, attached to the
running server and detached again): nothing is acknowledged that was not stored, the reply says the
failure is temporary, nothing half-done is left behind, and the server works again once the fault is
gone.

- fsync or link failing with EIO during DATA: `451 4.3.0`, no file in any new/ or tmp/.
- unlink failing with EIO in POP3's UPDATE state: `-ERR [SYS/TEMP]` for QUIT, every message still there.
"""

from __future__ import annotations

import poplib
import smtplib

import pytest

from conftest import ALICE, BOB, PASSWORDS
from e2e_helpers import make_message, strace_attached, wait_until


def send(srv, subject: str) -> tuple[int, bytes]:
    _, msg = make_message(ALICE, subject=subject)
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=30) as c:
        c.ehlo("client.test")
        c.mail("sender@client.test")
        c.rcpt(ALICE)
        c.rcpt(BOB)
        return c.data(msg)


def login(srv) -> poplib.POP3 | None:
    p = poplib.POP3("127.0.0.1", srv.pop3_port, timeout=30)
    p.user(ALICE)
    try:
        p.pass_(PASSWORDS[ALICE])
    except poplib.error_proto as e:
        assert e.args[0].startswith(b"-ERR [IN-USE]"), e
        p.close()
        return None
    return p


def leftovers(srv) -> list:
    return [f for address in (ALICE, BOB) for sub in ("new", "tmp") for f in srv.maildir_files(address, sub)]


# The store's calls: the spool file and directories are fsynced, the file linked into tmp/ and new/
# (rename is not used: test_durability_order.py shows the sequence).
@pytest.mark.parametrize("calls", ["fsync,fdatasync", "link,linkat"])
def test_a_failing_storage_call_during_data_is_451_and_leaves_nothing_then_recovers(server, calls):
    with strace_attached(server.proc.pid, "-e", f"trace={calls}", "-e", f"inject={calls}:error=EIO"):
        code, reply = send(server, "faulty disk")
    assert (code, reply[:5]) == (451, b"4.3.0"), (code, reply)
    assert leftovers(server) == [], "a refused message left files behind"
    code, reply = send(server, "disk is back")
    assert code == 250, reply
    assert len(server.maildir_files(ALICE)) == 1 and len(server.maildir_files(BOB)) == 1


def test_unlink_failing_at_pop3_quit_is_sys_temp_and_deletes_nothing(server):
    for n in range(2):
        assert send(server, f"keep {n}")[0] == 250
    p = poplib.POP3("127.0.0.1", server.pop3_port, timeout=30)
    p.user(ALICE)
    p.pass_(PASSWORDS[ALICE])
    p.dele(1)
    p.dele(2)
    with strace_attached(server.proc.pid, "-e", "trace=unlink,unlinkat", "-e", "inject=unlink,unlinkat:error=EIO"):
        with pytest.raises(poplib.error_proto) as refused:
            p.quit()
    assert refused.value.args[0].startswith(b"-ERR [SYS/TEMP]"), refused.value
    assert len(server.stored_messages(ALICE)) == 2, "a deletion reported as failed happened anyway"
    # Without the fault, the next session deletes them (once the failed one has let go of the mailbox:
    # [IN-USE] until then).
    p = wait_until(lambda: login(server), timeout=10, message="the mailbox to be free again")
    assert p.stat()[0] == 2
    p.dele(1)
    p.dele(2)
    assert p.quit().startswith(b"+OK")
    assert server.stored_messages(ALICE) == []
