# Proves: the service is not running until the first connection, starts on it, and a restart while a
# client keeps connecting refuses no connection (the sockets belong to systemd, not to the process).
target = globals().get("SERVER_ADDRESS", "server")
mc = f"mailclient --host {target}"

start_all()
server.wait_for_unit("rustmail-smtp.socket")
server.wait_for_unit("rustmail-pop3.socket")

with subtest("inactive until the first connection"):
    assert server.get_unit_info("rustmail.service")["ActiveState"] == "inactive"
    client.succeed(f"{mc} send --sender a@remote.test --to alice@example.test")
    server.wait_for_unit("rustmail.service")

with subtest("restart under load refuses no connection"):
    import json
    client.succeed(f"rm -f /tmp/hammer.*; {mc} hammer --seconds 300 --stop-file /tmp/hammer.stop"
                   " --progress /tmp/hammer.ok --out /tmp/hammer.json > /tmp/hammer.log 2>&1 &")

    def served_at_least(n):
        """Waits until the load has been served n sessions; returns the count then."""
        client.wait_until_succeeds(f'test "$(cat /tmp/hammer.ok)" -ge {n}', 60)
        return int(client.succeed("cat /tmp/hammer.ok"))

    # The load runs before each restart and goes on being served after it, by the new process: a
    # load that ended early (or never started) cannot pass.
    served = served_at_least(5)
    for _ in range(3):
        server.succeed("systemctl restart rustmail.service")
        after_restart = int(client.succeed("cat /tmp/hammer.ok"))
        print(f"sessions served before the restart: {served}, when it returned: {after_restart}")
        served = served_at_least(after_restart + 5)
    client.succeed("touch /tmp/hammer.stop")
    client.wait_until_succeeds("test -s /tmp/hammer.json", 60)
    result = json.loads(client.succeed("cat /tmp/hammer.json"))
    assert result["failed"] == 0 and result["ok"] >= served, result
    server.wait_for_unit("rustmail.service")
