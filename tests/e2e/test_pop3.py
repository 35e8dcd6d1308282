"""POP3 maildrop semantics: sizes, deletion only on QUIT, TOP, auth errors, UIDL."""

from __future__ import annotations

import poplib

import pytest

from conftest import ALICE, BOB
from e2e_helpers import (
    close_quietly,
    drop_connection,
    make_message,
    pop3_message_bytes,
    retr_all_subjects,
    split_prepended_headers,
    wait_until,
)


def deliver(server, address, n, body_lines_for=None):
    subjects = []
    for i in range(n):
        body = body_lines_for(i) if body_lines_for else [f"message {i}".encode()]
        subject, msg = make_message(address, body_lines=body)
        assert server.send([address], msg) == {}
        subjects.append(subject)
    return subjects


def login_when_unlocked(server, address, timeout=10.0):
    """Log in, retrying while a just-dropped session may still hold the maildrop."""

    def attempt():
        return server.pop3(address)

    return wait_until(
        attempt,
        timeout=timeout,
        interval=0.1,
        message=lambda: f"could not log in as {address}\n{server.log_tail()}",
    )


def parse_list(lines):
    out = {}
    for line in lines:
        num, size = line.split()
        out[int(num)] = int(size)
    return out


def test_stat_list_sizes_match_retr_octets(server):
    deliver(
        server,
        ALICE,
        3,
        body_lines_for=lambda i: [b"line %d" % j for j in range(1 + 7 * i)] + [b".dot", b"\xc3\xa9t\xc3\xa9"],
    )
    p = server.pop3(ALICE)
    try:
        count, total = p.stat()
        assert count == 3
        resp, lines, _ = p.list()
        sizes = parse_list(lines)
        assert sorted(sizes) == [1, 2, 3], lines
        assert total == sum(sizes.values()), f"STAT total {total} != sum of LIST sizes {sizes}"
        for n, size in sizes.items():
            single = p.list(n)
            assert single.split()[0] == b"+OK" and int(single.split()[1]) == n
            assert int(single.split()[2]) == size, f"LIST {n} says {single!r}, LIST says {size}"
            _, msg_lines, octets = p.retr(n)
            assert octets == len(pop3_message_bytes(msg_lines)), "RETR lines not all CRLF-terminated"
            assert size == octets, f"LIST size {size} for message {n} != RETR octets {octets}"
    finally:
        p.quit()


def test_dele_quit_removes_message(server):
    subjects = deliver(server, ALICE, 2)
    p = server.pop3(ALICE)
    kept = retr_all_subjects(p)
    assert sorted(kept) == sorted(subjects)
    resp = p.dele(1)
    assert resp.startswith(b"+OK"), resp
    count, _ = p.stat()
    assert count == 1, "STAT after DELE should not count the deleted message"
    with pytest.raises(poplib.error_proto):
        p.retr(1)  # deleted messages may not be accessed
    p.quit()
    # QUIT's +OK comes after the UPDATE state: no polling needed.
    assert len(server.stored_messages(ALICE)) == 1, server.all_stored_files()
    p = server.pop3(ALICE)
    try:
        assert retr_all_subjects(p) == [kept[1]]
    finally:
        p.quit()


def test_dele_rset_quit_keeps_messages(server):
    subjects = deliver(server, ALICE, 2)
    p = server.pop3(ALICE)
    p.dele(1)
    p.dele(2)
    assert p.stat()[0] == 0
    assert p.rset().startswith(b"+OK")
    assert p.stat()[0] == 2
    p.quit()
    assert len(server.stored_messages(ALICE)) == 2, server.all_stored_files()
    p = server.pop3(ALICE)
    try:
        assert sorted(retr_all_subjects(p)) == sorted(subjects)
    finally:
        p.quit()


def test_dele_then_dropped_connection_keeps_message(server):
    subjects = deliver(server, ALICE, 1)
    p = server.pop3(ALICE)
    assert p.dele(1).startswith(b"+OK")
    drop_connection(p)  # no QUIT: the session never reaches the UPDATE state
    p = login_when_unlocked(server, ALICE)
    try:
        assert retr_all_subjects(p) == subjects
    finally:
        p.quit()
    assert len(server.stored_messages(ALICE)) == 1, server.all_stored_files()


def test_top_returns_headers_and_n_body_lines(server):
    body = [b"body line %d" % i for i in range(1, 6)] + [b".dotted"]
    _, msg = make_message(ALICE, body_lines=body)
    server.send([ALICE], msg)
    p = server.pop3(ALICE)
    try:
        _, full, _ = p.retr(1)
        blank = full.index(b"")
        header_lines = full[:blank]
        assert full[blank + 1 :] == body

        _, top2, _ = p.top(1, 2)
        assert top2 == header_lines + [b""] + body[:2], top2
        _, top0, _ = p.top(1, 0)
        assert top0 == header_lines + [b""], top0
        _, top_all, _ = p.top(1, 100)
        assert top_all == full, "TOP with more lines than the body should return the whole message"
        # TOP must not mark anything deleted or change the maildrop.
        assert p.stat()[0] == 1
    finally:
        p.quit()
    _, rest = split_prepended_headers(full)
    assert pop3_message_bytes(rest) == msg


def test_wrong_password_gives_auth_error(server):
    p = server.pop3_connect()
    try:
        p.user(ALICE)
        with pytest.raises(poplib.error_proto) as excinfo:
            p.pass_("definitely-not-the-password")
        assert "[AUTH]" in str(excinfo.value), f"PASS reply lacks [AUTH]: {excinfo.value}"
    finally:
        close_quietly(p)
    # The right password still works afterwards.
    p = login_when_unlocked(server, ALICE)
    p.quit()


def test_unknown_user_gives_auth_error_at_pass(server):
    p = server.pop3_connect()
    try:
        try:
            p.user("nobody@example.test")
        except poplib.error_proto as exc:
            # Rejecting at USER is allowed, but then it must be an AUTH-style error too.
            assert str(exc).startswith("b'-ERR"), exc
            return
        with pytest.raises(poplib.error_proto) as excinfo:
            p.pass_("whatever")
        assert "[AUTH]" in str(excinfo.value), excinfo.value
    finally:
        close_quietly(p)


def test_password_of_other_account_rejected(server):
    p = server.pop3_connect()
    try:
        p.user(ALICE)
        with pytest.raises(poplib.error_proto) as excinfo:
            p.pass_(server.passwords[BOB])
        assert "[AUTH]" in str(excinfo.value)
    finally:
        close_quietly(p)


def test_uidl_unchanged_after_restart(server):
    deliver(server, ALICE, 3)
    p = server.pop3(ALICE)
    # Read one message, so a server that moves new/ -> cur/ on access is covered too.
    p.retr(2)
    _, before_lines, _ = p.uidl()
    p.quit()
    before = dict(line.split() for line in before_lines)
    assert len(before) == 3
    assert len(set(before.values())) == 3, f"UIDLs not unique: {before}"
    for uid in before.values():
        assert 1 <= len(uid) <= 70 and all(0x21 <= c <= 0x7E for c in uid), f"bad UIDL {uid!r}"

    server.restart()

    p = server.pop3(ALICE)
    try:
        _, after_lines, _ = p.uidl()
        after = dict(line.split() for line in after_lines)
        assert sorted(after.values()) == sorted(before.values()), (before, after)
        single = p.uidl(1).split()
        assert single[0] == b"+OK" and single[2] in before.values()
    finally:
        p.quit()


def test_uidl_of_remaining_messages_unchanged_after_dele(server):
    deliver(server, ALICE, 3)
    p = server.pop3(ALICE)
    _, lines, _ = p.uidl()
    uids = [line.split()[1] for line in lines]
    p.dele(2)
    p.quit()
    p = server.pop3(ALICE)
    try:
        _, lines, _ = p.uidl()
        assert sorted(line.split()[1] for line in lines) == sorted([uids[0], uids[2]])
    finally:
        p.quit()
