"""The README's promises about lifecycle, limits and configuration, each held to the real binary.

One test per promise, named after what it guards; the README sentence it checks is quoted above it.
The notify socket is emulated here (a Unix datagram socket the test owns), as systemd would provide it.
"""

from __future__ import annotations

import base64
import os
import poplib
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ALICE, BOB, CAROL, PASSWORDS, default_accounts
from e2e_helpers import (
    NET_TIMEOUT,
    SENDER,
    STOP_TIMEOUT,
    child_env,
    connect_from,
    free_port,
    make_message,
    parse_demo_password,
    port_accepts,
    read_reply,
    served_sessions,
    wait_until,
)
from test_tls_submission import make_cert


# --------------------------------------------------------------------------- helpers


def with_env(srv, **env: str) -> None:
    """Run `srv` with these variables added to child_env(), through its command prefix (`env` execs
    rustmail, so srv.proc is still the server itself)."""
    srv.wrapper = ["env", *(f"{k}={v}" for k, v in env.items())]


class NotifySocket:
    """The receiving end of sd_notify(3): a datagram socket bound where NOTIFY_SOCKET points."""

    def __init__(self, path: Path) -> None:
        # sockaddr_un holds 108 bytes; pytest's tmp_path is far shorter, but say so if it ever is not.
        assert len(os.fsencode(path)) < 108, f"notify socket path too long: {path}"
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[dict[str, str]] = []

    def next(self, timeout: float) -> dict[str, str]:
        """The next datagram as a dict of its VAR=value lines."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536).decode()
        fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
        self.received.append(fields)
        return fields

    def wait_for(self, key: str, timeout: float = 15) -> dict[str, str]:
        """Skips datagrams (STATUS= updates) until one that sets `key`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}= from the server within {timeout}s; got {self.received}")
            try:
                fields = self.next(left)
            except socket.timeout:
                continue
            if key in fields:
                return fields

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def expect_reload_cycle(notify: NotifySocket, sent_at: float, answered_by: float = 15) -> None:
    """After a SIGHUP sent at `sent_at` (time.monotonic()): RELOADING=1 with a MONOTONIC_USEC= from
    after the signal (Type=notify-reload needs it), then READY=1 in a later datagram."""
    reloading = notify.wait_for("RELOADING", timeout=answered_by)
    assert reloading["RELOADING"] == "1", reloading
    assert "READY" not in reloading, f"READY=1 in the same datagram as RELOADING=1: {reloading}"
    usec = reloading.get("MONOTONIC_USEC", "")
    assert usec.isdigit(), f"RELOADING=1 without a numeric MONOTONIC_USEC=: {reloading}"
    # Python's monotonic clock is CLOCK_MONOTONIC on Linux, the clock systemd compares it with.
    assert sent_at * 1e6 <= int(usec) <= time.monotonic() * 1e6, (usec, sent_at)
    ready = notify.wait_for("READY", timeout=answered_by)
    assert ready["READY"] == "1", ready




def start_data(port: int) -> tuple[socket.socket, object]:
    """An SMTP session to ALICE that is inside DATA (354 received)."""
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = c.makefile("rb")
    assert read_reply(f).startswith(b"220")
    for command, code in ((b"EHLO client.test", b"250"), (f"MAIL FROM:<{SENDER}>".encode(), b"250"),
                          (f"RCPT TO:<{ALICE}>".encode(), b"250"), (b"DATA", b"354")):
        c.sendall(command + b"\r\n")
        reply = read_reply(f)
        assert reply.startswith(code), (command, reply)
    return c, f


# The server keeps the first bytes of a message in memory and creates its spool file once this much has
# come (src/server/smtp.rs, SPOOL_WRITE_CHUNK: 256 KiB); a test that needs the file sends more.
PAST_THE_FIRST_WRITE = (b"x" * 998 + b"\r\n") * 300


def spool_files(srv) -> list[Path]:
    spool = srv.state_dir / "spool"
    return sorted(spool.iterdir()) if spool.is_dir() else []


def delivers(srv, address: str) -> bool:
    _, msg = make_message(address)
    return srv.send([address], msg) == {}


def run_cli(binary: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env={**child_env(), **(env or {})})


# --------------------------------------------------------------------------- 1. readiness across reloads

# README, systemd: "On SIGHUP: `RELOADING=1` with `MONOTONIC_USEC=`, then `READY=1`"; Signals: "an
# invalid new configuration is logged and the running one stays in force". systemd with
# Type=notify-reload waits for READY=1 after RELOADING=1: without it the unit hangs in "reloading" and
# is eventually killed, so a refused reload must answer READY=1 too.


def test_ready_is_sent_again_after_a_refused_reload(server_factory, notify):
    srv = server_factory()
    with_env(srv, NOTIFY_SOCKET=str(notify.path))
    srv.start()
    assert notify.wait_for("READY")["READY"] == "1"

    broken = srv.config_text({ALICE: srv.account(ALICE)}, extra_top={"bogus_key": 1})  # and no bob
    sent_at = time.monotonic()
    offset = srv.reload(text=broken)
    expect_reload_cycle(notify, sent_at)
    log = srv.log_since(offset)
    assert "reload refused" in log and "bogus_key" in log, log
    srv.assert_alive()
    assert delivers(srv, BOB), "the refused configuration (without bob) was applied"

    # A good reload goes through the same cycle, and takes effect.
    accounts = default_accounts(srv)
    accounts[CAROL] = srv.account(CAROL)
    sent_at = time.monotonic()
    offset = srv.reload(accounts)
    expect_reload_cycle(notify, sent_at)
    assert "configuration reloaded" in srv.log_since(offset), srv.log_since(offset)
    assert delivers(srv, CAROL)


# --------------------------------------------------------------------------- 2. what a reload cannot change

# README, Signals: "`[listen]` and `storage_root` changes need a restart". A reload that changes them
# applies the rest, warns, and keeps serving where it was.


def test_listen_change_on_reload_warns_and_keeps_the_old_port(server):
    new_port = free_port()
    while new_port in (server.smtp_port, server.pop3_port):
        new_port = free_port()
    accounts = default_accounts(server)
    accounts[CAROL] = server.account(CAROL)
    text = server.config_text(accounts, smtp_listen=[f"127.0.0.1:{new_port}"])
    offset = server.reload(text=text)
    wait_until(lambda: "configuration reloaded" in server.log_since(offset), timeout=15,
               message=lambda: server.log_since(offset))
    assert "[listen] changes take effect only after a restart" in server.log_since(offset)
    assert delivers(server, CAROL), "the rest of the reloaded configuration was not applied"
    assert not port_accepts(new_port), "the new SMTP port answers before a restart"


def test_storage_root_change_on_reload_warns_and_keeps_the_old_root(server):
    new_root = server.workdir / "other-root"
    accounts = default_accounts(server)
    accounts[CAROL] = server.account(CAROL)
    offset = server.reload(text=server.config_text(accounts, storage_root=new_root))
    wait_until(lambda: "configuration reloaded" in server.log_since(offset), timeout=15,
               message=lambda: server.log_since(offset))
    assert "storage_root changes take effect only after a restart" in server.log_since(offset)
    assert delivers(server, CAROL) and delivers(server, ALICE)
    assert len(server.stored_messages(CAROL)) == 1 and len(server.stored_messages(ALICE)) == 1
    assert not new_root.exists() or not any(p.is_file() for p in new_root.rglob("*")), (
        f"something was written under the new storage_root: {list(new_root.rglob('*'))}")


# --------------------------------------------------------------------------- 3. the stop deadline

# README, Signals: "the process exits 0 within `limits.shutdown_timeout_secs`"; style: "let sessions
# reach a safe point (never cut a DATA transfer), then exit inside a deadline". A client that stalls
# in DATA must not hold the stop for the 300 s data timeout (systemd would SIGKILL it first).


def test_stop_deadline_holds_against_a_transfer_stalled_in_data(server_factory):
    srv = server_factory(limits={"shutdown_timeout_secs": 2})
    srv.start()
    c, _ = start_data(srv.smtp_port)
    try:
        c.sendall(b"Subject: stalled\r\n\r\nthe first half of a message that never ends\r\n" + PAST_THE_FIRST_WRITE)
        wait_until(lambda: spool_files(srv), timeout=10, message="the message to be spooled")
        started = time.monotonic()
        code = srv.stop(timeout=9)  # kills and fails past 9 s: shutdown_timeout + margin, far from 300
        elapsed = time.monotonic() - started
    finally:
        c.close()
    assert code == 0, srv.log_tail()
    # The transfer had its chance: the stop waited for it up to the deadline, not a moment less.
    assert elapsed >= 1.5, f"the stop cut the DATA transfer after {elapsed:.1f}s"
    assert "sessions still running at the stop deadline" in srv.log_text()
    assert srv.all_stored_files() == [], "part of a message was delivered"


# --------------------------------------------------------------------------- 4. the global connection cap

# README, configuration: "`limits.max_connections` | concurrent connections over all listeners;
# beyond it, `421 4.7.0` / `-ERR [SYS/TEMP]`". Each held session comes from its own address, so
# only the global cap (not max_connections_per_ip) can refuse the next one.


def test_max_connections_is_global_and_refuses_with_421_and_sys_temp(server_factory):
    srv = server_factory(limits={"max_connections": 3, "max_connections_per_ip": 100})
    srv.start()

    sources = [f"127.0.0.{i}" for i in (1, 2, 3)]
    held = wait_until(lambda: served_sessions([(s, srv.smtp_port) for s in sources]), timeout=10,
                      message="three sessions to be served")
    try:
        extra = connect_from("127.0.0.4", srv.smtp_port)
        f = extra.makefile("rb")
        line = f.readline()
        assert re.fullmatch(rb"421 4\.7\.0 .+\r\n", line), line
        assert f.readline() == b"", "the refused SMTP connection was not closed"
        extra.close()

        extra = connect_from("127.0.0.5", srv.pop3_port)
        f = extra.makefile("rb")
        line = f.readline()
        assert line.startswith(b"-ERR [SYS/TEMP] ") and line.endswith(b"\r\n"), line
        assert f.readline() == b"", "the refused POP3 connection was not closed"
        extra.close()

        held.pop().close()
        p = wait_until(lambda: srv.pop3(ALICE), timeout=10, message="a session once one was closed")
        p.quit()
    finally:
        for s in held:
            s.close()


# --------------------------------------------------------------------------- 5. the spool after a crash

# README, storage layout: "spool/ messages being received (never acknowledged; emptied at start)".


def test_spool_left_by_a_crash_in_data_is_emptied_at_start(server):
    c, _ = start_data(server.smtp_port)
    try:
        c.sendall(b"Subject: cut by a crash\r\n\r\n" + PAST_THE_FIRST_WRITE)
        wait_until(lambda: spool_files(server), timeout=10, message="the message to be spooled")
        server.kill()  # SIGKILL: no destructor runs, the spool file stays
    finally:
        c.close()
    assert spool_files(server), "a SIGKILLed server left nothing in the spool: nothing to test"
    server.start()
    assert spool_files(server) == [], f"left in the spool after start: {spool_files(server)}"
    assert server.all_stored_files() == [], "the interrupted message was delivered"
    assert delivers(server, ALICE) and len(server.stored_messages(ALICE)) == 1
    assert spool_files(server) == []


# --------------------------------------------------------------------------- 6. SMTP AUTH lock-out per address

# README, submission: "a wrong password is `535 5.7.8`, with the same delays and per-address lock-out
# as POP3"; `auth.max_failures_per_ip`: "every login from it (even a correct one) is refused".


def submission_session(srv, cert: Path, source: str) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", srv.ports["submission"], local_hostname="client.test",
                     timeout=NET_TIMEOUT, source_address=(source, 0))
    s.starttls(context=ssl.create_default_context(cafile=str(cert)))
    s.ehlo()
    return s


def auth_plain(s: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return s.docmd("AUTH", f"PLAIN {token}")


def test_smtp_auth_failures_lock_out_the_address_not_others(server_factory, tmp_path):
    cert, key = make_cert(tmp_path, "lockout")
    srv = server_factory(tls={"certificate": cert, "key": key}, extra_listeners=("submission",),
                         auth={"max_failures_per_ip": 3, "max_failures": 10, "failure_delay_ms": 20})
    srv.start()
    s = submission_session(srv, cert, "127.0.0.1")
    for _ in range(3):
        code, text = auth_plain(s, ALICE, "wrong")
        assert code == 535, (code, text)
    s.close()

    # A new session from the same address, with the right password: refused, and closed.
    s = submission_session(srv, cert, "127.0.0.1")
    code, text = auth_plain(s, ALICE, PASSWORDS[ALICE])
    assert (code, text[:5]) == (421, b"4.7.0"), (code, text)
    s.close()
    assert "login refused: too many failures from 127.0.0.1" in srv.log_text()

    # Another address is not affected.
    s = submission_session(srv, cert, "127.0.0.2")
    code, text = auth_plain(s, ALICE, PASSWORDS[ALICE])
    assert code == 235, (code, text)
    _, msg = make_message(BOB)
    msg = msg.replace(f"From: Sender <{SENDER}>".encode(), f"From: <{ALICE}>".encode())
    assert s.sendmail(ALICE, [BOB], msg) == {}
    s.quit()
    assert len(srv.stored_messages(BOB)) == 1


# --------------------------------------------------------------------------- 7. POP3 LOGIN-DELAY

# README: "`auth.pop3_login_delay_secs` | RFC 2449 LOGIN-DELAY: minimum time between two POP3 logins
# of an account (0: none); advertised in CAPA".


def test_pop3_login_delay_refuses_a_second_login_until_it_has_passed(server_factory):
    srv = server_factory(auth={"pop3_login_delay_secs": 2})
    srv.start()
    p = srv.pop3_connect()
    assert p.capa().get("LOGIN-DELAY") == ["2"], p.capa()
    p.user(ALICE)
    p.pass_(PASSWORDS[ALICE])
    first = time.monotonic()
    p.quit()

    try:
        srv.pop3(ALICE).quit()
        refused = b""
    except poplib.error_proto as e:
        refused = e.args[0]
    elapsed = time.monotonic() - first
    assert elapsed < 2, f"the second login took {elapsed:.1f}s: too slow to test a 2 s delay"
    assert refused.startswith(b"-ERR [LOGIN-DELAY] "), f"second login {elapsed:.1f}s later: {refused!r}"
    # Other accounts are not held back by alice's delay.
    srv.pop3(BOB).quit()

    time.sleep(max(0.0, first + 2.2 - time.monotonic()))
    srv.pop3(ALICE).quit()


# --------------------------------------------------------------------------- 8. the development default

# README, Run it: the demo password "is generated on first start and printed once (only its argon2id
# hash is stored, in `rustmail-data/demo-password.hash`; delete that file for a new password)".
# test_dev_default.py covers the ports, the domain and a send/fetch with the printed password; this
# covers the password's life. The dev listeners are moved off 2525/1110 with RUSTMAIL_LISTEN__*
# overrides (still no --config), so the test neither skips nor collides with a parallel run.


class DevServer:
    def __init__(self, binary: Path, cwd: Path) -> None:
        self.binary, self.cwd = binary, cwd
        self.smtp_port = free_port()
        self.pop3_port = free_port()
        while self.pop3_port == self.smtp_port:
            self.pop3_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def start(self) -> str:
        """Starts `rustmail serve` without --config; returns its stdout once it is listening."""
        self.runs += 1
        self.out = self.cwd / f"stdout{self.runs}.txt"
        self.err = self.cwd / f"stderr{self.runs}.txt"
        env = {**child_env(), "RUSTMAIL_LISTEN__SMTP": f'["127.0.0.1:{self.smtp_port}"]',
               "RUSTMAIL_LISTEN__POP3": f'["127.0.0.1:{self.pop3_port}"]'}
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([str(self.binary), "serve"], cwd=self.cwd, env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err)

        def listening():
            assert self.proc.poll() is None, f"exited with {self.proc.returncode}\n{self.logs()}"
            return port_accepts(self.smtp_port) and port_accepts(self.pop3_port)

        wait_until(listening, timeout=30, message=lambda: f"dev server not listening\n{self.logs()}")
        return self.out.read_text()

    def logs(self) -> str:
        return f"--- stdout ---\n{self.out.read_text()}\n--- stderr ---\n{self.err.read_text()[-4000:]}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"dev server ignored SIGTERM\n{self.logs()}") from None
        assert self.proc.returncode == 0, self.logs()

    def login_works(self, password: str) -> bool:
        p = poplib.POP3("127.0.0.1", self.pop3_port, timeout=NET_TIMEOUT)
        try:
            p.user("demo@localhost")
            p.pass_(password)
            p.quit()
            return True
        except poplib.error_proto as e:
            assert e.args[0].startswith(b"-ERR [AUTH]"), e
            return False
        finally:
            p.close()


@pytest.fixture
def dev_server(rustmail_bin, tmp_path):
    dev = DevServer(rustmail_bin, tmp_path)
    yield dev
    if dev.proc is not None and dev.proc.poll() is None:
        dev.proc.kill()
        dev.proc.wait()


def test_dev_default_password_is_printed_once_and_stored_only_as_a_hash(dev_server, tmp_path):
    data = tmp_path / "rustmail-data"
    first_out = dev_server.start()
    password = parse_demo_password(first_out)
    assert password and "shown only this once" in first_out, first_out
    assert dev_server.login_works(password)
    for path in (p for p in data.rglob("*") if p.is_file()):
        assert password.encode() not in path.read_bytes(), f"the demo password is stored in {path}"
    hash_file = data / "demo-password.hash"
    stored = hash_file.read_text()
    assert stored.startswith("$argon2id$"), stored
    dev_server.stop()

    # A second start: the password is not shown again, the hash is kept, the password still works.
    second_out = dev_server.start()
    assert password not in second_out and "shown only this once" not in second_out, second_out
    assert hash_file.read_text() == stored
    assert dev_server.login_works(password)
    dev_server.stop()

    # Without the hash file: a new password, printed; the old one no longer opens the account.
    hash_file.unlink()
    third_out = dev_server.start()
    new_password = parse_demo_password(third_out)
    assert new_password and new_password != password and "shown only this once" in third_out, third_out
    assert dev_server.login_works(new_password)
    assert not dev_server.login_works(password)
    dev_server.stop()


# --------------------------------------------------------------------------- 9. RUSTMAIL_* overrides

# README, Configuration: "Any key can be overridden by an environment variable `RUSTMAIL_<KEY>`, with
# `__` between nested keys ... an unrelated one is refused as an unknown key"; `check-config`
# "validates the file and the `RUSTMAIL_*` overrides; exit 1 with the key at fault".


def test_rustmail_env_override_beats_the_file(server_factory):
    srv = server_factory(limits={"max_message_size": 2_000_000})
    with_env(srv, RUSTMAIL_LIMITS__MAX_MESSAGE_SIZE="123456")
    srv.start()
    with srv.smtp() as s:
        s.ehlo()
        assert s.esmtp_features.get("size") == "123456", s.esmtp_features
        _, msg = make_message(ALICE, body_lines=[b"y" * 998] * 200)  # about 200 kB
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            s.sendmail(SENDER, [ALICE], msg)  # smtplib sends SIZE=, refused at MAIL
        assert refused.value.smtp_code == 552, refused.value


def test_rustmail_env_overrides_are_validated_and_unknown_ones_refused(server_factory, rustmail_bin):
    srv = server_factory()
    config = str(srv.config_path)
    assert run_cli(rustmail_bin, "check-config", "--config", config).returncode == 0

    out = run_cli(rustmail_bin, "check-config", "--config", config,
                  env={"RUSTMAIL_LIMITS__MAX_RECIPIENTS": "5"})  # below RFC 5321's 100
    assert out.returncode == 1 and "limits.max_recipients" in out.stderr, out

    out = run_cli(rustmail_bin, "check-config", "--config", config, env={"RUSTMAIL_FOO": "1"})
    assert out.returncode == 1 and "FOO" in out.stderr, out
    out = run_cli(rustmail_bin, "serve", "--config", config, env={"RUSTMAIL_FOO": "1"})
    assert out.returncode == 1 and "FOO" in out.stderr, out
    assert not port_accepts(srv.smtp_port)
