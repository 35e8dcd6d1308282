# Proves: a client node delivers with smtplib and fetches with poplib through the socket-activated,
# Type=notify service; relaying and unknown users are refused; systemd sees live status and
# structured journal fields.
target = globals().get("SERVER_ADDRESS", "server")
mc = f"mailclient --host {target}"
login = "--user alice@example.test --password alice-password"

start_all()
server.wait_for_unit("rustmail-smtp.socket")
server.wait_for_unit("rustmail-pop3.socket")

with subtest("send with smtplib, fetch with poplib"):
    client.succeed(f"{mc} send --sender bob@remote.test --to alice@example.test --subject hello --body 'Hi Alice'")
    out = client.succeed(f"{mc} fetch {login}")
    assert "Subject: hello" in out and "Hi Alice" in out, out
    assert out.startswith("Return-Path: <bob@remote.test>"), out

with subtest("alias delivers to its account"):
    client.succeed(f"{mc} send --sender bob@remote.test --to postmaster@example.test --subject alias")
    assert "Subject: alias" in client.succeed(f"{mc} fetch {login}")

with subtest("relay and unknown users refused"):
    client.succeed(f"{mc} send --sender bob@remote.test --to someone@elsewhere.test --expect-code 550")
    client.succeed(f"{mc} send --sender bob@remote.test --to nobody@example.test --expect-code 550")

with subtest("systemd sees readiness, status and structured logs"):
    server.wait_for_unit("rustmail.service")
    # The test driver runs commands under `set -o pipefail`: `journalctl | grep -q` fails with SIGPIPE
    # (141) when grep stops reading early, so grep reads a process substitution or a file instead.
    server.wait_until_succeeds("grep -q '2 messages delivered' <(systemctl show -p StatusText --value rustmail.service)", 30)
    server.succeed("grep -q 'QUEUE_ID=' <(journalctl -u rustmail.service -o verbose --no-pager)")
    server.succeed("grep -q 'PEER=' <(journalctl -u rustmail.service -o verbose --no-pager)")
    server.succeed("journalctl -u rustmail.service -o verbose --no-pager > /tmp/journal.txt",
                   "test -s /tmp/journal.txt && ! grep -q alice-password /tmp/journal.txt")

with subtest("reload keeps serving"):
    server.succeed("systemctl reload rustmail.service")
    server.wait_until_succeeds("grep -q 'configuration reloaded' <(journalctl -u rustmail.service --no-pager)", 30)
    server.wait_for_unit("rustmail.service")
    client.succeed(f"{mc} send --sender bob@remote.test --to alice@example.test --subject after-reload")
