#!/usr/bin/env python3
"""A small imitation of the NixOS test driver's `machine` API over systemd-nspawn.

It lets the very testScripts of tests/nixos/*.py (written for `pkgs.testers.runNixOSTest`) run on a
machine without Nix or KVM, against real systemd as PID 1 in a container:

    driver.py --rootfs DIR --setup SETUP_SCRIPT tests/nixos/basic.py

`server` is the container (a copy of the cached Debian rootfs, prepared by SETUP_SCRIPT with the
rustmail binary, the shipped unit files and the test configuration); `client` runs commands on the host
inside the container's network namespace, so it reaches the server's sockets as a NixOS client node
would (here over loopback, since the container has a private network with no other interface).
The script also gets `start_all`, `subtest`, `SERVER_ADDRESS` and `CA_FILE`.

With several machines, a test network as the NixOS driver builds one:

    driver.py --rootfs DIR --machine receiver='SETUP ARGS' --machine sender='SETUP ARGS' SCRIPT

each machine is a container, and `client` runs the host's programs in a network namespace of its own;
all of them are joined by a bridge (vlan 1) and numbered as the NixOS driver numbers nodes, in the order
of their names from 192.168.1.1. The script gets each machine under its name, `client` and `start_all`.
"""

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time


def log(msg):
    print(f"[driver] {msg}", flush=True)


def strict_shell(command, timeout):
    """The NixOS test driver's wrapping of every command (nixos/lib/test-driver, Machine.execute)."""
    argv = ["bash", "-c", f"set -euo pipefail; {command}"]
    return (["timeout", str(timeout)] if timeout is not None else []) + argv


def retry(check, timeout, what):
    """The NixOS driver's retry(): one attempt a second until `check` returns True or time is up."""
    for _ in range(max(1, int(timeout))):
        if check():
            return
        time.sleep(1)
    if not check():
        raise AssertionError(f"action timed out after {timeout} s: {what}")


def _alive(pid):
    """Running (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:\tZ") for line in f)
    except FileNotFoundError:
        return False


def ip(netns_pid, *args):
    """`ip ARGS` of the host, in the network namespace of NETNS_PID (None: the host's)."""
    prefix = ["nsenter", "-t", str(netns_pid), "-n", "--"] if netns_pid else []
    subprocess.run(prefix + ["ip", *args], check=True)


class Network:
    """The test network: a bridge in a network namespace of its own (held open by a sleeping process),
    where the client lives too, and one veth pair per machine."""

    def __init__(self, names):
        # The NixOS driver's numbering (nixos/lib/testing/network.nix): nodes sorted by name, from 1.
        self.address = {name: f"192.168.1.{i + 1}" for i, name in enumerate(sorted(names))}
        self.hub = subprocess.Popen(["unshare", "-n", "sleep", "infinity"], start_new_session=True)
        for _ in range(100):
            if os.readlink(f"/proc/{self.hub.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                break
            time.sleep(0.02)
        ip(self.hub.pid, "link", "set", "lo", "up")
        ip(self.hub.pid, "link", "add", "br0", "type", "bridge")
        ip(self.hub.pid, "addr", "add", f"{self.address['client']}/24", "dev", "br0")
        ip(self.hub.pid, "link", "set", "br0", "up")

    def attach(self, name, leader):
        """The machine's eth1 on the bridge, with its address (again after each boot: the pair goes
        with the container's network namespace)."""
        host_end = f"vh-{name}"[:15]
        ip(None, "link", "add", host_end, "netns", str(self.hub.pid), "type", "veth", "peer", "name", "eth1",
           "netns", str(leader))
        ip(self.hub.pid, "link", "set", host_end, "master", "br0", "up")
        ip(leader, "addr", "add", f"{self.address[name]}/24", "dev", "eth1")
        ip(leader, "link", "set", "eth1", "up")

    def close(self):
        """Ends whatever the script left running in the client's namespace (a DNS server), then it."""
        hub_ns = os.readlink(f"/proc/{self.hub.pid}/ns/net")
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                if int(pid) != self.hub.pid and os.readlink(f"/proc/{pid}/ns/net") == hub_ns:
                    os.kill(int(pid), signal.SIGKILL)
        self.hub.kill()
        self.hub.wait()


class Machine:
    """A server: a booted container with systemd as PID 1."""

    def __init__(self, name, template, setup, workdir, network=None):
        self.name = name
        self.template = template
        self.setup = shlex.split(setup)
        self.root = os.path.join(workdir, name)
        self.console = os.path.join(workdir, f"{name}-console.log")
        self.network = network
        self.proc = None
        self.leader = None
        self.booted_once = False

    # -- lifecycle -------------------------------------------------------------------------------
    def prepare(self):
        if not self.booted_once:
            log(f"{self.name}: copying rootfs and installing rustmail ({' '.join(os.path.basename(a) for a in self.setup)})")
            subprocess.run(["cp", "-a", "--reflink=auto", self.template, self.root], check=True)
            subprocess.run(self.setup + [self.root], check=True)
            self.booted_once = True

    def start(self):
        if self.proc is not None:
            return
        self.prepare()
        log(f"{self.name}: booting")
        console = open(self.console, "ab")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", self.root, "--boot", "--register=no", "--keep-unit",
             "--private-network", "--console=passive", f"--machine={self.name}"],
            stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            self.leader = self._find_leader()
            if self.leader and self._nsenter(["true"]).returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"{self.name} did not boot; console:\n{self._console_tail()}")
        if self.network:
            self.network.attach(self.name, self.leader)
        # Like the NixOS driver's boot: wait for the system to finish starting up.
        self.wait_until_succeeds("systemctl is-system-running --wait | grep -Eq 'running|degraded'", 120)

    def _find_leader(self):
        """The container's init: the descendant of nspawn that is PID 1 of its own PID namespace
        (nspawn's first child may be a short-lived helper that forks it)."""
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            for child in children:
                try:
                    with open(f"/proc/{child}/status") as f:
                        nspid = next((l.split()[1:] for l in f if l.startswith("NSpid:")), [])
                except OSError:
                    continue
                if len(nspid) > 1 and nspid[-1] == "1":
                    return child
                todo.append(child)
        return None

    def _console_tail(self):
        with contextlib.suppress(OSError), open(self.console, "rb") as f:
            return f.read()[-4000:].decode(errors="replace")
        return ""

    def crash(self):
        """Power loss, as far as a container can have one: every process is killed at once."""
        log(f"{self.name}: crash")
        if self.proc:
            # The container's init runs in its own session: killing nspawn's process group alone left
            # every process of the container running (the old rustmail kept its storage lock, and
            # before the lock two servers shared one storage root). SIGKILL to the PID namespace's
            # init makes the kernel kill everything in it at once, as a power cut would.
            leader = self._find_leader() or self.leader
            if leader:
                try:
                    os.kill(leader, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                # The kernel makes the namespace empty before its init turns into a zombie.
                deadline = time.time() + 30
                while _alive(leader) and time.time() < deadline:
                    time.sleep(0.05)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        self.leader = None

    def shutdown(self):
        log(f"{self.name}: shutdown")
        if self.proc:
            self._nsenter(["systemctl", "poweroff"])
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.crash()
        self.proc = None
        self.leader = None

    # -- commands --------------------------------------------------------------------------------
    def _nsenter(self, argv):
        return subprocess.run(["nsenter", "-t", str(self.leader), "-a", "--"] + argv,
                              capture_output=True, text=True)

    def execute(self, command, check_return=True, check_output=True, timeout=900):
        """As the NixOS driver runs commands: `timeout T bash -c "set -euo pipefail; CMD"`, returning the
        exit status and stdout (stderr goes to the log)."""
        self.start()
        env = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        r = self._nsenter(["/usr/bin/env", "-i", env] + strict_shell(command, timeout))
        if r.stderr:
            log(f"{self.name} stderr: {r.stderr.rstrip()}")
        return r.returncode, r.stdout

    def succeed(self, *commands, timeout=None):
        out = ""
        for command in commands:
            log(f"{self.name}: must succeed: {command}")
            status, output = self.execute(command, timeout=timeout)
            if status != 0:
                raise AssertionError(f"command `{command}` failed (exit code {status}):\n{output}")
            out += output
        return out

    def fail(self, *commands, timeout=None):
        out = ""
        for command in commands:
            log(f"{self.name}: must fail: {command}")
            status, output = self.execute(command, timeout=timeout)
            if status == 0:
                raise AssertionError(f"command `{command}` unexpectedly succeeded:\n{output}")
            out += output
        return out

    def _wait_until(self, command, timeout, succeeds):
        result = {}

        def check():
            status, result["output"] = self.execute(command, timeout=timeout)
            return (status == 0) == succeeds
        retry(check, timeout, f"wait until `{command}` {'succeeds' if succeeds else 'fails'}")
        return result["output"]

    def wait_until_succeeds(self, command, timeout=900):
        return self._wait_until(command, timeout, succeeds=True)

    def wait_until_fails(self, command, timeout=900):
        return self._wait_until(command, timeout, succeeds=False)

    def systemctl(self, q, user=None):
        return self.execute(f"systemctl {q}")

    def get_unit_info(self, unit, user=None):
        status, out = self.execute(f"systemctl --no-pager show {shlex.quote(unit)}")
        if status != 0:
            raise AssertionError(f'retrieving systemctl info for unit "{unit}" failed with exit code {status}')
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for_unit(self, unit, user=None, timeout=900):
        """As the NixOS driver: fails at once on "failed", and on "inactive" with no job queued."""
        def check():
            state = self.get_unit_info(unit)["ActiveState"]
            if state == "failed":
                journal = self.execute(f"journalctl -u {shlex.quote(unit)} --no-pager")[1]
                raise AssertionError(f'unit "{unit}" reached state "{state}"\n{journal}')
            if state == "inactive":
                _, jobs = self.systemctl("list-jobs --full 2>&1")
                if "No jobs" in jobs and self.get_unit_info(unit)["ActiveState"] == state:
                    raise AssertionError(f'unit "{unit}" is inactive and there are no pending jobs')
            return state == "active"
        retry(check, timeout, f"wait for unit {unit}")

    def wait_for_open_port(self, port, addr="localhost", timeout=900):
        retry(lambda: self.execute(f"exec 3<>/dev/tcp/{addr}/{port}")[0] == 0, timeout,
              f"wait for port {addr}:{port} to open")

    def wait_for_closed_port(self, port, addr="localhost", timeout=900):
        retry(lambda: self.execute(f"exec 3<>/dev/tcp/{addr}/{port}")[0] != 0, timeout,
              f"wait for port {addr}:{port} to close")

    def copy_from_host(self, source, target):
        self.start()
        shutil.copy(source, os.path.join(self.root, target.lstrip("/")))


class Client:
    """A client node: the host's programs, inside the server's network namespace (one machine) or in
    the test network's own (several)."""

    name = "client"

    def __init__(self, server, tools_dir, network=None):
        self.server = server
        self.tools_dir = tools_dir
        self.network = network

    def start(self):
        if self.server:
            self.server.start()

    def execute(self, command, check_return=True, check_output=True, timeout=900):
        self.start()
        netns = self.network.hub.pid if self.network else self.server.leader
        env = dict(os.environ, PATH=f"{self.tools_dir}:{os.environ['PATH']}")
        r = subprocess.run(["nsenter", "-t", str(netns), "-n", "--"] + strict_shell(command, timeout),
                           capture_output=True, text=True, env=env)
        if r.stderr:
            log(f"client stderr: {r.stderr.rstrip()}")
        return r.returncode, r.stdout

    succeed = Machine.succeed
    fail = Machine.fail
    _wait_until = Machine._wait_until
    wait_until_succeeds = Machine.wait_until_succeeds
    wait_until_fails = Machine.wait_until_fails

    def wait_for_unit(self, unit, user=None, timeout=900):
        pass  # the host is up


def resolve_in(root, path, depth=0):
    """PATH inside the container's root, following symlinks as the container would (NixOS' /etc files
    are symlinks into the store)."""
    host = os.path.join(root, path.lstrip("/"))
    if os.path.islink(host) and depth < 20:
        target = os.readlink(host)
        return resolve_in(root, target if target.startswith("/") else os.path.join(os.path.dirname(path), target), depth + 1)
    return host


@contextlib.contextmanager
def subtest(name):
    log(f"subtest: {name}")
    started = time.time()
    yield
    log(f"subtest ok: {name} ({time.time() - started:.1f}s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rootfs", required=True, help="the cached Debian rootfs to copy")
    ap.add_argument("--setup", help="script that installs rustmail into a rootfs copy (the one machine, server)")
    ap.add_argument("--machine", action="append", default=[], metavar="NAME=SETUP",
                    help="a machine of a test network and the command (with its arguments) that installs "
                         "rustmail into its rootfs copy; repeated")
    ap.add_argument("--tools", required=True, help="directory put first on the client's PATH")
    ap.add_argument("script", help="a testScript from tests/nixos")
    args = ap.parse_args()
    if bool(args.setup) == bool(args.machine):
        ap.error("give either --setup or --machine")

    workdir = tempfile.mkdtemp(prefix="rustmail-nspawn-")
    network = None
    if args.machine:
        named = dict(m.split("=", 1) for m in args.machine)
        # One store for the machines' builds (see setup-nixos).
        os.makedirs(os.path.join(workdir, "store"))
        os.environ["NSPAWN_SHARED_STORE"] = os.path.join(workdir, "store")
        network = Network(list(named) + ["client"])
        machines = [Machine(name, args.rootfs, setup, workdir, network) for name, setup in named.items()]
        client = Client(None, args.tools, network)
        scope = {m.name: m for m in machines}
        for machine in machines:
            machine.prepare()
        # The test CA of two_servers.py, which the client (the host) reads from a container.
        scope["CA_FILE"] = next((path for path in (resolve_in(m.root, "/etc/rustmail-test/ca.pem") for m in machines)
                                 if os.path.exists(path)), None)
    else:
        server = Machine("server", args.rootfs, args.setup, workdir)
        machines = [server]
        server.prepare()
        client = Client(server, args.tools)
        scope = {
            "server": server, "machine": server,
            "SERVER_ADDRESS": "127.0.0.1",
            # The client shares the server's network namespace: it listens where the server delivers.
            "CLIENT_ADDRESS": "127.0.0.1",
            # The test certificate lives in the container; the client (the host) reads it from there.
            "CA_FILE": resolve_in(server.root, "/etc/rustmail-test/cert.pem"),
        }
    for machine in machines:
        machine.prepare()
    scope.update({"client": client, "subtest": subtest,
                  "start_all": lambda: [m.start() for m in machines] and None})
    ok = False
    try:
        with open(args.script) as f:
            code = compile(f.read(), args.script, "exec")
        exec(code, scope)
        ok = True
    finally:
        for machine in machines:
            if not ok and machine.leader:
                log(f"journal of rustmail on {machine.name}, on failure:")
                print(machine.execute("journalctl --no-pager -n 120 -u 'rustmail*'")[1])
            with contextlib.suppress(Exception):
                machine.shutdown()
        if network:
            network.close()
        shutil.rmtree(workdir, ignore_errors=True)
    log(f"{os.path.basename(args.script)}: passed")


if __name__ == "__main__":
    main()
