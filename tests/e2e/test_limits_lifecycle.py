"""[limits] enforcement, and stopping/restarting the daemon without losing mail."""

from __future__ import annotations

import signal
import smtplib

import pytest

from conftest import ALICE, ALICE_ALIAS, BOB, CAROL
from e2e_helpers import SENDER, STOP_TIMEOUT, make_message, make_message_of_size, retr_all_subjects


# README: "largest message in octets (CRLF form), advertised as SIZE; larger → 552 5.3.4", and
# "recipients per message; more → 452 4.5.3".
MAX_SIZE = 10_000


def test_message_over_max_message_size_refused_with_size_declared(server_factory):
    srv = server_factory(limits={"max_message_size": MAX_SIZE})
    srv.start()
    msg = make_message_of_size(ALICE, MAX_SIZE + 1)
    with srv.smtp() as s:
        s.ehlo()
        assert s.has_extn("size") and s.esmtp_features["size"] == str(MAX_SIZE)
        with pytest.raises(smtplib.SMTPSenderRefused) as excinfo:
            s.sendmail(SENDER, [ALICE], msg)  # smtplib declares SIZE=10001 in MAIL FROM
    assert excinfo.value.smtp_code == 552, excinfo.value
    assert excinfo.value.smtp_error.startswith(b"5.3.4 "), excinfo.value
    assert srv.all_stored_files() == []


def test_message_over_max_message_size_refused_without_size_declared(server_factory):
    srv = server_factory(limits={"max_message_size": MAX_SIZE})
    srv.start()
    msg = make_message_of_size(ALICE, MAX_SIZE + 1)
    with srv.smtp() as s:
        s.ehlo()
        assert s.mail(SENDER)[0] == 250  # no SIZE parameter: the limit must be enforced during DATA
        assert s.rcpt(ALICE)[0] == 250
        code, text = s.data(msg)
        assert (code, text[:6]) == (552, b"5.3.4 "), f"oversized DATA answered {code} {text!r}"
        # The session stays usable after a refused message.
        _, small = make_message(ALICE)
        assert s.sendmail(SENDER, [ALICE], small) == {}
    assert len(srv.maildir_files(ALICE, "new")) == 1


def test_message_exactly_at_max_message_size_accepted(server_factory):
    srv = server_factory(limits={"max_message_size": MAX_SIZE})
    srv.start()
    msg = make_message_of_size(ALICE, MAX_SIZE)
    assert srv.send([ALICE], msg) == {}  # with SIZE=10000 declared
    with srv.smtp() as s:
        s.ehlo()
        assert s.mail(SENDER)[0] == 250
        assert s.rcpt(ALICE)[0] == 250
        code, text = s.data(msg)  # counted during DATA
        assert code == 250, (code, text)
    assert len(srv.maildir_files(ALICE, "new")) == 2


def test_recipients_over_max_recipients_refused(server_factory):
    # 100 is the least RFC 5321 §4.5.3.1.8 allows, and the least the config accepts.
    srv = server_factory(limits={"max_recipients": 100})
    srv.start()
    _, msg = make_message(ALICE)
    tagged = [ALICE.replace("@", f"+{i}@") for i in range(100)]
    refused = srv.send(tagged + [BOB], msg)
    assert list(refused) == [BOB], refused
    code, text = refused[BOB]
    assert (code, text[:6]) == (452, b"4.5.3 "), refused
    assert len(srv.maildir_files(ALICE, "new")) == 1
    assert len(srv.maildir_files(BOB, "new")) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_gracefully_with_exit_code_0(server, sig):
    _, msg = make_message(ALICE)
    server.send([ALICE], msg)
    server.stop_ok(sig)
    assert len(server.maildir_files(ALICE, "new")) == 1


def test_sigterm_with_idle_open_sessions_exits_0_and_keeps_pending_dele(server):
    subjects = []
    for _ in range(2):
        subject, msg = make_message(ALICE)
        server.send([ALICE], msg)
        subjects.append(subject)
    smtp = server.smtp()
    smtp.ehlo()
    pop = server.pop3(ALICE)
    pop.dele(1)  # never QUIT: the deletion must not happen
    try:
        code = server.stop(signal.SIGTERM, timeout=STOP_TIMEOUT)
        assert code == 0, f"exit code {code} after SIGTERM with open sessions\n{server.log_tail()}"
    finally:
        for closer in (smtp.close, pop.close):
            try:
                closer()
            except Exception:  # noqa: BLE001
                pass
    assert len(server.stored_messages(ALICE)) == 2, server.all_stored_files()
    server.start()
    p = server.pop3(ALICE)
    try:
        assert sorted(retr_all_subjects(p)) == sorted(subjects)
    finally:
        p.quit()


def test_mail_delivered_before_restart_fetchable_after(server):
    subject, msg = make_message(BOB)
    server.send([BOB], msg)
    server.restart()
    p = server.pop3(BOB)
    try:
        assert retr_all_subjects(p) == [subject]
    finally:
        p.quit()
    _, msg = make_message(CAROL)
    code, _ = server.rcpt_code(CAROL)
    assert code == 550, "carol is not configured and must stay refused after a restart"


def test_storage_failure_answers_4xx_and_leaves_nothing_in_any_new(server):
    # Bob's Maildir is broken (new/ is a file), Alice's is fine: a message to both must be refused
    # temporarily as a whole, not delivered to Alice alone.
    new = server.maildir(BOB) / "new"
    for f in new.iterdir():
        f.unlink()
    new.rmdir()
    new.write_bytes(b"not a directory")
    _, msg = make_message(ALICE)
    with server.smtp() as s:
        s.ehlo()
        assert s.mail(SENDER)[0] == 250
        assert s.rcpt(ALICE)[0] == 250
        assert s.rcpt(BOB)[0] == 250
        code, text = s.data(msg)
        assert code == 451, (code, text)
        assert text.startswith(b"4.3.0"), text
    assert server.maildir_files(ALICE, "new") == []
    assert list((server.maildir(ALICE) / "tmp").iterdir()) == []
    assert "delivery failed" in server.log_text()
