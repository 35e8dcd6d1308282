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


class Machine:
    """The server: a booted container with systemd as PID 1."""

    def __init__(self, name, template, setup, workdir):
        self.name = name
        self.template = template
        self.setup = setup
        self.root = os.path.join(workdir, name)
        self.console = os.path.join(workdir, f"{name}-console.log")
        self.proc = None
        self.leader = None
        self.booted_once = False

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self):
        if self.proc is not None:
            return
        if not self.booted_once:
            log(f"{self.name}: copying rootfs and installing rustmail")
            subprocess.run(["cp", "-a", "--reflink=auto", self.template, self.root], check=True)
            subprocess.run([self.setup, self.root], check=True)
            self.booted_once = True
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
        # Like the NixOS driver's boot: wait for the system to finish starting up.
        self.wait_until_succeeds("systemctl is-system-running --wait | grep -Eq 'running|degraded'", 120)

    def _find_leader(self):
        try:
            out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
                                 capture_output=True, text=True).stdout.split()
        except OSError:
            return None
        return int(out[0]) if out else None

    def _console_tail(self):
        with contextlib.suppress(OSError), open(self.console, "rb") as f:
            return f.read()[-4000:].decode(errors="replace")
        return ""

    def crash(self):
        """Power loss, as far as a container can have one: every process is killed at once."""
        log(f"{self.name}: crash")
        if self.proc:
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
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        self.leader = None

    # -- commands --------------------------------------------------------------------------------
    def _nsenter(self, argv, timeout=None):
        return subprocess.run(["nsenter", "-t", str(self.leader), "-a", "--"] + argv,
                              capture_output=True, text=True, timeout=timeout)

    def execute(self, command, check_return=True, timeout=900):
        self.start()
        env = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        r = self._nsenter(["/usr/bin/env", "-i", env, "/bin/bash", "-c", command], timeout=timeout)
        return r.returncode, r.stdout + (r.stderr if r.returncode else "")

    def succeed(self, *commands, timeout=900):
        out = ""
        for command in commands:
            log(f"{self.name}: must succeed: {command}")
            status, output = self.execute(command, timeout=timeout)
            if status != 0:
                raise AssertionError(f"command `{command}` failed (exit code {status}):\n{output}")
            out += output
        return out

    def fail(self, *commands, timeout=900):
        out = ""
        for command in commands:
            log(f"{self.name}: must fail: {command}")
            status, output = self.execute(command, timeout=timeout)
            if status == 0:
                raise AssertionError(f"command `{command}` unexpectedly succeeded:\n{output}")
            out += output
        return out

    def wait_until_succeeds(self, command, timeout=900):
        deadline = time.time() + timeout
        while True:
            status, output = self.execute(command)
            if status == 0:
                return output
            if time.time() > deadline:
                raise AssertionError(f"`{command}` did not succeed within {timeout}s:\n{output}")
            time.sleep(0.5)

    def wait_until_fails(self, command, timeout=900):
        deadline = time.time() + timeout
        while True:
            status, output = self.execute(command)
            if status != 0:
                return output
            if time.time() > deadline:
                raise AssertionError(f"`{command}` did not fail within {timeout}s")
            time.sleep(0.5)

    def systemctl(self, q, user=None):
        return self.execute(f"systemctl {q}")

    def get_unit_info(self, unit, user=None):
        status, out = self.execute(f"systemctl show {shlex.quote(unit)}")
        if status != 0:
            raise AssertionError(f"cannot show {unit}: {out}")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for_unit(self, unit, user=None, timeout=900):
        deadline = time.time() + timeout
        while True:
            info = self.get_unit_info(unit)
            state = info.get("ActiveState")
            if state == "active":
                return
            if state == "failed":
                raise AssertionError(f"unit {unit} failed:\n{self.execute(f'journalctl -u {unit} --no-pager')[1]}")
            if time.time() > deadline:
                raise AssertionError(f"unit {unit} not active within {timeout}s (state {state})")
            time.sleep(0.2)

    def wait_for_open_port(self, port, addr="localhost", timeout=900):
        self.wait_until_succeeds(f"exec 3<>/dev/tcp/{addr}/{port}", timeout)

    def wait_for_closed_port(self, port, addr="localhost", timeout=900):
        self.wait_until_fails(f"exec 3<>/dev/tcp/{addr}/{port}", timeout)

    def copy_from_host(self, source, target):
        self.start()
        shutil.copy(source, os.path.join(self.root, target.lstrip("/")))


class Client:
    """A client node: the host's programs, inside the server's network namespace."""

    name = "client"

    def __init__(self, server, tools_dir):
        self.server = server
        self.tools_dir = tools_dir

    def start(self):
        self.server.start()

    def execute(self, command, check_return=True, timeout=900):
        self.server.start()
        env = dict(os.environ, PATH=f"{self.tools_dir}:{os.environ['PATH']}")
        r = subprocess.run(["nsenter", "-t", str(self.server.leader), "-n", "--", "bash", "-c", command],
                           capture_output=True, text=True, env=env, timeout=timeout)
        return r.returncode, r.stdout + (r.stderr if r.returncode else "")

    succeed = Machine.succeed
    fail = Machine.fail
    wait_until_succeeds = Machine.wait_until_succeeds
    wait_until_fails = Machine.wait_until_fails

    def wait_for_unit(self, unit, user=None, timeout=900):
        pass  # the host is up


@contextlib.contextmanager
def subtest(name):
    log(f"subtest: {name}")
    started = time.time()
    yield
    log(f"subtest ok: {name} ({time.time() - started:.1f}s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rootfs", required=True, help="the cached Debian rootfs to copy")
    ap.add_argument("--setup", required=True, help="script that installs rustmail into a rootfs copy")
    ap.add_argument("--tools", required=True, help="directory put first on the client's PATH")
    ap.add_argument("script", help="a testScript from tests/nixos")
    args = ap.parse_args()

    workdir = tempfile.mkdtemp(prefix="rustmail-nspawn-")
    server = Machine("server", args.rootfs, args.setup, workdir)
    client = Client(server, args.tools)
    scope = {
        "server": server, "machine": server, "client": client,
        "start_all": lambda: server.start(), "subtest": subtest,
        "SERVER_ADDRESS": "127.0.0.1",
        # The test certificate lives in the container; the client (the host) reads it from there.
        "CA_FILE": os.path.join(server.root, "etc/rustmail-test/cert.pem"),
    }
    ok = False
    try:
        with open(args.script) as f:
            code = compile(f.read(), args.script, "exec")
        exec(code, scope)
        ok = True
    finally:
        if not ok and server.leader:
            log("journal of rustmail on failure:")
            print(server.execute("journalctl --no-pager -n 80 -u rustmail.service -u rustmail-smtp.socket")[1])
        with contextlib.suppress(Exception):
            server.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    log(f"{os.path.basename(args.script)}: passed")


if __name__ == "__main__":
    main()
