"""Helpers shared by the rustmail end-to-end tests.

Everything here talks to a real `rustmail serve` process over loopback sockets
using only the Python standard library (subprocess, socket, smtplib, poplib).
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import poplib
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import pytest

T = TypeVar("T")

DOMAIN = "example.test"
HOSTNAME = "mx.test"
SENDER = "sender@client.test"

# Generous: a debug build verifies argon2id hashes slowly.
NET_TIMEOUT = 30.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
# Must stay below STOP_TIMEOUT so a "graceful" stop that drains connections still counts.
SHUTDOWN_TIMEOUT_SECS = 5


# --------------------------------------------------------------------------- polling


def wait_until(
    condition: Callable[[], T],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Poll `condition` until it returns a truthy value; return that value.

    Exceptions raised by `condition` count as "not yet" and the last one is
    reported when the deadline passes. Raises AssertionError on timeout.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
            last_exc = None
        except Exception as exc:  # noqa: BLE001 - reported below
            last_exc = exc
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            if last_exc is not None:
                text += f"\nlast exception: {last_exc!r}"
            raise AssertionError(f"timed out after {timeout}s: {text}")
        time.sleep(interval)


# --------------------------------------------------------------------------- ports


@contextlib.contextmanager
def strace_attached(pid: int, *options: str):
    """strace attached to every thread of a running process for the length of the block, with
    OPTIONS (a trace to record, faults to inject); detached at the end, leaving the process running.
    Skips the test where strace is missing or cannot attach (e.g. under ptrace_scope)."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    tracer = subprocess.Popen(["strace", "-f", "-qq", *options, "-p", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Attached once the status line shows a tracer (or strace gave up).
    wait_until(lambda: tracer.poll() is not None
               or "TracerPid:\t0" not in Path(f"/proc/{pid}/status").read_text(),
               timeout=10, message="strace to attach")
    if tracer.poll() is not None:
        pytest.skip(f"strace cannot attach: {tracer.stderr.read().decode(errors='replace').strip()}")
    time.sleep(0.2)  # every thread, not only the first
    try:
        yield tracer
    finally:
        tracer.send_signal(signal.SIGINT)  # detaches
        tracer.wait(timeout=10)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (bound to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- binary


def child_env(rust_log: str | None = None) -> dict[str, str]:
    """The environment for rustmail processes: ours without RUSTMAIL_* variables.

    rustmail reads RUSTMAIL_* environment variables as config overrides and rejects
    unknown ones, so the test runner's own RUSTMAIL_BIN must not leak into it.
    `rust_log` sets RUST_LOG (the log level); without it the runner's RUST_LOG, if any, is
    passed on, and rustmail logs at `info`.
    """
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("RUSTMAIL_")}
    if rust_log is not None:
        env["RUST_LOG"] = rust_log
    return env


def hash_password(binary: Path, password: str) -> str:
    """Hash a password with `rustmail hash-password` (password on stdin)."""
    proc = subprocess.run(
        [str(binary), "hash-password"],
        input=(password + "\n").encode(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=60,
        check=False,
        env=child_env(),
    )
    out = proc.stdout.decode(errors="replace")
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, (
        f"`rustmail hash-password` exited {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    )
    hashes = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("$argon2id$")]
    assert len(hashes) == 1, (
        f"`rustmail hash-password` printed no single argon2id PHC hash on stdout\n"
        f"stdout:\n{out}\nstderr:\n{err}"
    )
    return hashes[0]


# --------------------------------------------------------------------------- config


def toml_str(value: str) -> str:
    """A TOML basic string."""
    out = ['"']
    for ch in value:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


def render_config(
    *,
    storage_root: Path,
    smtp_listen: Iterable[str],
    pop3_listen: Iterable[str],
    accounts: dict[str, dict],
    hostname: str = HOSTNAME,
    domains: Iterable[str] = (DOMAIN,),
    limits: dict | None = None,
    auth: dict | None = None,
    extra_top: dict | None = None,
    extra_listen: dict | None = None,
    tls: dict | None = None,
    extra_toml: str = "",
) -> str:
    """Render a rustmail TOML config.

    `accounts` maps an address to the keys of its table, e.g.
    {"password_hash": "...", "aliases": [...]}. `extra_top` adds top-level keys
    (used to write deliberately invalid configs); `extra_toml` is appended as it is (further tables,
    such as `[outbound]`).
    """
    lines = [
        f"hostname = {toml_str(hostname)}",
        f"domains = {toml_value(list(domains))}",
        f"storage_root = {toml_str(str(storage_root))}",
    ]
    for key, value in (extra_top or {}).items():
        lines.append(f"{key} = {toml_value(value)}")
    lines += [
        "",
        "[listen]",
        f"smtp = {toml_value(list(smtp_listen))}",
        f"pop3 = {toml_value(list(pop3_listen))}",
    ]
    lines += [f"{k} = {toml_value(list(v))}" for k, v in (extra_listen or {}).items()]
    if tls:
        lines += ["", "[tls]"] + [f"{k} = {toml_value(str(v))}" for k, v in tls.items()]
    if limits:
        lines += ["", "[limits]"] + [f"{k} = {toml_value(v)}" for k, v in limits.items()]
    if auth:
        lines += ["", "[auth]"] + [f"{k} = {toml_value(v)}" for k, v in auth.items()]
    for address, table in accounts.items():
        lines += ["", f"[accounts.{toml_str(address)}]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n" + extra_toml


def make_ca_and_cert(directory: Path, names: Iterable[str]) -> tuple[Path, Path, Path]:
    """A certificate authority and a server certificate it signed for `names` (IP addresses or DNS
    names), made by openssl: (CA certificate, server certificate, server key), PEM."""
    ca_key, ca = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    san = ",".join(f"IP:{n}" if re.fullmatch(r"[0-9.]+|[0-9a-f:]+", n) else f"DNS:{n}" for n in names)
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", *ec, "-subj", "/CN=rustmail test CA", "-days", "30", "-keyout", str(ca_key),
        "-out", str(ca), "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign")
    run("req", *ec, "-subj", "/CN=rustmail test server", "-keyout", str(key), "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "30", "-extfile", str(ext), "-out", str(cert))
    return ca, cert, key


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- server


class RustmailServer:
    """One `rustmail serve --config FILE` process plus the state it owns."""

    def __init__(
        self,
        *,
        binary: Path,
        workdir: Path,
        passwords: dict[str, str],
        hashes: dict[str, str],
        accounts: dict[str, dict],
        limits: dict | None = None,
        auth: dict | None = None,
        tls: dict | None = None,
        extra_listeners: Iterable[str] = (),
        rust_log: str | None = None,
        host: str = "127.0.0.1",
        domains: Iterable[str] = (DOMAIN,),
        hostname: str = HOSTNAME,
        extra_toml: str = "",
    ) -> None:
        self.binary = binary
        # The loopback address every listener binds (another than 127.0.0.1 to play a second host).
        self.host = host
        self.domains = list(domains)
        self.hostname = hostname
        self.extra_toml = extra_toml
        # RUST_LOG for the server, e.g. "trace" to check that not even the most verbose level
        # logs a secret.
        self.rust_log = rust_log
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.config_path = workdir / "rustmail.toml"
        self.log_path = workdir / "server.log"
        self.passwords = dict(passwords)
        self.hashes = dict(hashes)
        self.smtp_port = free_port()
        self.pop3_port = free_port()
        while self.pop3_port == self.smtp_port:
            self.pop3_port = free_port()
        self.limits = {"shutdown_timeout_secs": SHUTDOWN_TIMEOUT_SECS, **(limits or {})}
        self.auth = {"failure_delay_ms": 50, **(auth or {})}
        self.tls = tls
        # Further listeners (submission, submissions, pop3s), each on a free port.
        self.ports = {}
        for name in extra_listeners:
            port = free_port()
            # The kernel may hand out a free port twice: every listener needs its own.
            while port in (self.smtp_port, self.pop3_port, *self.ports.values()):
                port = free_port()
            self.ports[name] = port
        self.proc: subprocess.Popen | None = None
        # A command the server runs under, e.g. ["prlimit", "--nofile=200:200", "--"].
        self.wrapper: list[str] = []
        self.start_failed = False  # start() already reported the problem
        self.exit_codes: list[int] = []
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.write_config(accounts)

    # ----- config

    def config_text(self, accounts: dict[str, dict], **overrides) -> str:
        kwargs = dict(
            storage_root=self.state_dir,
            smtp_listen=[f"{self.host}:{self.smtp_port}"],
            pop3_listen=[f"{self.host}:{self.pop3_port}"],
            accounts=accounts,
            limits=self.limits,
            auth=self.auth,
            tls=self.tls,
            extra_listen={name: [f"{self.host}:{port}"] for name, port in self.ports.items()},
            domains=self.domains,
            hostname=self.hostname,
            extra_toml=self.extra_toml,
        )
        kwargs.update(overrides)
        return render_config(**kwargs)

    def write_config(self, accounts: dict[str, dict], **overrides) -> str:
        text = self.config_text(accounts, **overrides)
        write_atomically(self.config_path, text)
        return text

    def account(self, address: str, aliases: Iterable[str] = ()) -> dict:
        table: dict = {"password_hash": self.hashes[address]}
        aliases = list(aliases)
        if aliases:
            table["aliases"] = aliases
        return table

    # ----- log

    def log_text(self) -> str:
        try:
            return self.log_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return "<no log file>"

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        """Waits until the log matches the regular expression `pattern` (e.g. a line the server writes
        only after the peer's reply, which the peer may have stored a moment before); returns the match."""
        return wait_until(lambda: re.search(pattern, self.log_text()), timeout=timeout, message=self.log_tail)

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def log_tail(self, chars: int = 6000) -> str:
        text = self.log_text()
        if len(text) > chars:
            text = "...[log truncated]...\n" + text[-chars:]
        return f"--- server log {self.log_path} ---\n{text}\n--- end of server log ---"

    # ----- lifecycle

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        assert not self.running, "server already running"
        self.start_failed = False
        with open(self.log_path, "ab") as log:
            log.write(f"===== rustmail serve --config {self.config_path} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [*self.wrapper, str(self.binary), "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.workdir,
                env=child_env(self.rust_log),
            )

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise _ServerDied()
            return port_accepts(self.smtp_port, self.host) and port_accepts(self.pop3_port, self.host)

        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return
            except _ServerDied:
                self.start_failed = True
                raise AssertionError(
                    f"rustmail serve exited with code {self.proc.returncode} before listening "
                    f"on SMTP {self.smtp_port} / POP3 {self.pop3_port}\n{self.log_tail()}"
                ) from None
            if time.monotonic() >= deadline:
                self.kill()
                self.start_failed = True
                raise AssertionError(
                    f"rustmail serve did not accept connections on SMTP {self.smtp_port} and "
                    f"POP3 {self.pop3_port} within {timeout}s\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send `sig` and wait for the process to exit; return its exit code."""
        assert self.proc is not None, "server was never started"
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"rustmail serve did not exit within {timeout}s of signal {sig}; killed it\n"
                    f"{self.log_tail()}"
                ) from None
        code = self.proc.returncode
        self.exit_codes.append(code)
        return code

    def stop_ok(self, sig: int = signal.SIGTERM) -> None:
        code = self.stop(sig)
        assert code == 0, f"rustmail serve exited with code {code} after signal {sig}\n{self.log_tail()}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        """Graceful stop (exit code must be 0), then start on the same config and state."""
        self.stop_ok()
        self.start()

    def reload(self, accounts: dict[str, dict] | None = None, *, text: str | None = None) -> int:
        """Rewrite the config (from accounts, or raw text) and send SIGHUP.

        Returns the log offset from before the signal, for `log_since`.
        """
        assert self.running, f"server not running\n{self.log_tail()}"
        if text is None:
            assert accounts is not None
            text = self.config_text(accounts)
        write_atomically(self.config_path, text)
        offset = self.log_size()
        self.proc.send_signal(signal.SIGHUP)
        return offset

    def assert_alive(self) -> None:
        assert self.running, (
            f"rustmail serve is no longer running (exit code {self.proc.returncode})\n{self.log_tail()}"
        )

    # ----- disk

    def maildir(self, address: str) -> Path:
        local, domain = address.split("@", 1)
        return self.state_dir / "mail" / domain / local

    def maildir_files(self, address: str, sub: str = "new") -> list[Path]:
        # The server makes every account's Maildir at start: a missing directory means the test
        # looks in the wrong place, and counting its files would give 0 whatever was delivered.
        d = self.maildir(address) / sub
        assert d.is_dir(), f"{d} is not a directory: wrong path, or not an account's Maildir"
        return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))

    def stored_messages(self, address: str) -> list[Path]:
        return self.maildir_files(address, "new") + self.maildir_files(address, "cur")

    def all_stored_files(self) -> list[Path]:
        root = self.state_dir / "mail"
        assert root.is_dir(), f"{root} is not a directory: the Maildirs are not where the test looks"
        return sorted(
            p for p in root.rglob("*") if p.is_file() and p.parent.name in ("new", "cur", "tmp")
        )

    # ----- clients

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP(self.host, self.smtp_port, local_hostname="client.test", timeout=NET_TIMEOUT)

    def send(self, to_addrs, msg: bytes, sender: str = SENDER) -> dict:
        with self.smtp() as s:
            return s.sendmail(sender, to_addrs, msg)

    def pop3_connect(self) -> poplib.POP3:
        return poplib.POP3(self.host, self.pop3_port, timeout=NET_TIMEOUT)

    def pop3(self, address: str, password: str | None = None) -> poplib.POP3:
        """A POP3 session logged in with USER/PASS."""
        p = self.pop3_connect()
        try:
            p.user(address)
            p.pass_(self.passwords[address] if password is None else password)
        except BaseException:
            close_quietly(p)
            raise
        return p

    def rcpt_code(self, address: str) -> tuple[int, bytes]:
        """SMTP reply to RCPT TO:<address> (no message is sent)."""
        with self.smtp() as s:
            s.ehlo()
            code, _ = s.mail(SENDER)
            assert code == 250, f"MAIL FROM refused: {code}"
            reply = s.rcpt(address)
            s.rset()
            return reply


class _ServerDied(Exception):
    pass


def close_quietly(p: poplib.POP3) -> None:
    try:
        p.close()
    except Exception:  # noqa: BLE001
        pass


def drop_connection(p: poplib.POP3) -> None:
    """Close a POP3 connection abruptly, without QUIT."""
    try:
        p.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    close_quietly(p)


# --------------------------------------------------------------------------- messages

_counter = 0


def make_message(
    to: str,
    subject: str | None = None,
    body_lines: Iterable[bytes] = (b"Hello.",),
    extra_headers: Iterable[bytes] = (),
) -> tuple[str, bytes]:
    """An RFC 5322 message as CRLF-terminated bytes; returns (unique subject, bytes)."""
    global _counter
    _counter += 1
    if subject is None:
        subject = f"e2e test message {os.getpid()}-{_counter}-{time.monotonic_ns()}"
    headers = [
        f"From: Sender <{SENDER}>".encode(),
        f"To: <{to}>".encode(),
        f"Subject: {subject}".encode(),
        f"Message-ID: <{os.getpid()}.{_counter}.{time.monotonic_ns()}@client.test>".encode(),
        b"Date: Thu, 26 Nov 2026 10:00:00 +0000",
        b"MIME-Version: 1.0",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Transfer-Encoding: 8bit",
        *extra_headers,
    ]
    msg = b"\r\n".join(headers) + b"\r\n\r\n" + b"\r\n".join(body_lines) + b"\r\n"
    return subject, msg


def make_message_of_size(to: str, size: int) -> bytes:
    """A message of exactly `size` octets as sent (CRLF line endings, before dot-stuffing, which its
    lines of 'y' never need): the size the server counts against limits.max_message_size."""
    _, head = make_message(to, body_lines=[])
    head = head[: -len(b"\r\n")]  # make_message ends an empty body with one CRLF
    room = size - len(head)
    assert room >= 2, f"a message of {size} octets cannot hold the headers ({len(head)} octets)"
    full, rest = divmod(room, 80)
    if rest == 1:  # a line takes at least its CRLF
        full, rest = full - 1, 81
    lines = [b"y" * 78 + b"\r\n"] * full + ([b"y" * (rest - 2) + b"\r\n"] if rest else [])
    msg = head + b"".join(lines)
    assert len(msg) == size
    return msg


def pop3_message_bytes(lines: list[bytes]) -> bytes:
    """Re-assemble poplib's line list (un-dot-stuffed, CRLF stripped) into message bytes."""
    return b"".join(line + b"\r\n" for line in lines)


_HEADER_NAME = re.compile(rb"^([!-9;-~]+):")


def split_prepended_headers(
    lines: list[bytes], names: Iterable[str] = ("Return-Path", "Received")
) -> tuple[list[tuple[str, bytes]], list[bytes]]:
    """Strip the header fields the server prepends, in order, from a message's lines.

    Each expected field must appear, in the given order, at the very top; a field's
    folded continuation lines (starting with space or tab) are consumed with it.
    Returns ([(name, unfolded value)], remaining lines).
    """
    fields: list[tuple[str, bytes]] = []
    i = 0
    for name in names:
        assert i < len(lines), f"message ended before the prepended {name}: header"
        m = _HEADER_NAME.match(lines[i])
        assert m and m.group(1).decode().lower() == name.lower(), (
            f"expected a prepended {name}: header at line {i}, got {lines[i][:200]!r}\n"
            f"first lines: {lines[:6]!r}"
        )
        value = lines[i][m.end():]
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            value += b" " + lines[i].strip()
            i += 1
        fields.append((name, value.strip()))
    return fields, lines[i:]


def match_trace_headers(
    data: bytes,
    *,
    rcpt: str | None,
    sender: str = SENDER,
    helo: str = "client.test",
    peer: str = "127.0.0.1",
    host: str = HOSTNAME,
    protocol: str = "ESMTP",
    eol: bytes = b"\r\n",
) -> tuple[dict[str, str], bytes]:
    """Match the Return-Path: and Received: fields the server prepends (README, "Trace headers") at the
    start of `data`, field by field; returns ({"id": queue id, "date": date}, the rest of `data`).

    `rcpt` is the recipient the Received: field names (None: there must be no `for` clause);
    `eol` is the line ending of `data` (CRLF as POP3 sends it, LF as stored).
    """
    e = re.escape(eol)
    fws = rb"(?:" + e + rb")?[ \t]+"  # folding white space

    def text(s: str) -> bytes:
        return re.escape(s.encode())

    for_clause = fws + rb"for <" + text(rcpt) + rb">" if rcpt is not None else b""
    pattern = (
        rb"Return-Path: <" + text(sender) + rb">" + e
        + rb"Received:" + fws + rb"from " + text(helo) + fws + rb"\(\[" + text(peer) + rb"\]\)"
        + fws + rb"by " + text(host) + fws + rb"\(rustmail\)" + fws + rb"with " + text(protocol)
        + fws + rb"id (?P<id>[A-Za-z0-9._-]+)" + for_clause + rb";" + fws
        + rb"(?P<date>[^\r\n]+)" + e
    )
    m = re.match(pattern, data)
    assert m, (
        f"the message does not start with the expected trace headers (Return-Path <{sender}>, Received "
        f"from {helo} [{peer}] by {host} with {protocol}, for {rcpt}):\n{data[:400]!r}"
    )
    fields = {"id": m.group("id").decode(), "date": m.group("date").decode()}
    parsed = email.utils.parsedate_to_datetime(fields["date"])
    assert parsed.tzinfo is not None, f"Received: date without a zone: {fields['date']!r}"
    return fields, data[m.end():]


def subject_of(lines: list[bytes]) -> str | None:
    for line in lines:
        if line == b"":
            return None
        if line.lower().startswith(b"subject:"):
            return line[len(b"subject:"):].strip().decode(errors="replace")
    return None


def retr_all_subjects(p: poplib.POP3) -> list[str | None]:
    count, _ = p.stat()
    return [subject_of(p.retr(i)[1]) for i in range(1, count + 1)]


# --------------------------------------------------------------------------- dev default


_PASSWORD_TOKEN = re.compile(r"password(?:\s*(?:\bis\b|[:=]|->|\u2192)\s*|\s+)(\S+)", re.IGNORECASE)


def parse_demo_password(stdout_text: str) -> str | None:
    """Find the demo account's generated password in `rustmail serve`'s stdout.

    Tolerant: prefers lines mentioning demo@localhost, takes the token after the
    first "password" followed by a separator (skipping separators such as ':' '=' 'is'), strips quotes.
    """
    lines = stdout_text.splitlines()
    demo_idx = [i for i, ln in enumerate(lines) if "demo@localhost" in ln]
    candidates: list[str] = []
    for i in demo_idx:
        candidates.append(lines[i])
        candidates.extend(lines[i + 1 : i + 3])  # the password may be on the next line
    candidates.extend(lines)
    for line in candidates:
        # "password" followed by a separator (":", "=", "is", blanks) and then the token;
        # this skips words like "demo-password.hash" in the same line.
        m = _PASSWORD_TOKEN.search(line)
        if not m:
            continue
        token = m.group(1).strip("\"'`").rstrip(",;")
        if token.endswith(")") and "(" not in token:
            token = token[:-1]
        token = token.strip("\"'`")
        if token:
            return token
    return None


# --------------------------------------------------------------------------- raw sockets


def read_reply(f) -> bytes:
    """One SMTP reply (through its last line) from a socket's makefile("rb")."""
    while True:
        line = f.readline()
        if not line or line[3:4] != b"-":
            return line


def connect_from(source: str, port: int, timeout: float = 5) -> socket.socket:
    """A TCP connection to 127.0.0.1:port from the loopback address `source` (127.x.y.z)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def greeted(source: str, port: int) -> bool:
    """A new SMTP connection from `source` gets a 220 greeting (then it is closed)."""
    s = connect_from(source, port)
    try:
        return s.makefile("rb").readline().startswith(b"220 ")
    finally:
        s.close()


def served_sessions(targets: list[tuple[str, int]]) -> list[socket.socket] | None:
    """One connection per (source address, port), each greeted (SMTP 220 or POP3 +OK, kept open, the
    greeting read); None (all closed) if any was not. For wait_until: right after start, the start-up
    port probes may still count against the connection cap for a moment."""
    held = [connect_from(source, port) for source, port in targets]
    if all(s.makefile("rb").readline().startswith((b"220", b"+OK")) for s in held):
        return held
    for s in held:
        s.close()
    return None

