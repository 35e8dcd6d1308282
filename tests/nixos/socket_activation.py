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
    client.succeed(f"rm -f /tmp/hammer.json; {mc} hammer --seconds 8 --out /tmp/hammer.json > /tmp/hammer.log 2>&1 &")
    import time
    for _ in range(3):
        time.sleep(1.5)
        server.succeed("systemctl restart rustmail.service")
    client.wait_until_succeeds("test -s /tmp/hammer.json", 60)
    import json
    result = json.loads(client.succeed("cat /tmp/hammer.json"))
    assert result["failed"] == 0 and result["ok"] > 20, result
    server.wait_for_unit("rustmail.service")
