# Proves: the running service has no capabilities at all and systemd-analyze rates its exposure at
# 1.1 or lower, the rating README.md states. Outbound delivery (on by default) needs the network: of the
# 1.1, PrivateNetwork off is 0.5, Internet sockets 0.3 and no IP allow list 0.2 (without outbound, the
# unit with PrivateNetwork=yes and AF_UNIX only rated 0.4).
target = globals().get("SERVER_ADDRESS", "server")

start_all()
server.wait_for_unit("rustmail-smtp.socket")
client.succeed(f"mailclient --host {target} send --sender a@remote.test --to alice@example.test")
server.wait_for_unit("rustmail.service")

with subtest("no capabilities in the running process"):
    pid = server.succeed("systemctl show -p MainPID --value rustmail.service").strip()
    status = server.succeed(f"cat /proc/{pid}/status")
    caps = dict(line.split(":\t") for line in status.splitlines() if line.startswith("Cap"))
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(caps[name], 16) == 0, (name, caps[name])
    assert server.succeed(f"stat -c %U /proc/{pid}").strip() != "root"

with subtest("systemd-analyze security exposure at most 1.1"):
    out = server.succeed("systemd-analyze security --no-pager rustmail.service")
    last = [l for l in out.splitlines() if "Overall exposure level" in l][-1]
    exposure = float(last.split(":")[1].split()[0])
    print(f"exposure: {exposure}")
    # systemd-analyze prints one decimal; the tolerance only absorbs float rounding.
    assert exposure <= 1.1 + 1e-9, out
