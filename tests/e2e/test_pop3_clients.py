"""POP3 with real clients (poplib, curl, mpop) and the mailbox guarantees: exclusive sessions, no deletion
without QUIT even across kill -9, Maildir flags, throttled password guessing."""

from __future__ import annotations

import base64
import poplib
import shutil
import signal
import subprocess
import threading
import time

import pytest

from conftest import ALICE, BOB, PASSWORDS
from e2e_helpers import DOMAIN, make_message, match_trace_headers, retr_all_subjects, wait_until


def deliver(server, count=1, to=ALICE) -> list[str]:
    return [subject for subject, _ in deliver_messages(server, count, to)]


def deliver_messages(server, count=1, to=ALICE) -> list[tuple[str, bytes]]:
    """Sends `count` messages with a leading dot and 8-bit text; returns (subject, bytes sent)."""
    sent = []
    for i in range(count):
        subject, msg = make_message(to, body_lines=[b".leading dot", "8-bit: \u00e9t\u00e9".encode(), b"line %d" % i])
        assert server.send([to], msg) == {}
        sent.append((subject, msg))
    return sent


def test_poplib_capa_top_uidl_and_apop(server_factory, tmp_path):
    secret = tmp_path / "alice.apop"
    secret.write_text("apop-shared-secret\n")
    srv = server_factory()
    accounts = {ALICE: {**srv.account(ALICE), "apop_secret_file": str(secret)}, BOB: srv.account(BOB)}
    srv.write_config(accounts)
    srv.start()
    deliver(srv, 2)
    p = srv.pop3_connect()
    try:
        assert b"<" in p.getwelcome(), "APOP timestamp in the greeting"
        capa = p.capa()
        for cap in ("TOP", "UIDL", "USER", "SASL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "EXPIRE", "IMPLEMENTATION"):
            assert cap in capa, (cap, capa)
        assert capa["SASL"] == ["PLAIN"] and capa["EXPIRE"] == ["NEVER"]
        p.apop(ALICE, "apop-shared-secret")
        resp, lines, _ = p.top(1, 0)
        assert resp.startswith(b"+OK") and b"" in lines and not any(l.startswith(b"line ") for l in lines)
        uids = p.uidl()[1]
        assert len(uids) == 2 and uids[0] != uids[1]
        p.quit()
    finally:
        p.close()
    wrong = srv.pop3_connect()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        wrong.apop(ALICE, "not-the-secret")
    wrong.close()


def test_sasl_plain_login(server):
    deliver(server)
    p = server.pop3_connect()
    try:
        token = base64.b64encode(f"\0{ALICE}\0{PASSWORDS[ALICE]}".encode()).decode()
        assert p._shortcmd(f"AUTH PLAIN {token}").startswith(b"+OK")
        assert p.stat()[0] == 1
        p.quit()
    finally:
        p.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_pop3_retrieves_the_exact_bytes(server):
    ((_, sent),) = deliver_messages(server)
    out = subprocess.run(
        ["curl", "--silent", "--show-error", f"pop3://127.0.0.1:{server.pop3_port}/1",
         "--user", f"{ALICE}:{PASSWORDS[ALICE]}"],
        capture_output=True, timeout=30, check=True).stdout
    # What was sent, after the two trace fields the server prepends: compared with the sent bytes, not
    # with the server's own file (which a broken SMTP side would have stored wrongly).
    _, rest = match_trace_headers(out, rcpt=ALICE)
    assert rest == sent


@pytest.mark.skipif(shutil.which("mpop") is None, reason="mpop is not installed")
def test_mpop_downloads_every_message_byte_identical(server, tmp_path):
    sent = [msg for _, msg in deliver_messages(server, 3)]
    target = tmp_path / "maildir"
    for sub in ("cur", "new", "tmp"):
        (target / sub).mkdir(parents=True)
    done = subprocess.run(
        ["mpop", "--host=127.0.0.1", f"--port={server.pop3_port}", "--auth=user", f"--user={ALICE}",
         f"--passwordeval=echo '{PASSWORDS[ALICE]}'", "--tls=off", f"--delivery=maildir,{target}",
         "--keep=off", "--only-new=off", f"--uidls-file={tmp_path / 'uidls'}"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    fetched = []
    for path in sorted((target / "new").iterdir()):
        data = path.read_bytes()
        # mpop puts a Received: header of its own first (folded over several lines) and stores LF line
        # endings; then come the server's trace fields and what was sent.
        first, rest = data.split(b"\n", 1)
        assert first.startswith(b"Received: ")
        while rest[:1] in (b"\t", b" "):
            rest = rest.split(b"\n", 1)[1]
        assert b"\r" not in rest, rest[:200]
        _, message = match_trace_headers(rest, rcpt=ALICE, eol=b"\n")
        fetched.append(message.replace(b"\n", b"\r\n"))
    assert sorted(fetched) == sorted(sent), "mpop got other bytes than were sent"
    assert server.stored_messages(ALICE) == [], "--keep=off: deleted after QUIT"


def test_second_session_gets_in_use(server):
    deliver(server)
    first = server.pop3(ALICE)
    try:
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            server.pop3(ALICE)
    finally:
        first.quit()
    server.pop3(ALICE).quit()  # free again after QUIT


def test_kill_9_during_a_session_with_deletions_keeps_every_message_and_no_stale_lock(server):
    subjects = deliver(server, 3)
    p = server.pop3(ALICE)
    p.dele(1)
    p.dele(2)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=10)
    p.close()
    server.proc = None
    server.start()
    q = server.pop3(ALICE)  # the flock died with the process: no stale lock
    try:
        assert sorted(retr_all_subjects(q)) == sorted(subjects)
    finally:
        q.quit()


def test_new_mail_moves_to_cur_and_retr_sets_seen(server):
    deliver(server, 2)
    p = server.pop3(ALICE)

    def flags():
        return sorted(f.name.split(":2,")[1] for f in server.maildir_files(ALICE, "cur"))

    try:
        assert server.maildir_files(ALICE, "new") == []
        assert flags() == ["", ""]
        uids = p.uidl()[1]
        p.retr(1)
        p.quit()  # the Seen flags are set in UPDATE, before the answer to QUIT
    finally:
        p.close()
    assert flags() == ["", "S"]
    q = server.pop3(ALICE)
    try:
        assert q.uidl()[1] == uids, "UIDs do not change with flags"
    finally:
        q.quit()


def test_seen_flags_also_set_when_the_client_drops(server):
    deliver(server, 1)
    p = server.pop3(ALICE)
    p.retr(1)
    p.close()  # no QUIT
    wait_until(lambda: [f.name.endswith(":2,S") for f in server.maildir_files(ALICE, "cur")] == [True],
               timeout=5, message="the S flag after a dropped session")
    server.pop3(ALICE).quit()  # and the mailbox is free again


def test_repeated_failures_slow_down_and_then_lock_out_the_address(server_factory):
    srv = server_factory(auth={"failure_delay_ms": 100, "max_failures_per_ip": 3, "max_failures": 10})
    srv.start()
    p = srv.pop3_connect()
    timings = []
    for _ in range(3):
        p.user(ALICE)
        started = time.monotonic()
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            p.pass_("wrong")
        timings.append(time.monotonic() - started)
    # 100 ms, 200 ms, 400 ms: each failure waits at least its doubled delay.
    assert timings[1] >= 0.2 and timings[2] >= 0.4, timings
    p.user(ALICE)
    with pytest.raises(poplib.error_proto, match=r"too many failed logins"):
        p.pass_(PASSWORDS[ALICE])  # even the right password, from this address, for now
    p.close()
    assert "login refused: too many failures" in srv.log_text()


def test_sixteen_parallel_correct_logins_from_one_address_all_succeed(server_factory, password_hashes):
    # A mail client opening many connections at once: with the default auth.max_failures_per_ip (10),
    # logins still being verified must not count as failures and lock the address out.
    users = [f"user{i}@{DOMAIN}" for i in range(16)]
    srv = server_factory(accounts={u: {"password_hash": password_hashes[ALICE]} for u in users})
    srv.start()
    barrier = threading.Barrier(len(users))
    answers: dict[str, str] = {}

    def login(user):
        p = srv.pop3_connect()
        try:
            p.user(user)
            barrier.wait(timeout=30)
            try:
                answers[user] = p.pass_(PASSWORDS[ALICE]).decode()
            except poplib.error_proto as e:
                answers[user] = repr(e.args[0])
            p.quit()
        finally:
            p.close()

    threads = [threading.Thread(target=login, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(answers) == sorted(users), answers
    refused = {u: a for u, a in answers.items() if not a.startswith("+OK")}
    assert refused == {}, refused
    assert "too many failures" not in srv.log_text()


def test_unknown_user_and_wrong_password_get_the_same_answer(server):
    answers = []
    for user in (ALICE, "nobody@example.test"):
        p = server.pop3_connect()
        p.user(user)
        with pytest.raises(poplib.error_proto) as e:
            p.pass_("wrong")
        answers.append(e.value.args[0])
        p.close()
    assert answers[0] == answers[1] == b"-ERR [AUTH] invalid user name or password"
