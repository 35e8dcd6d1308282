"""What the torture tests share: the server under test, messages that carry their own identity, a
raw SMTP client that knows exactly how far each message got, and reading the Maildirs back.

The server process itself is the end-to-end suite's `RustmailServer` (tests/e2e/e2e_helpers.py): one
config writer and one way of starting, stopping and killing rustmail for every Python test. It already
keeps RUSTMAIL_* variables (such as a runner's RUSTMAIL_BIN) out of the server's environment: the server
reads every one of them as configuration and refuses unknown ones.

Only the standard library is used, so the torture tests run on any python3 >= 3.9.
"""

from __future__ import annotations

import ctypes.util
import hashlib
import importlib.util
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests" / "e2e"))

from e2e_helpers import DOMAIN, HOSTNAME, SENDER, RustmailServer, hash_password  # noqa: E402

PASSWORD = "torture-Secret-1"
HELO = "client.test"


def find_binary(arg: str | None) -> Path:
    """--bin, else $TORTURE_BIN, else debug/rustmail under $CARGO_TARGET_DIR or the repo's target/."""
    raw = arg or os.environ.get("TORTURE_BIN")
    if raw is None:
        target = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
        raw = str(target / "debug" / "rustmail")
    path = Path(raw)
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not (path.is_file() and os.access(path, os.X_OK)):
        sys.exit(f"rustmail binary not found at {path}: build it (cargo build) or pass --bin / TORTURE_BIN")
    return path


def make_server(binary: Path, workdir: Path, locals_: list[str], **kwargs) -> RustmailServer:
    """A server (not started) with one account per local part, all with the same password: one
    `rustmail hash-password` run instead of one per account."""
    phc = hash_password(binary, PASSWORD)
    addresses = [f"{local}@{DOMAIN}" for local in locals_]
    return RustmailServer(
        binary=binary,
        workdir=workdir,
        passwords={a: PASSWORD for a in addresses},
        hashes={a: phc for a in addresses},
        accounts={a: {"password_hash": phc} for a in addresses},
        **kwargs,
    )


# --------------------------------------------------------------------------- messages

# Random octets mapped onto printable ASCII and space: message lines never contain CR or LF.
_PRINTABLE = bytes(0x20 + (b % 95) for b in range(256))


@dataclass
class Attempt:
    """One try at sending one message. A message is retried (a new attempt, same token and body) until a
    `250`; every attempt is told apart in the stored copy by its X-Torture-Attempt field."""

    token: str
    number: int
    rcpts: tuple[str, ...]  # account addresses (the Maildirs it must reach)
    digest: bytes  # sha256 of the form it must be stored in: LF line endings, no trace headers
    size: int
    outcome: str = "pending"  # acked | refused | no-reply (final dot sent, no answer) | unsent
    code: int | None = None
    reply: str = ""  # the last line of the final reply
    qid: str | None = None
    acked_at: float | None = None

    @property
    def key(self) -> str:
        return f"{self.token}/{self.number}"

    @property
    def uid(self) -> str | None:
        """The Maildir base name (and POP3 UIDL) the server gives the acknowledged message."""
        return None if self.qid is None else f"{self.qid}.{HOSTNAME}"


def random_body(rng: random.Random, size: int) -> bytes:
    """About `size` octets of CRLF lines: short and long ones, empty ones, and lines starting with a
    dot (dot-stuffed on the wire, unstuffed in storage), including a line that is a lone dot."""
    lines = []
    total = 0
    while total < size:
        r = rng.random()
        if r < 0.03:
            line = b""
        elif r < 0.06:
            line = b"."
        elif r < 0.12:
            line = b"." + rng.randbytes(rng.randint(1, 70)).translate(_PRINTABLE)
        elif r < 0.14:
            line = rng.randbytes(rng.randint(999, 3000)).translate(_PRINTABLE)
        else:
            line = rng.randbytes(rng.randint(1, 78)).translate(_PRINTABLE)
        lines.append(line + b"\r\n")
        total += len(line) + 2
    return b"".join(lines)


def build_message(token: str, number: int, rcpts: tuple[str, ...], body: bytes) -> bytes:
    """The message as the client means it (CRLF, not dot-stuffed)."""
    head = [
        f"From: Torture <{SENDER}>",
        "To: " + ", ".join(f"<{r}>" for r in rcpts),
        f"Subject: torture {token}",
        f"Message-ID: <{token}@{HELO}>",
        "Date: Wed, 02 Dec 2026 10:00:00 +0000",
        f"X-Torture-Token: {token}",
        f"X-Torture-Attempt: {number}",
    ]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


def stored_form(message: bytes) -> bytes:
    """What the server keeps after its trace headers: the same octets with LF line endings."""
    return message.replace(b"\r\n", b"\n")


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def dot_stuff(message: bytes) -> bytes:
    """RFC 5321 §4.5.2: a line starting with a dot gets one more."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


# --------------------------------------------------------------------------- raw SMTP client


class ConnectionLost(Exception):
    pass


class SmtpConn:
    """One SMTP connection, pipelining MAIL/RCPT/DATA (RFC 2920). It reports exactly how far a message
    got: never ended (the final dot was never handed to the kernel: the server must not store it), ended
    but unanswered (it may or may not be stored), or answered."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        try:
            code, lines = self.reply()
            if code != 220:
                raise ConnectionLost(f"greeting {lines!r}")
            self.sock.sendall(f"EHLO {HELO}\r\n".encode())
            code, lines = self.reply()
            if code != 250:
                raise ConnectionLost(f"EHLO answered {lines!r}")
            self.pipelining = any(line[4:].upper() == b"PIPELINING" for line in lines)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line, self.buf = self.buf[:end], self.buf[end + 2:]
                return line
            try:
                chunk = self.sock.recv(65536)
            except OSError as e:
                raise ConnectionLost(repr(e)) from None
            if not chunk:
                raise ConnectionLost("connection closed")
            self.buf += chunk

    def reply(self) -> tuple[int, list[bytes]]:
        lines = [self._line()]
        while len(lines[-1]) >= 4 and lines[-1][3:4] == b"-":
            lines.append(self._line())
        try:
            return int(lines[-1][:3]), lines
        except ValueError:
            raise ConnectionLost(f"not an SMTP reply: {lines!r}") from None

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise ConnectionLost(repr(e)) from None

    def send(self, attempt: Attempt, message: bytes, ended=None) -> None:
        """Sends one message and records the outcome in `attempt` (on ConnectionLost too, then re-raised:
        the connection is no longer usable). `ended` (a threading.Event) is set once the final dot is
        sent: the moment the server starts to deliver."""
        attempt.outcome = "unsent"
        envelope = f"MAIL FROM:<{SENDER}>\r\n" + "".join(f"RCPT TO:<{r}>\r\n" for r in attempt.rcpts)
        if self.pipelining:
            self._send((envelope + "DATA\r\n").encode())
            replies = [self.reply() for _ in range(len(attempt.rcpts) + 2)]
        else:
            replies = []
            for line in envelope.splitlines(keepends=True) + ["DATA\r\n"]:
                self._send(line.encode())
                replies.append(self.reply())
        codes = [code for code, _ in replies]
        if codes[-1] != 354:
            attempt.outcome = "refused"
            attempt.code, lines = next((r for r in replies if r[0] >= 400), replies[-1])
            attempt.reply = lines[-1].decode(errors="replace")
            if codes[0] == 250:
                self._send(b"RSET\r\n")
                self.reply()
            return
        if any(c >= 500 for c in codes[1:-1]):
            raise AssertionError(f"a recipient was refused: {replies!r}")
        self._send(dot_stuff(message))
        # Separate from the body: if the body's write fails, the end of data was never sent.
        self._send(b".\r\n")
        attempt.outcome = "no-reply"
        if ended is not None:
            ended.set()
        code, lines = self.reply()
        attempt.code, attempt.reply = code, lines[-1].decode(errors="replace")
        if code == 250:
            m = re.search(rb"queued as (\S+)", lines[-1])
            if not m:
                raise AssertionError(f"250 without a queue id: {lines!r}")
            attempt.outcome, attempt.qid = "acked", m.group(1).decode()
        else:
            attempt.outcome = "refused"


# --------------------------------------------------------------------------- reading Maildirs back

_TRACE = re.compile(rb"Return-Path: <([^>\n]*)>\nReceived:[^\n]*\n(?:[ \t][^\n]*\n)*")
_TRACE_ID = re.compile(rb"\sid ([A-Za-z0-9.]+)[\s;]")
_FIELD = re.compile(rb"^X-Torture-(Token|Attempt): (\S+)$", re.MULTILINE)


@dataclass
class StoredFile:
    account: str
    sub: str  # new | cur | tmp
    path: Path
    uid: str  # the base name: the POP3 UIDL
    problems: list[str] = field(default_factory=list)
    attempt_key: str | None = None
    token: str | None = None
    content_digest: bytes | None = None


def parse_stored(data: bytes) -> tuple[str | None, str | None, bytes, list[str]]:
    """Splits a stored message (LF form) into the queue id of its Received: field, its attempt key
    (token/number), and the sha256 of what follows the trace headers; with what was wrong."""
    problems = []
    m = _TRACE.match(data)
    if not m:
        return None, None, digest(data), [f"no Return-Path:/Received: at the top: {data[:120]!r}"]
    if m.group(1) != SENDER.encode():
        problems.append(f"Return-Path is <{m.group(1).decode(errors='replace')}>")
    qid = _TRACE_ID.search(m.group(0))
    rest = data[m.end():]
    head = rest.split(b"\n\n", 1)[0]
    fields = dict(_FIELD.findall(head))
    key = None
    if b"Token" in fields and b"Attempt" in fields:
        key = f"{fields[b'Token'].decode()}/{fields[b'Attempt'].decode()}"
    return (qid.group(1).decode() if qid else None), key, digest(rest), problems


def read_file(account: str, sub: str, path: Path) -> StoredFile:
    name = path.name
    base = name.split(":", 1)[0]
    uid, *info = base.split(",")
    f = StoredFile(account, sub, path, uid)
    data = path.read_bytes()
    sizes = dict(part.split("=", 1) for part in info if "=" in part)
    if sizes.get("S") != str(len(data)):
        f.problems.append(f"S={sizes.get('S')} in the name, {len(data)} octets on disk")
    wire = len(data) + data.count(b"\n")
    if sizes.get("W") != str(wire):
        f.problems.append(f"W={sizes.get('W')} in the name, {wire} octets in CRLF form")
    qid, key, content, problems = parse_stored(data)
    f.problems += problems
    if qid is None or f"{qid}.{HOSTNAME}" != uid:
        f.problems.append(f"Received: id {qid} does not match the file name {uid}")
    f.attempt_key, f.content_digest = key, content
    f.token = key.split("/", 1)[0] if key else None
    return f


def scan_maildirs(srv: RustmailServer, accounts: list[str], subs=("new", "cur")) -> list[StoredFile]:
    out = []
    for account in accounts:
        for sub in subs:
            d = srv.maildir(account) / sub
            for path in sorted(d.iterdir()):
                if path.is_file() and not path.name.startswith("."):
                    out.append(read_file(account, sub, path))
    return out


def count_files(directory: Path) -> int:
    try:
        return sum(1 for p in directory.iterdir() if p.is_file())
    except FileNotFoundError:
        return 0


# --------------------------------------------------------------------------- power cuts


class Unavailable(Exception):
    """What a test needs cannot run here (exit status 77: a skip)."""


def power_cuts_unavailable() -> str | None:
    """Why the power-cut tests cannot run here (the caller skips: exit status 77), or None."""
    try:
        ForgetfulMount.check_available()
    except Unavailable as e:
        return str(e)
    return None


class ForgetfulMount:
    """A forgetful_fs.py instance mounted at `mountpoint`: a disk whose power can be cut. `cut()` freezes
    it and records what was durable; `power_on()` (after the programs using it were killed) mounts a fresh
    instance showing only that. Needs root, /dev/fuse, libfuse2 and fusepy (in the same python)."""

    def __init__(self, mountpoint: Path, workdir: Path) -> None:
        self.mountpoint, self.workdir = mountpoint, workdir
        self.control = workdir / "forgetful.sock"
        self.image = workdir / "forgetful.image"
        self.log_path = workdir / "forgetful.log"
        self.proc = None
        self.cuts = 0

    @staticmethod
    def check_available() -> None:
        if os.geteuid() != 0:
            raise Unavailable("mounting a FUSE file system needs root")
        if not os.path.exists("/dev/fuse"):
            raise Unavailable("no /dev/fuse")
        if ctypes.util.find_library("fuse") is None:
            raise Unavailable("libfuse2 is missing (apt-get install libfuse2)")
        if importlib.util.find_spec("fuse") is None:
            raise Unavailable(f"fusepy is missing from {sys.executable} (pip install fusepy)")

    def start(self, image: Path | None = None) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, str(Path(__file__).with_name("forgetful_fs.py")), str(self.mountpoint),
                "--control", str(self.control)]
        if image is not None:
            args += ["--image", str(image)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while not (self.mounted() and self.control.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"forgetful_fs.py did not mount {self.mountpoint}: "
                                     f"{self.log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)

    def _ask(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(120)
            s.connect(str(self.control))
            s.sendall(command.encode() + b"\n")
            return s.makefile("r").readline().strip()

    def stats(self) -> dict:
        return json.loads(self._ask("stats"))

    def fail(self, ops: str, error: str = "EIO") -> None:
        """From now on the operations `ops` (FUSE names, comma-separated) fail with `error`."""
        if (answer := self._ask(f"fail {ops} {error}")) != "ok":
            raise AssertionError(f"forgetful_fs.py answered {answer!r} to fail")

    def heal(self) -> None:
        if (answer := self._ask("heal")) != "ok":
            raise AssertionError(f"forgetful_fs.py answered {answer!r} to heal")

    def cut(self) -> None:
        """The power fails: from now on nothing reaches the disk; its durable state is recorded."""
        if self.image.exists():
            self.image.unlink()
        if (answer := self._ask(f"cut {self.image}")) != "ok":
            raise AssertionError(f"forgetful_fs.py answered {answer!r} to cut")
        self.cuts += 1

    def power_off(self) -> None:
        """After a cut: the instance dies (requests still waiting on it fail at once, so that the programs
        using the disk can be killed and reaped) and the mount goes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None
        if self.mounted():
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=True)

    def mounted(self) -> bool:
        """From the mount table: a mount whose process died answers stat with ENOTCONN, which
        os.path.ismount takes for "not a mount point"."""
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == str(self.mountpoint) for line in f)

    def power_on(self) -> None:
        """After power_off(): the disk as the cut left it."""
        self.start(self.image)
