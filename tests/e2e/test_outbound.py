"""Outbound delivery between two real rustmail servers, with a real DNS server (dnsmasq) between them.

Host A (127.0.0.1, domain a.test) takes alice's submission and delivers to b.test, whose MX records
point at mx1.b.test (127.0.0.2, where nothing listens: the fallback case) and mx2.b.test (127.0.0.3,
host B). B offers STARTTLS with a certificate from a CA that A trusts through outbound.tls_trust_file.
The DKIM signature A adds is checked by dkimpy, an independent verifier, against the TXT record
dnsmasq serves. Retry intervals and the queue lifetime are configured in seconds, so nothing sleeps long.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import time
from pathlib import Path

import dkim
import dns.resolver
import pytest

from e2e_helpers import RustmailServer, free_port, hash_password, make_ca_and_cert, toml_str, wait_until

pytestmark = pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed")

ALICE = "alice@a.test"
BOB = "bob@b.test"
PASSWORDS = {ALICE: "alice-0utbound!", BOB: "bob-0utbound!"}
SELECTOR = "rm1"


class Dnsmasq:
    """A real DNS server on 127.0.0.1 answering for .test only (NXDOMAIN for unknown names)."""

    def __init__(self, workdir: Path, records: list[str]) -> None:
        self.port = free_port()
        self.log = workdir / "dnsmasq.log"
        self.proc = subprocess.Popen(
            ["dnsmasq", "--keep-in-foreground", "--no-daemon", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
             f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces", "--local=/test/",
             "--log-queries", *records],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        wait_until(lambda: self.resolver_answers(), timeout=10, message="dnsmasq did not start")

    def resolver(self) -> dns.resolver.Resolver:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = ["127.0.0.1"]
        r.port = self.port
        return r

    def resolver_answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"dnsmasq exited: {self.log.read_text()}")
        try:
            self.resolver().resolve("mx2.b.test", "A", lifetime=1)
            return True
        except Exception:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Net:
    """The two hosts, the DNS and the keys of one test."""

    def __init__(self, tmp: Path, binary: Path, hashes: dict[str, str], *, outbound: dict | None = None,
                 b_running: bool = True) -> None:
        self.tmp = tmp
        self.binary = binary
        self.ca, self.cert, self.key = make_ca_and_cert(
            tmp, ["127.0.0.1", "mx.a.test", "mx1.b.test", "mx2.b.test", "nomx.test"])
        self.dkim_key = tmp / "a.test.rm1.dkim.pem"
        keygen = subprocess.run([str(binary), "dkim-keygen", "a.test", "--selector", SELECTOR,
                                 "--out", str(self.dkim_key)], capture_output=True, text=True, check=True)
        self.dkim_record = keygen.stdout.strip()
        strings = re.findall(r'"([^"]*)"', self.dkim_record)
        assert strings and strings[0].startswith("v=DKIM1; k=rsa; p="), self.dkim_record
        self.dkim_txt = "".join(strings)
        self.dns = Dnsmasq(tmp, [
            "--mx-host=b.test,mx1.b.test,10", "--mx-host=b.test,mx2.b.test,20",
            "--host-record=mx1.b.test,127.0.0.2", "--host-record=mx2.b.test,127.0.0.3",
            "--mx-host=nullmx.test,.,0", "--host-record=nomx.test,127.0.0.3",
            "--txt-record=" + ",".join([f"{SELECTOR}._domainkey.a.test", *strings]),
        ])
        tls = {"certificate": self.cert, "key": self.key}
        self.b = RustmailServer(binary=binary, workdir=self.mkdir("b"), passwords=PASSWORDS, hashes=hashes,
                                accounts={BOB: {"password_hash": hashes[BOB]}}, tls=tls, host="127.0.0.3",
                                domains=["b.test"], hostname="mx2.b.test")
        settings = {
            "dns_servers": [f"127.0.0.1:{self.dns.port}"],
            "port": self.b.smtp_port,
            "tls_trust_file": str(self.ca),
            "retry_intervals_secs": [1],
            "connect_timeout_secs": 5,
            "command_timeout_secs": 20,
            **(outbound or {}),
        }
        extra = "\n[outbound]\n" + "".join(f"{k} = {toml_value_any(v)}\n" for k, v in settings.items()
                                             if v is not None)
        extra += (f"\n[[outbound.dkim]]\ndomain = \"a.test\"\nselector = \"{SELECTOR}\"\n"
                  f"key_file = {toml_str(str(self.dkim_key))}\n")
        self.a = RustmailServer(binary=binary, workdir=self.mkdir("a"), passwords=PASSWORDS, hashes=hashes,
                                accounts={ALICE: {"password_hash": hashes[ALICE]}}, tls=tls,
                                extra_listeners=("submission",), domains=["a.test"], hostname="mx.a.test",
                                extra_toml=extra)
        if b_running:
            self.b.start()
        self.a.start()

    def mkdir(self, name: str) -> Path:
        d = self.tmp / name
        d.mkdir()
        return d

    def submit(self, to: list[str], subject: str, body: str = "Hello from a.test.\r\n") -> None:
        message = (f"From: Alice <{ALICE}>\r\nTo: {', '.join(to)}\r\nSubject: {subject}\r\n"
                   f"Message-ID: <{subject.replace(' ', '-')}@a.test>\r\n\r\n{body}").encode()
        ctx = ssl.create_default_context(cafile=str(self.ca))
        with smtplib.SMTP("127.0.0.1", self.a.ports["submission"], local_hostname="client.a.test",
                          timeout=30) as s:
            s.starttls(context=ctx)
            s.login(ALICE, PASSWORDS[ALICE])
            refused = s.sendmail(ALICE, to, message)
            assert refused == {}, refused

    def queue(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.binary), "queue", *args, "--config", str(self.a.config_path)],
                              capture_output=True, text=True, timeout=30)

    def close(self) -> None:
        for srv in (self.a, self.b):
            if srv.running:
                srv.stop()
        self.dns.stop()


def toml_value_any(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value_any(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_str(k)} = {toml_value_any(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


@pytest.fixture(scope="module")
def hashes(rustmail_bin) -> dict[str, str]:
    return {a: hash_password(rustmail_bin, p) for a, p in PASSWORDS.items()}


@pytest.fixture
def net_factory(tmp_path, rustmail_bin, hashes):
    nets = []

    def make(**kwargs) -> Net:
        net = Net(tmp_path, rustmail_bin, hashes, **kwargs)
        nets.append(net)
        return net

    yield make
    for net in nets:
        # Shown by pytest when the test failed.
        print("----- host A\n" + net.a.log_tail() + "\n----- host B\n" + net.b.log_tail())
        net.close()


def messages_in(srv: RustmailServer, address: str) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
            for p in srv.stored_messages(address)]


def wait_for_messages(srv: RustmailServer, address: str, n: int, timeout: float = 30) -> list:
    wait_until(lambda: len(srv.stored_messages(address)) >= n, timeout=timeout,
               message=f"{n} messages for {address}\n{srv.log_tail()}")
    return messages_in(srv, address)


def test_submitted_mail_arrives_at_the_second_mx_over_verified_tls_with_a_dkim_signature_dkimpy_accepts(
        net_factory):
    net = net_factory()
    net.submit([BOB], "first contact")
    (msg,) = wait_for_messages(net.b, BOB, 1)
    assert msg["Subject"] == "first contact"
    # B's own trace header: it received the message over TLS (ESMTPS) from A.
    received = msg.get_all("Received")[0]
    assert "by mx2.b.test" in received and "with ESMTPS" in received, received
    raw = net.b.stored_messages(BOB)[0].read_bytes().replace(b"\n", b"\r\n")

    def dnsfunc(name, timeout=5):
        answer = net.dns.resolver().resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        return b"".join(b"".join(r.strings) for r in answer)

    assert b"DKIM-Signature:" in raw and b"s=rm1" in raw and b"d=a.test" in raw
    assert dkim.verify(raw, dnsfunc=dnsfunc), "dkimpy rejects the signature"
    tampered = raw.replace(b"Hello from a.test.", b"Hello from elsewhere")
    assert not dkim.verify(tampered, dnsfunc=dnsfunc), "the check can fail: a changed body is refused"
    log = net.a.log_text()
    assert re.search(r"delivery delivered: \S+ to <bob@b\.test> via mx2\.b\.test \(tls verified\)", log), log
    assert "mx1.b.test" in log, "the first MX was tried before the fallback"
    # bob reads it over POP3 on B.
    p = net.b.pop3(BOB)
    try:
        count, _ = p.stat()
        assert count == 1
        lines = p.retr(1)[1]
        assert b"Subject: first contact" in lines
    finally:
        p.quit()
    wait_until(lambda: "is empty" in net.queue("list").stdout, timeout=10, message="queue not emptied")


def test_unknown_remote_user_produces_a_readable_bounce_in_the_senders_pop3_mailbox(net_factory):
    net = net_factory()
    net.submit(["nobody@b.test"], "to nobody")
    (report,) = wait_for_messages(net.a, ALICE, 1)
    assert report["From"].addresses[0].username == "MAILER-DAEMON"
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    text = report.as_string()
    assert "nobody@b.test" in text and "Status: 5.1.1" in text and "Subject: to nobody" in text
    assert "Action: failed" in text and "Remote-MTA: dns; mx2.b.test" in text
    p = net.a.pop3(ALICE)
    try:
        assert p.stat()[0] == 1
        body = b"\n".join(p.retr(1)[1])
        assert b"Undelivered Mail Returned to Sender" in body
    finally:
        p.quit()
    assert net.b.stored_messages(BOB) == []


def test_null_mx_and_a_domain_that_does_not_exist_bounce_at_once_without_retrying(net_factory):
    net = net_factory(outbound={"retry_intervals_secs": [3600]})
    net.submit(["someone@nullmx.test", "someone@nx.test"], "nowhere")
    reports = wait_for_messages(net.a, ALICE, 1, timeout=20)
    text = "".join(r.as_string() for r in reports)
    assert "someone@nullmx.test" in text and "5.1.10" in text, text
    assert "someone@nx.test" in text and "5.1.2" in text, text


def test_implicit_mx_delivers_to_the_domains_own_address(net_factory):
    net = net_factory()
    # nomx.test has no MX, only an A record (127.0.0.3, host B), which is not a local domain of B:
    # B refuses the relay with 550 5.7.1, which proves A connected to the implicit MX.
    net.submit(["user@nomx.test"], "implicit")
    (report,) = wait_for_messages(net.a, ALICE, 1)
    assert "5.7.1" in report.as_string()
    assert "nomx.test" in net.a.log_text()


def test_a_message_deferred_while_the_peer_is_down_is_listed_and_then_delivered_on_retry(net_factory):
    net = net_factory(b_running=False)
    net.submit([BOB], "later")
    wait_until(lambda: "delivery deferred" in net.a.log_text() or "all hosts for b.test failed" in net.a.log_text(),
               timeout=20, message="no deferral logged")
    listing = net.queue("list")
    assert listing.returncode == 0, listing.stderr
    assert "<bob@b.test>  deferred" in listing.stdout, listing.stdout
    assert "from <alice@a.test>" in listing.stdout
    net.b.start()
    (msg,) = wait_for_messages(net.b, BOB, 1)
    assert msg["Subject"] == "later"
    wait_until(lambda: "is empty" in net.queue("list").stdout, timeout=10, message="queue not emptied")


def test_a_message_that_stays_undeliverable_expires_into_a_4_4_7_bounce(net_factory):
    net = net_factory(b_running=False, outbound={"max_queue_secs": 2})
    net.submit([BOB], "too late")
    (report,) = wait_for_messages(net.a, ALICE, 1, timeout=30)
    text = report.as_string()
    assert "Status: 4.4.7" in text and "could not be delivered in time" in text, text


def test_queue_flush_and_remove_work_against_the_running_server(net_factory):
    net = net_factory(b_running=False, outbound={"retry_intervals_secs": [3600]})
    net.submit([BOB], "to remove")
    wait_until(lambda: "deferred" in net.queue("list").stdout, timeout=20, message="not deferred")
    (queue_id,) = re.findall(r"^(\S+)  queued", net.queue("list").stdout, re.M)
    flushed = net.queue("flush")
    assert flushed.returncode == 0 and "1 messages" in flushed.stdout, flushed
    missing = net.queue("remove", "no-such-id")
    assert missing.returncode != 0 and "no queued message" in missing.stderr, missing
    wait_until(lambda: net.queue("remove", queue_id).returncode == 0, timeout=20,
               message="remove kept failing")
    assert "is empty" in net.queue("list").stdout
    time.sleep(1)
    assert net.a.stored_messages(ALICE) == [], "a removed message is not bounced"


def test_verified_tls_policy_defers_rather_than_deliver_to_an_unverifiable_peer(net_factory):
    # Without the trust file, B's certificate cannot be verified.
    net = net_factory(outbound={"tls": "verified", "tls_trust_file": None, "retry_intervals_secs": [3600]})
    net.submit([BOB], "must be verified")
    wait_until(lambda: "TLS handshake with mx2.b.test" in net.a.log_text(), timeout=20,
               message=net.a.log_tail())
    assert net.b.stored_messages(BOB) == []
    assert "deferred" in net.queue("list").stdout


def test_kill_9_during_delivery_then_restart_delivers_every_queued_message_at_least_once(net_factory):
    net = net_factory()
    n = 30
    for i in range(n):
        net.submit([BOB], f"burst {i}")
    os.kill(net.a.proc.pid, signal.SIGKILL)
    net.a.proc.wait(timeout=10)
    before = len(net.b.stored_messages(BOB))
    net.a.start()
    wait_until(lambda: len({m["Subject"] for m in messages_in(net.b, BOB)}) == n, timeout=60,
               message=f"not all {n} arrived\n{net.a.log_tail()}")
    subjects = [m["Subject"] for m in messages_in(net.b, BOB)]
    print(f"kill during delivery: {n} queued, {before} delivered before the kill, "
          f"{len(subjects)} stored after the restart, {len(subjects) - n} duplicates")
    wait_until(lambda: "is empty" in net.queue("list").stdout, timeout=20, message="queue not emptied")


def test_with_outbound_disabled_remote_recipients_are_refused_at_rcpt(net_factory):
    net = net_factory(outbound={"enable": False})
    ctx = ssl.create_default_context(cafile=str(net.ca))
    with smtplib.SMTP("127.0.0.1", net.a.ports["submission"], local_hostname="c", timeout=30) as s:
        s.starttls(context=ctx)
        s.login(ALICE, PASSWORDS[ALICE])
        s.mail(ALICE)
        code, text = s.rcpt(BOB)
    assert code == 550 and b"5.7.1" in text
