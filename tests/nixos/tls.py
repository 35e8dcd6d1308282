# Proves: with a certificate, mail is submitted on 587 (STARTTLS + AUTH) and 465 (implicit TLS) and
# fetched with POP3 STLS and POP3S, through the socket units of the TLS listeners; the sender must be
# the account's own; a message to another host leaves through the unit's sandbox (outbound delivery,
# plain SMTP to a receiving server on the client, as opportunistic TLS allows when none is offered); the
# password, in clear or base64 as AUTH sends it, never reaches the journal.
target = globals().get("SERVER_ADDRESS", "server")
ca = globals().get("CA_FILE", "/etc/rustmail-test/cert.pem")
mc = f"mailclient --host {target} --cafile {ca}"
login = "alice@example.test:alice-password"

start_all()
for unit in ("rustmail-smtp.socket", "rustmail-submission.socket", "rustmail-submissions.socket", "rustmail-pop3s.socket"):
    server.wait_for_unit(unit)

with subtest("587 with STARTTLS and AUTH, 465 with implicit TLS"):
    client.succeed(f"{mc} send --port 587 --starttls --login {login} --sender alice@example.test --to postmaster@example.test --subject sub587")
    client.succeed(f"{mc} --ssl send --port 465 --login {login} --sender alice@example.test --to alice@example.test --subject sub465")

with subtest("POP3 with STLS and POP3S"):
    out = client.succeed(f"{mc} fetch --stls --user alice@example.test --password alice-password")
    assert "Subject: sub587" in out and "Subject: sub465" in out, out
    assert "Message-ID: <" in out and "with ESMTPSA" in out, out
    client.succeed(f"{mc} --pop3-port 995 --ssl fetch --user alice@example.test --password alice-password")

with subtest("submission rules"):
    # The refusal itself (553 to MAIL FROM after TLS and a good login), not any failure: a fail() here
    # would also pass with nothing listening on 587.
    client.succeed(f"{mc} send --port 587 --starttls --login {login} --sender bob@example.test --to alice@example.test --expect-code 553")

with subtest("outbound delivery leaves the sandboxed service"):
    # The client's own address as the server sees it: an address literal needs no DNS.
    peer = globals().get("CLIENT_ADDRESS") or client.succeed(
        "ip -4 -o addr show dev eth1 | awk '{print $4}' | cut -d/ -f1").strip()
    client.succeed(f"mailclient sink --listen {peer} --port 2526 --out /tmp/outbound.eml --timeout 120 "
                   "> /tmp/sink.log 2>&1 &")
    client.wait_until_succeeds("ss -ltn | grep -q ':2526 '", timeout=30)
    client.succeed(f"{mc} --ssl send --port 465 --login {login} --sender alice@example.test "
                   f"--to 'friend@[{peer}]' --subject outbound")
    client.wait_until_succeeds("test -s /tmp/outbound.eml", timeout=120)
    got = client.succeed("cat /tmp/outbound.eml")
    assert f"RCPT TO:<friend@[{peer}]>" in got and "Subject: outbound" in got, got
    journal = server.succeed("journalctl -u rustmail.service --no-pager")
    assert f"delivery delivered" in journal and "via " + peer in journal, journal

with subtest("AUTH data never reaches the journal"):
    import base64
    forms = {
        "clear": "alice-password",
        "AUTH PLAIN, base64": base64.b64encode(b"\0alice@example.test\0alice-password").decode(),
        "the password alone, base64": base64.b64encode(b"alice-password").decode(),
    }
    server.succeed("journalctl -u 'rustmail*' -o verbose --no-pager > /tmp/journal.txt", "test -s /tmp/journal.txt")
    for form, secret in forms.items():
        # grep -c prints 0 (and exits 1) when nothing matches, and nothing at all when it cannot read.
        count = server.succeed(f"grep -cF -- '{secret}' /tmp/journal.txt || true").strip()
        assert count == "0", f"{form} in the journal: {count} lines"
