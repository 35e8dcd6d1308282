"""SMTP in -> Maildir -> POP3 out: content fidelity, routing, refusals."""

from __future__ import annotations

import poplib
import smtplib

import pytest

from conftest import ALICE, ALICE_ALIAS, BOB
from e2e_helpers import (
    DOMAIN,
    SENDER,
    make_message,
    pop3_message_bytes,
    retr_all_subjects,
    split_prepended_headers,
    subject_of,
)

LONG_LINE = ("x" * 97 + "yz ") * 9  # 900 octets
MAX_LINE = b"M" * 998  # the longest line RFC 5321 allows (998 octets + CRLF)

TRICKY_BODY = [
    b"First line of the body.",
    b".A line starting with a single dot.",
    b".",
    b"..Two dots at the start.",
    b"...",
    b"Line with a dot in the middle . and at the end.",
    b"From the start of a line (mbox would escape this).",
    "UTF-8 8-bit text: Gr\u00fc\u00dfe, na\u00efve caf\u00e9, \u65e5\u672c\u8a9e, \u2713 \u20ac".encode("utf-8"),
    LONG_LINE.encode(),
    MAX_LINE,
    b"",
    b"\tA line starting with a tab, and trailing spaces   ",
    b"",
    b"Last line.",
]


def fetch_only_message(server, address):
    p = server.pop3(address)
    try:
        count, _ = p.stat()
        assert count == 1, f"expected exactly 1 message for {address}, STAT says {count}"
        resp, lines, octets = p.retr(1)
        assert resp.startswith(b"+OK"), resp
        return lines, octets
    finally:
        p.quit()


def test_roundtrip_body_is_byte_identical_dots_8bit_long_lines(server):
    _, msg = make_message(ALICE, body_lines=TRICKY_BODY)
    refused = server.send([ALICE], msg)
    assert refused == {}

    lines, octets = fetch_only_message(server, ALICE)
    fetched = pop3_message_bytes(lines)
    assert octets == len(fetched), (
        "RETR octet count differs from CRLF-joined lines: the server did not end every line with CRLF"
    )
    fields, rest = split_prepended_headers(lines)
    got = pop3_message_bytes(rest)
    if got != msg:
        # Show the first differing line to make the failure readable.
        sent_lines = msg.split(b"\r\n")
        got_lines = got.split(b"\r\n")
        for i, (a, b) in enumerate(zip(sent_lines, got_lines)):
            if a != b:
                pytest.fail(f"line {i} differs:\n sent: {a[:200]!r}\n  got: {b[:200]!r}")
        pytest.fail(f"length differs: sent {len(msg)} octets, got {len(got)} after the prepended headers")


def test_lines_longer_than_998_octets_are_delivered_byte_exact(server, monkeypatch):
    # Outlook and others send lines over RFC 5321's 998 octets; without limits.max_line_length (the
    # default) they are stored and retrieved unchanged, however long (the 100 kB line is read in pieces).
    long_lines = [b"." + b"w" * 4999, b"=" * 8191 + b".", "é".encode() * 50_000]
    _, msg = make_message(ALICE, body_lines=long_lines)
    assert server.send([ALICE], msg) == {}
    (stored,) = server.stored_messages(ALICE)
    assert stored.read_bytes().endswith(msg.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1])
    monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)  # poplib refuses lines over 2048 octets
    lines, _ = fetch_only_message(server, ALICE)
    _, rest = split_prepended_headers(lines)
    assert pop3_message_bytes(rest) == msg


def test_long_line_refused_when_a_line_limit_is_set(server_factory):
    srv = server_factory(limits={"max_line_length": 1000})
    srv.start()
    _, msg = make_message(ALICE, body_lines=[MAX_LINE, b"x" * 999])
    with srv.smtp() as s:
        s.ehlo()
        assert s.mail(SENDER)[0] == 250
        assert s.rcpt(ALICE)[0] == 250
        code, text = s.data(msg)
        assert code == 550 and b"5.6.0" in text, (code, text)
    assert srv.stored_messages(ALICE) == []


def test_prepended_return_path_and_received_headers(server):
    _, msg = make_message(ALICE)
    server.send([ALICE], msg)
    lines, _ = fetch_only_message(server, ALICE)
    fields, rest = split_prepended_headers(lines)
    (_, return_path), (_, received) = fields
    assert return_path == f"<{SENDER}>".encode(), f"Return-Path should be the envelope sender, got {return_path!r}"
    assert received, "Received: header is empty"
    assert b";" in received, f"Received: header has no ';' before its date: {received!r}"
    assert pop3_message_bytes(rest) == msg


def test_message_file_is_in_new_of_recipient_maildir_when_sendmail_returns(server):
    subject, msg = make_message(ALICE)
    server.send([ALICE], msg)
    # No polling: a 250 reply to DATA means the message is on disk.
    files = server.maildir_files(ALICE, "new")
    assert len(files) == 1, f"expected 1 file in {server.maildir(ALICE) / 'new'}, found {files}"
    content = files[0].read_bytes()
    assert subject.encode() in content
    normalized = content.replace(b"\r\n", b"\n")
    assert msg.replace(b"\r\n", b"\n") in normalized, "stored file does not contain the sent message"
    for sub in ("cur", "tmp"):
        assert (server.maildir(ALICE) / sub).is_dir(), f"Maildir {sub}/ missing"
    assert server.maildir_files(ALICE, "tmp") == [], "tmp/ not empty after delivery"
    assert server.stored_messages(BOB) == [], "bob's Maildir received alice's mail"


def test_alias_delivery_lands_in_account_mailbox(server):
    subject, msg = make_message(ALICE_ALIAS)
    refused = server.send([ALICE_ALIAS], msg)
    assert refused == {}
    assert len(server.maildir_files(ALICE, "new")) == 1, server.all_stored_files()
    alias_dir = server.maildir(ALICE_ALIAS)
    assert not alias_dir.exists() or server.stored_messages(ALICE_ALIAS) == [], (
        f"alias got its own Maildir with mail in it: {alias_dir}"
    )
    p = server.pop3(ALICE)
    try:
        assert retr_all_subjects(p) == [subject]
    finally:
        p.quit()


def test_one_message_two_recipients_lands_in_both(server):
    subject, msg = make_message(f"{ALICE}, {BOB}")
    refused = server.send([ALICE, BOB], msg)
    assert refused == {}
    for addr in (ALICE, BOB):
        assert len(server.maildir_files(addr, "new")) == 1, (addr, server.all_stored_files())
        lines, _ = fetch_only_message(server, addr)
        _, rest = split_prepended_headers(lines)
        assert pop3_message_bytes(rest) == msg, f"{addr} got different bytes"


def test_relay_to_foreign_domain_refused_550(server):
    _, msg = make_message("someone@elsewhere.example")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as excinfo:
        server.send(["someone@elsewhere.example"], msg)
    code, text = excinfo.value.recipients["someone@elsewhere.example"]
    assert code == 550, f"relay attempt answered {code} {text!r}, expected 550"
    assert b"5.7.1" in text, f"relay refusal should carry enhanced code 5.7.1: {text!r}"
    assert server.all_stored_files() == []


def test_relay_refused_for_subdomain_and_lookalike_domains(server):
    for rcpt in (f"alice@sub.{DOMAIN}", f"alice@{DOMAIN}.evil.example", "alice@example.testx"):
        code, text = server.rcpt_code(rcpt)
        assert code == 550, f"RCPT TO:<{rcpt}> answered {code} {text!r}, expected 550 (no open relay)"
    assert server.all_stored_files() == []


def test_unknown_local_user_refused_550(server):
    rcpt = f"nobody@{DOMAIN}"
    _, msg = make_message(rcpt)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as excinfo:
        server.send([rcpt], msg)
    code, text = excinfo.value.recipients[rcpt]
    assert code == 550, f"unknown user answered {code} {text!r}, expected 550"
    assert b"5.1.1" in text, f"unknown user refusal should carry enhanced code 5.1.1: {text!r}"
    assert server.all_stored_files() == []


def test_mixed_recipients_good_delivered_bad_reported(server):
    bad_local = f"nobody@{DOMAIN}"
    bad_foreign = "someone@elsewhere.example"
    subject, msg = make_message(BOB)
    refused = server.send([bad_local, BOB, bad_foreign], msg)
    assert set(refused) == {bad_local, bad_foreign}, refused
    assert refused[bad_local][0] == 550, refused
    assert refused[bad_foreign][0] == 550, refused
    assert len(server.maildir_files(BOB, "new")) == 1
    assert server.stored_messages(ALICE) == []
    lines, _ = fetch_only_message(server, BOB)
    assert subject_of(split_prepended_headers(lines)[1]) == subject


def test_several_messages_in_one_smtp_session(server):
    subjects = []
    with server.smtp() as s:
        for _ in range(3):
            subject, msg = make_message(ALICE)
            subjects.append(subject)
            assert s.sendmail(SENDER, [ALICE], msg) == {}
    assert len(server.maildir_files(ALICE, "new")) == 3
    p = server.pop3(ALICE)
    try:
        assert sorted(retr_all_subjects(p)) == sorted(subjects)
    finally:
        p.quit()
