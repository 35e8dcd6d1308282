"""SIGHUP reload: new accounts take effect; a broken config is rejected and the old one stays."""

from __future__ import annotations

import poplib

import pytest

from conftest import ALICE, ALICE_ALIAS, BOB, CAROL, default_accounts
from e2e_helpers import make_message, retr_all_subjects, wait_until


def rcpt_accepted(server, address):
    code, _ = server.rcpt_code(address)
    return code == 250


def assert_delivers_and_fetches(server, address, mailbox=None):
    """Send a message to `address`, fetch it from `mailbox` (default: same) via POP3."""
    mailbox = mailbox or address
    subject, msg = make_message(address)
    assert server.send([address], msg) == {}, f"mail to {address} not accepted"
    p = server.pop3(mailbox)
    try:
        assert subject in retr_all_subjects(p), f"{mailbox} did not get the message sent to {address}"
    finally:
        p.quit()


def add_carol_and_wait(server):
    accounts = default_accounts(server)
    accounts[CAROL] = server.account(CAROL)
    server.reload(accounts)
    wait_until(
        lambda: rcpt_accepted(server, CAROL),
        timeout=15,
        interval=0.1,
        message=lambda: f"carol still refused after SIGHUP\n{server.log_tail()}",
    )
    return accounts


def test_sighup_adds_account_that_receives_and_logs_in(server):
    code, text = server.rcpt_code(CAROL)
    assert code == 550, f"carol accepted before she exists: {code} {text!r}"
    p = server.pop3_connect()
    try:
        with pytest.raises(poplib.error_proto):
            p.user(CAROL)  # may be refused here already, or at PASS
            p.pass_(server.passwords[CAROL])
    finally:
        p.close()

    add_carol_and_wait(server)
    server.assert_alive()
    assert_delivers_and_fetches(server, CAROL)
    assert server.maildir(CAROL).is_dir()
    # Existing accounts are unaffected.
    assert_delivers_and_fetches(server, ALICE)
    assert_delivers_and_fetches(server, ALICE_ALIAS, mailbox=ALICE)


def test_sighup_with_broken_config_keeps_old_config_and_serves(server):
    accounts = add_carol_and_wait(server)
    # The broken config also drops bob: if any of it were applied, bob would vanish.
    broken_accounts = {k: v for k, v in accounts.items() if k != BOB}
    broken = server.config_text(broken_accounts, extra_top={"bogus_key": 1})
    offset = server.reload(text=broken)

    wait_until(
        lambda: "bogus_key" in server.log_since(offset),
        timeout=15,
        interval=0.1,
        message=lambda: "server log does not mention the invalid key 'bogus_key' after SIGHUP with a "
        f"broken config\nlog since SIGHUP:\n{server.log_since(offset)}\n{server.log_tail()}",
    )
    server.assert_alive()
    for address in (ALICE, BOB, CAROL):
        assert_delivers_and_fetches(server, address)
    assert_delivers_and_fetches(server, ALICE_ALIAS, mailbox=ALICE)


def test_sighup_with_unparsable_toml_keeps_serving(server):
    offset = server.reload(text='hostname = "mx.test\n[listen\n')  # not TOML at all
    wait_until(
        lambda: server.log_since(offset).strip() != "",
        timeout=15,
        interval=0.1,
        message=lambda: f"server logged nothing after SIGHUP with an unparsable config\n{server.log_tail()}",
    )
    server.assert_alive()
    assert_delivers_and_fetches(server, ALICE)
    assert_delivers_and_fetches(server, BOB)


def test_sighup_after_broken_config_applies_next_good_config(server):
    offset = server.reload(text=server.config_text(default_accounts(server), extra_top={"bogus_key": 1}))
    wait_until(lambda: "bogus_key" in server.log_since(offset), timeout=15, interval=0.1,
               message=lambda: server.log_tail())
    add_carol_and_wait(server)
    assert_delivers_and_fetches(server, CAROL)


def test_sighup_removes_account(server):
    server.reload({ALICE: server.account(ALICE, aliases=[ALICE_ALIAS])})
    wait_until(
        lambda: server.rcpt_code(BOB)[0] == 550,
        timeout=15,
        interval=0.1,
        message=lambda: f"bob still accepted after being removed and SIGHUP\n{server.log_tail()}",
    )
    assert_delivers_and_fetches(server, ALICE)


def test_sighup_changes_alias(server):
    new_alias = "alice.new@example.test"
    server.reload({ALICE: server.account(ALICE, aliases=[new_alias]), BOB: server.account(BOB)})
    wait_until(
        lambda: rcpt_accepted(server, new_alias),
        timeout=15,
        interval=0.1,
        message=lambda: f"new alias not accepted after SIGHUP\n{server.log_tail()}",
    )
    assert server.rcpt_code(ALICE_ALIAS)[0] == 550, "old alias still accepted after it was removed"
    assert_delivers_and_fetches(server, new_alias, mailbox=ALICE)


def test_password_hash_file_account(server_factory, tmp_path):
    srv = server_factory(accounts={})
    hash_file = tmp_path / "bob.hash"
    hash_file.write_text(srv.hashes[BOB] + "\n")
    srv.write_config({
        ALICE: srv.account(ALICE, aliases=[ALICE_ALIAS]),
        BOB: {"password_hash_file": str(hash_file)},
    })
    srv.start()
    assert_delivers_and_fetches(srv, BOB)
