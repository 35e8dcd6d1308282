"""Clients that misbehave at the transport level: stop reading, pipeline past a stop, flood connections."""

from __future__ import annotations

import poplib
import signal
import socket
import time

import pytest

from conftest import ALICE, BOB, PASSWORDS
from e2e_helpers import STOP_TIMEOUT, make_message, read_reply, served_sessions, wait_until



IDLE_SECS = 3


def test_client_that_stops_reading_loses_its_session_and_pop3_lock(server_factory):
    # README: "a client that stops reading its replies is disconnected after the same time, so it cannot
    # hold a session (or a POP3 mailbox) open". A RETR whose writes stall is cut after
    # pop3_idle_timeout_secs; the whole download is also capped at idle + 2 * size / min_data_rate,
    # here 3 s + 12 MB / 500 B/s, hours away: only the stall deadline can end this session in time.
    srv = server_factory(limits={"pop3_idle_timeout_secs": IDLE_SECS, "max_message_size": 8_000_000})
    srv.start()
    _, msg = make_message(ALICE, body_lines=[b"z" * 990] * 6000)  # about 6 MB, far more than buffers hold
    srv.send([ALICE], msg)
    stalled = socket.create_connection(("127.0.0.1", srv.pop3_port))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    f = stalled.makefile("rb")
    try:
        f.readline()
        stalled.sendall(f"USER {ALICE}\r\nPASS {PASSWORDS[ALICE]}\r\n".encode())
        assert f.readline().startswith(b"+OK") and f.readline().startswith(b"+OK")
        stalled.sendall(b"RETR 1\r\n")  # and never read the answer
        retr_sent = time.monotonic()

        # Right after the RETR, the stalled session holds the mailbox: a second login is refused.
        with pytest.raises(poplib.error_proto) as refused:
            srv.pop3(ALICE)
        assert refused.value.args[0].startswith(b"-ERR [IN-USE]"), refused.value

        # Then the write deadline ends the session and frees the lock: not at once, and not never.
        def second_login() -> bool:
            try:
                srv.pop3(ALICE).quit()
                return True
            except poplib.error_proto as e:
                # Only "still locked" is a reason to try again; any other refusal fails the test.
                assert e.args[0].startswith(b"-ERR [IN-USE]"), e
                return False

        deadline = retr_sent + IDLE_SECS + 20
        while not second_login():
            assert time.monotonic() < deadline, (
                f"the mailbox is still locked {time.monotonic() - retr_sent:.1f} s after the stalled RETR "
                f"(pop3_idle_timeout_secs = {IDLE_SECS})\n{srv.log_tail()}")
            time.sleep(0.2)
        released = time.monotonic() - retr_sent
        assert released >= IDLE_SECS - 0.5, (
            f"released {released:.1f} s after the RETR: before a write could have stalled for "
            f"{IDLE_SECS} s, so not by the write deadline\n{srv.log_tail()}")
        assert "peer does not read fast enough" in srv.log_text()
    finally:
        stalled.close()


def test_stop_during_data_answers_421_to_commands_pipelined_after_the_dot(server):
    c = socket.create_connection(("127.0.0.1", server.smtp_port), timeout=10)
    f = c.makefile("rb")
    read_reply(f)
    for line in (b"EHLO c.test", f"MAIL FROM:<a@remote.test>".encode(), f"RCPT TO:<{ALICE}>".encode(), b"DATA"):
        c.sendall(line + b"\r\n")
        read_reply(f)
    c.sendall(b"Subject: in flight\r\n\r\nbody\r\n")
    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopping" in server.log_text(), timeout=10, message="the stop to begin")
    c.sendall(f".\r\nMAIL FROM:<b@remote.test>\r\nRCPT TO:<{BOB}>\r\nDATA\r\n".encode())
    assert read_reply(f).startswith(b"250 2.0.0"), "the message in flight is finished and acknowledged"
    assert read_reply(f).startswith(b"421 4.3.2"), "nothing after it is accepted"
    c.close()
    assert server.proc.wait(timeout=STOP_TIMEOUT) == 0
    assert len(server.stored_messages(ALICE)) == 1
    assert server.stored_messages(BOB) == []


def test_connections_per_ip_are_capped(server_factory):
    srv = server_factory(limits={"max_connections_per_ip": 3})
    srv.start()

    held = wait_until(lambda: served_sessions([("127.0.0.1", srv.smtp_port)] * 3), timeout=10,
                      message="three connections to be served")
    try:
        extra = socket.create_connection(("127.0.0.1", srv.smtp_port), timeout=10)
        assert extra.makefile("rb").readline().startswith(b"421 4.7.0")
        extra.close()
    finally:
        for c in held:
            c.close()
    # Once they are gone, the address may connect again.
    wait_until(lambda: srv.smtp().ehlo()[0] == 250, timeout=10, message="a new connection to be served")


@pytest.mark.parametrize("tool", ["swaks", "curl"])
def test_real_clients_deliver(server, tool, tmp_path):
    """swaks and curl smtp:// as real SMTP clients (installed by .ci/run)."""
    import shutil
    import subprocess

    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    body = tmp_path / "msg.eml"
    body.write_bytes(f"From: a@remote.test\r\nTo: {ALICE}\r\nSubject: via {tool}\r\n\r\nhello from {tool}\r\n".encode())
    if tool == "swaks":
        cmd = ["swaks", "--server", f"127.0.0.1:{server.smtp_port}", "--from", "a@remote.test",
               "--to", ALICE, "--data", f"@{body}", "--helo", "client.test"]
    else:
        cmd = ["curl", "--silent", "--show-error", f"smtp://127.0.0.1:{server.smtp_port}/client.test",
               "--mail-from", "a@remote.test", "--mail-rcpt", ALICE, "--upload-file", str(body)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    p = server.pop3(ALICE)
    try:
        _, lines, _ = p.retr(1)
        assert f"Subject: via {tool}".encode() in lines
        assert f"hello from {tool}".encode() in lines
    finally:
        p.quit()


HOSTILE_SESSIONS = [
    # smuggling in several line-ending forms
    b"EHLO x\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nhi\n.\nMAIL FROM:<e@r.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nsmuggled\r\n",
    b"EHLO x\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nhi\r.\rQUIT\r\n",
    b"EHLO x\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nhi\n.\r\nRSET\r\n",
    # an over-long command, a 200 kB data line (any length is accepted by default, but not over the
    # size limit), a message over the limit
    b"EHLO x\r\nNOOP " + b"A" * 100_000 + b"\r\n",
    b"EHLO x\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n" + b"B" * 200_000 + b"\r\n.\r\n",
    b"EHLO x\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n" + (b"C" * 998 + b"\r\n") * 200 + b".\r\n",
    # cross-protocol and garbage
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00\x01\x02\xff\xfe\r\n" * 50,
    b"FOO\r\n" * 100,
    # relay probes and enumeration
    b"EHLO x\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<u%evil.test@example.test>\r\nRCPT TO:<@example.test:u@evil.test>\r\nRCPT TO:<u@[127.0.0.1]>\r\nRCPT TO:<u@evil.test>\r\nDATA\r\nx\r\n.\r\n",
    b"EHLO x\r\n" + b"VRFY alice\r\nEXPN team\r\n" * 20,
    # BDAT whose chunk hides commands, and a bogus chunk size
    b"EHLO x\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nBDAT 20 LAST\r\nx\nMAIL FROM:<e@r.t>\r\n",
    b"EHLO x\r\nBDAT 99999999999999999999999\r\n",
]


def test_a_dozen_hostile_sessions_leave_the_server_serving_and_deliver_nothing(server_factory):
    server = server_factory(limits={"max_message_size": 100_000})  # the 200 kB message is over it
    server.start()
    for raw in HOSTILE_SESSIONS:
        c = socket.create_connection(("127.0.0.1", server.smtp_port), timeout=10)
        try:
            c.sendall(raw)
            c.shutdown(socket.SHUT_WR)
            while c.recv(65536):
                pass
        except OSError:
            pass  # the server may close first, which is fine
        finally:
            c.close()
    server.assert_alive()
    assert server.all_stored_files() == [], "nothing hostile was delivered"
    subject, msg = make_message(ALICE)
    assert server.send([ALICE], msg) == {}
    assert len(server.stored_messages(ALICE)) == 1
