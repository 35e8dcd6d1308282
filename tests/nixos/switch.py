# Proves: `nixos-rebuild switch` (switch-to-configuration, here `test` on the node's specialisations)
# applies each kind of change as README.md says: a settings change reloads rustmail (same process,
# new settings in force), a changed unit restarts it, and neither refuses a connection; a listener
# moved to another port is served there and no longer on the old one; a disabled listener is closed and
# the switch still succeeds; switching back restores everything.
target = globals().get("SERVER_ADDRESS", "server")
mc = f"mailclient --host {target}"
login = "--user alice@example.test --password alice-password"
# 120 recipients: over the default limit of 100 (the least the config accepts), within the 150 of the
# `limits` specialisation.
many = " ".join(f"--to alice+{i}@example.test" for i in range(120))


def switch(name=None):
    path = "/run/booted-system" + (f"/specialisation/{name}" if name else "")
    # Exit status 4 (a unit failed to start, stop or reload) fails the test.
    server.succeed(f"{path}/bin/switch-to-configuration test")


def main_pid():
    return server.succeed("systemctl show -p MainPID --value rustmail.service").strip()


def served_at_least(n):
    """Waits until the load has been served n sessions; returns the count then."""
    client.wait_until_succeeds(f'test "$(cat /tmp/hammer.ok)" -ge {n}', 60)
    return int(client.succeed("cat /tmp/hammer.ok"))


def without_refusals(action):
    """Runs action() while the client opens SMTP sessions back to back; none may be refused. The load
    is running when action() starts and is still being served after it returns."""
    client.succeed(f"rm -f /tmp/hammer.*; {mc} hammer --seconds 300 --stop-file /tmp/hammer.stop"
                   " --progress /tmp/hammer.ok --out /tmp/hammer.json > /tmp/hammer.log 2>&1 &")
    served_at_least(5)
    action()
    served = served_at_least(int(client.succeed("cat /tmp/hammer.ok")) + 5)
    client.succeed("touch /tmp/hammer.stop")
    client.wait_until_succeeds("test -s /tmp/hammer.json", 60)
    import json
    result = json.loads(client.succeed("cat /tmp/hammer.json"))
    assert result["failed"] == 0 and result["ok"] >= served, result


def closed(port):
    """Nothing accepts a connection on the port (refused, or dropped by the firewall): not merely a
    failed login, which a server still listening there would also give."""
    client.succeed(f"{mc} closed --port {port}")


def pop3_works(port):
    client.succeed(f"{mc} --pop3-port {port} uidl {login}")


start_all()
server.wait_for_unit("rustmail-smtp.socket")
server.wait_for_unit("rustmail-pop3.socket")
client.succeed(f"{mc} send --sender a@remote.test --to alice@example.test")
server.wait_for_unit("rustmail.service")

with subtest("a settings change reloads the running process"):
    before = main_pid()
    without_refusals(lambda: switch("limits"))
    server.wait_for_unit("rustmail.service")
    assert main_pid() == before, "reloaded, not restarted"
    client.succeed(f"{mc} send --sender a@remote.test {many}")

with subtest("a changed unit restarts the service, the sockets stay open"):
    before = main_pid()
    since = "systemctl show -p ActiveEnterTimestampMonotonic --value rustmail-smtp.socket"
    listening = server.succeed(since)
    without_refusals(lambda: switch("account"))
    client.succeed(f"{mc} send --sender a@remote.test --to bob@example.test")
    assert main_pid() != before, "restarted"
    # The socket was never stopped: systemd has listened since boot.
    assert server.succeed(since) == listening, "the SMTP socket was restarted"

with subtest("a listener moved to another port"):
    switch("moved")
    pop3_works(1110)
    closed(110)
    client.succeed(f"{mc} send --sender a@remote.test --to alice@example.test")

with subtest("a disabled listener is closed and the switch succeeds"):
    switch("nopop3")
    # rustmail itself still serves (SMTP), only POP3 is gone.
    client.succeed(f"{mc} send --sender a@remote.test --to alice@example.test")
    closed(110)
    closed(1110)

with subtest("switching back restores the first configuration"):
    switch()
    pop3_works(110)
    closed(1110)
    client.succeed(f"{mc} send --sender a@remote.test {many} --expect-code 452")
