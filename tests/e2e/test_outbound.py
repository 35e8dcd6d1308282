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
import tempfile
import time
from pathlib import Path

import dkim
import dns.resolver
import pytest

from e2e_helpers import (RustmailServer, free_port, hash_password, make_ca_and_cert, port_accepts, toml_str,
                         wait_until)

# CI (REQUIRE_SYSTEM_TESTS=1) installs dnsmasq and must not skip.
pytestmark = pytest.mark.skipif(
    (shutil.which("dnsmasq") is None or shutil.which("smtp-sink") is None)
    and os.environ.get("REQUIRE_SYSTEM_TESTS") != "1",
    reason="dnsmasq and Postfix's smtp-sink are needed (apt-get install dnsmasq-base postfix)")

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
                 b_running: bool = True, b_auth: dict | None = None, mta_sts: str | None = None,
                 b_untrusted: bool = False) -> None:
        self.tmp = tmp
        self.binary = binary
        self.ca, self.cert, self.key = make_ca_and_cert(
            tmp, ["127.0.0.1", "127.0.0.3", "mx.a.test", "mx1.b.test", "mx2.b.test", "nomx.test", "mta-sts.b.test"])
        self.dkim_key = tmp / "a.test.rm1.dkim.pem"
        keygen = subprocess.run([str(binary), "dkim-keygen", "a.test", "--selector", SELECTOR,
                                 "--out", str(self.dkim_key)], capture_output=True, text=True, check=True)
        self.dkim_record = keygen.stdout.strip()
        strings = re.findall(r'"([^"]*)"', self.dkim_record)
        assert strings and strings[0].startswith("v=DKIM1; k=rsa; p="), self.dkim_record
        self.dkim_txt = "".join(strings)
        # b.test's MTA-STS policy, when the test gives one, served over HTTPS on mta-sts.b.test.
        self.policy_server = PolicyServer(self.cert, self.key, mta_sts) if mta_sts else None
        sts = ["--host-record=mta-sts.b.test,127.0.0.5", "--txt-record=_mta-sts.b.test,v=STSv1; id=20261202;"]
        self.dns = Dnsmasq(tmp, (sts if mta_sts else []) + [
            "--mx-host=b.test,mx1.b.test,10", "--mx-host=b.test,mx2.b.test,20",
            "--host-record=mx1.b.test,127.0.0.2", "--host-record=mx2.b.test,127.0.0.3",
            "--mx-host=nullmx.test,.,0", "--host-record=nomx.test,127.0.0.3",
            # c.test: Postfix's smtp-sink on 127.0.0.4, a foreign peer (see SmtpSink).
            "--mx-host=c.test,mx.c.test,10", "--host-record=mx.c.test,127.0.0.4",
            "--txt-record=" + ",".join([f"{SELECTOR}._domainkey.a.test", *strings]),
        ])
        tls = {"certificate": self.cert, "key": self.key}
        b_tls = tls
        if b_untrusted:
            other = self.mkdir("untrusted-ca")
            _, other_cert, other_key = make_ca_and_cert(other, ["mx2.b.test", "127.0.0.3"])
            b_tls = {"certificate": other_cert, "key": other_key}
        self.b = RustmailServer(binary=binary, workdir=self.mkdir("b"), passwords=PASSWORDS, hashes=hashes,
                                accounts={BOB: {"password_hash": hashes[BOB]}}, tls=b_tls, host="127.0.0.3",
                                domains=["b.test"], hostname="mx2.b.test", extra_listeners=("submission",),
                                auth=b_auth)
        settings = {
            "dns_servers": [f"127.0.0.1:{self.dns.port}"],
            "port": self.b.smtp_port,
            "tls_trust_file": str(self.ca),
            "retry_intervals_secs": [1],
            "connect_timeout_secs": 5,
            "mta_sts_port": self.policy_server.port if self.policy_server else 443,
            "command_timeout_secs": 20,
            **(outbound or {}),
        }
        if settings.get("smarthost", {}).get("port") == 0:
            # The relay is host B's submission listener.
            settings["smarthost"] = {**settings["smarthost"], "port": self.b.ports["submission"]}
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

    def submit(self, to: list[str], subject: str, body: str = "Hello from a.test.\r\n",
               mail_options: list[str] = (), rcpt_options: list[str] = ()) -> None:
        message = (f"From: Alice <{ALICE}>\r\nTo: {', '.join(to)}\r\nSubject: {subject}\r\n"
                   f"Message-ID: <{subject.replace(' ', '-')}@a.test>\r\n\r\n{body}").encode()
        if not message.isascii():
            message = message.replace(b"\r\n\r\n", b"\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                                      b"Content-Transfer-Encoding: 8bit\r\n\r\n", 1)
        ctx = ssl.create_default_context(cafile=str(self.ca))
        with smtplib.SMTP("127.0.0.1", self.a.ports["submission"], local_hostname="client.a.test",
                          timeout=30) as s:
            s.starttls(context=ctx)
            s.login(ALICE, PASSWORDS[ALICE])
            options = (["BODY=8BITMIME"] if not message.isascii() else []) + list(mail_options)
            refused = s.sendmail(ALICE, to, message, mail_options=options, rcpt_options=list(rcpt_options))
            assert refused == {}, refused

    def queue(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.binary), "queue", *args, "--config", str(self.a.config_path)],
                              capture_output=True, text=True, timeout=30)

    def close(self) -> None:
        for srv in (self.a, self.b):
            if srv.running:
                srv.stop()
        self.dns.stop()
        if self.policy_server:
            self.policy_server.stop()


class PolicyServer:
    """An HTTPS server on 127.0.0.5 (mta-sts.b.test) serving one MTA-STS policy; counts requests."""

    def __init__(self, cert: Path, key: Path, policy: str) -> None:
        import http.server
        import threading
        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                ok = self.path == "/.well-known/mta-sts.txt" and self.headers["Host"] == "mta-sts.b.test"
                body = policy.encode() if ok else b"not found"
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.5", self.port), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class SmtpSink:
    """Postfix's smtp-sink as a foreign receiving peer on 127.0.0.4 (mx.c.test), at the port A delivers
    to; it offers no STARTTLS. `options` e.g. ["-8"] (no 8BITMIME), ["-r", "RCPT"] (450 to RCPT)."""

    def __init__(self, workdir: Path, port: int, options: list[str]) -> None:
        # smtp-sink writes its dumps as nobody, who cannot enter pytest's private tmp_path.
        self.dir = Path(tempfile.mkdtemp(prefix="rustmail-smtp-sink-"))
        self.dir.chmod(0o777)
        self.log = workdir.with_suffix(".log")
        self.proc = subprocess.Popen(
            ["smtp-sink", "-u", "nobody", "-d", f"{self.dir}/%H%M%S.", *options, f"127.0.0.4:{port}", "64"],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        wait_until(lambda: port_accepts(port, "127.0.0.4"), timeout=10, message="smtp-sink did not start")

    def messages(self) -> list[str]:
        return [p.read_text(errors="replace") for p in sorted(self.dir.iterdir())]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


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
    # B stores the message a moment before A reads B's 250 and logs the attempt: wait for A's line.
    net.a.wait_for_log(r"delivery delivered: \S+ to <bob@b\.test> via mx2\.b\.test \(tls verified\)")
    log = net.a.log_text()
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
    # The two domains are separate jobs: one report, or one each, depending on which ends first.
    def reports_text() -> str:
        return "".join(r.as_string() for r in messages_in(net.a, ALICE))
    # Each report quotes the header, which names both recipients: wait for both status codes.
    wait_until(lambda: all(code in reports_text() for code in ("Status: 5.1.10", "Status: 5.1.2")),
               timeout=20, message=net.a.log_tail())
    text = reports_text()
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


def test_a_delayed_message_warns_its_sender_once_then_still_arrives(net_factory):
    net = net_factory(b_running=False, outbound={"delay_warning_secs": 2})
    net.submit([BOB], "slow")
    # NOTIFY=FAILURE leaves DELAY out: that sender is never warned.
    net.submit([BOB], "no warning wanted", rcpt_options=["NOTIFY=FAILURE"])
    (warning,) = wait_for_messages(net.a, ALICE, 1, timeout=30)
    text = warning.as_string()
    assert warning["Subject"] == "Delayed Mail (still being retried)", text
    assert "Action: delayed" in text and "Status: 4." in text and "Will-Retry-Until: " in text, text
    assert "Final-Recipient: rfc822; bob@b.test" in text and "Subject: slow" in text, text
    assert "no warning wanted" not in text
    assert "sender warned" in net.queue("list").stdout
    # Retries every second go on; the warning is not repeated.
    time.sleep(4)
    assert len(net.a.stored_messages(ALICE)) == 1
    net.b.start()
    got = wait_for_messages(net.b, BOB, 2, timeout=30)
    assert sorted(m["Subject"] for m in got) == ["no warning wanted", "slow"]
    assert len(net.a.stored_messages(ALICE)) == 1, "no failure report after the warning"


def test_queue_flush_and_remove_work_against_the_running_server(net_factory):
    net = net_factory(b_running=False, outbound={"retry_intervals_secs": [3600]})
    net.submit([BOB], "to remove")
    wait_until(lambda: "deferred" in net.queue("list").stdout, timeout=20, message="not deferred")
    (queue_id,) = re.findall(r"^(\S+)  queued", net.queue("list").stdout, re.M)
    missing = net.queue("remove", "no-such-id")
    assert missing.returncode != 0 and "no queued message" in missing.stderr, missing
    wait_until(lambda: net.queue("remove", queue_id).returncode == 0, timeout=20,
               message="remove kept failing")
    assert "is empty" in net.queue("list").stdout
    # A second message, deferred for an hour: flush sends it at once when B is back.
    net.submit([BOB], "flushed")
    wait_until(lambda: "deferred" in net.queue("list").stdout, timeout=20, message="not deferred")
    net.b.start()
    flushed = net.queue("flush")
    assert flushed.returncode == 0 and "1 messages" in flushed.stdout, flushed
    (msg,) = wait_for_messages(net.b, BOB, 1, timeout=20)
    assert msg["Subject"] == "flushed", "the removed message never left"
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
    # smtp-sink waits a second before answering each DATA: the kill lands while deliveries run.
    sink = SmtpSink(net.tmp / "sink", net.b.smtp_port, ["-w", "1"])
    n = 30
    try:
        for i in range(n):
            net.submit(["carol@c.test"], f"burst {i}")
        os.kill(net.a.proc.pid, signal.SIGKILL)
        net.a.proc.wait(timeout=10)
        before = len(sink.messages())
        assert before < n, "the kill came after every delivery: it tested nothing"
        net.a.start()
        wait_until(lambda: len({subject_of_dump(d) for d in sink.messages()}) == n, timeout=90,
                   message=f"not all {n} arrived\n{net.a.log_tail()}")
        wait_until(lambda: "is empty" in net.queue("list").stdout, timeout=30, message="queue not emptied")
        subjects = [subject_of_dump(d) for d in sink.messages()]
    finally:
        sink.stop()
    print(f"kill during delivery: {n} queued, {before} delivered before the kill, "
          f"{len(subjects)} delivered in all, {len(subjects) - n} duplicates")


def subject_of_dump(dump: str) -> str | None:
    m = re.search(r"^Subject: (.*)$", dump, re.M)
    return m and m.group(1)


def test_with_outbound_disabled_remote_recipients_are_refused_at_rcpt(net_factory):
    net = net_factory(outbound={"enable": False})
    ctx = ssl.create_default_context(cafile=str(net.ca))
    with smtplib.SMTP("127.0.0.1", net.a.ports["submission"], local_hostname="c", timeout=30) as s:
        s.starttls(context=ctx)
        s.login(ALICE, PASSWORDS[ALICE])
        s.mail(ALICE)
        code, text = s.rcpt(BOB)
    assert code == 550 and b"5.7.1" in text


def test_a_postfix_peer_without_starttls_gets_plain_text_when_opportunistic_and_dots_survive(net_factory):
    net = net_factory()
    sink = SmtpSink(net.tmp / "sink", net.b.smtp_port, [])
    try:
        net.submit(["carol@c.test"], "to postfix", body=".leading dot\r\n..two\r\nend\r\n")
        wait_until(lambda: sink.messages(), timeout=20, message=net.a.log_tail())
        (dump,) = sink.messages()
    finally:
        sink.stop()
    assert "X-Rcpt-Args: <carol@c.test>" in dump and "Subject: to postfix" in dump, dump
    assert "\n.leading dot\n..two\nend\n" in dump, "dot-stuffing undone by the peer gives the original"
    assert "Return-Path" not in dump, "our own Return-Path is not sent on"
    assert "X-Mail-Args: <alice@a.test>\n" in dump, "no SIZE= to a peer that did not offer SIZE (RFC 1870)"
    net.a.wait_for_log(r"delivery delivered: \S+ to <carol@c\.test> via mx\.c\.test \(tls none\)")


def test_required_tls_defers_rather_than_send_in_plain_text(net_factory):
    net = net_factory(outbound={"tls_domains": {"c.test": "required"}, "retry_intervals_secs": [3600]})
    sink = SmtpSink(net.tmp / "sink", net.b.smtp_port, [])
    try:
        net.submit(["carol@c.test"], "secret")
        wait_until(lambda: "does not offer STARTTLS, and TLS is required" in net.a.log_text(), timeout=20,
                   message=net.a.log_tail())
        assert sink.messages() == []
    finally:
        sink.stop()
    assert "deferred" in net.queue("list").stdout


def test_8bit_mail_to_a_peer_without_8bitmime_arrives_as_quoted_printable_signed_after_conversion(net_factory):
    net = net_factory()
    sink = SmtpSink(net.tmp / "sink", net.b.smtp_port, ["-8"])
    try:
        net.submit(["carol@c.test"], "eight bit", body="Grüße aus a.test\r\n.dot at the start\r\n")
        wait_until(lambda: sink.messages(), timeout=20, message=net.a.log_tail())
        # An 8-bit header cannot be converted (that would need SMTPUTF8): it bounces with 5.6.3.
        net.submit(["carol@c.test"], "Grüße im Betreff")
        (report,) = wait_for_messages(net.a, ALICE, 1)
        dumps = sink.messages()
    finally:
        sink.stop()
    assert "Status: 5.6.3" in report.as_string() and "cannot be converted to 7 bit" in report.as_string()
    assert len(dumps) == 1, dumps
    dump = dumps[0]
    assert all(ord(c) < 128 for c in dump), dump
    assert "Content-Transfer-Encoding: quoted-printable" in dump and "8bit" not in dump, dump
    # Read back by Python's email package: the same text; smtp-sink saw no BODY=8BITMIME.
    raw = dump[dump.index("From: Alice"):].encode()
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    # (smtp-sink ends its dump with one more newline.)
    assert msg.get_content().rstrip("\n") == "Grüße aus a.test\n.dot at the start", msg.get_content()
    assert "BODY=8BITMIME" not in dump
    # The DKIM signature covers the converted form (it was signed after the conversion).
    def dnsfunc(name, timeout=5):
        answer = net.dns.resolver().resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        return b"".join(b"".join(r.strings) for r in answer)
    signed = dump[dump.index("DKIM-Signature:"):].replace("\r\n", "\n").replace("\n", "\r\n").encode()
    assert dkim.verify(signed, dnsfunc=dnsfunc), signed.decode()


def test_a_peer_answering_4xx_gets_the_message_on_a_later_attempt(net_factory):
    net = net_factory()
    sink = SmtpSink(net.tmp / "sink", net.b.smtp_port, ["-r", "RCPT"])
    try:
        net.submit(["carol@c.test"], "greylisted")
        wait_until(lambda: "delivery deferred" in net.a.log_text() and "450 4.3.0" in net.a.log_text(),
                   timeout=20, message=net.a.log_tail())
        assert sink.messages() == []
    finally:
        sink.stop()
    sink = SmtpSink(net.tmp / "sink2", net.b.smtp_port, [])
    try:
        wait_until(lambda: sink.messages(), timeout=20, message=net.a.log_tail())
        (dump,) = sink.messages()
    finally:
        sink.stop()
    assert "Subject: greylisted" in dump
    assert net.a.stored_messages(ALICE) == [], "no bounce for a temporary failure"


def test_smarthost_with_auth_over_starttls_carries_everything(net_factory, tmp_path):
    secret = tmp_path / "relay-password"
    secret.write_text(PASSWORDS[BOB] + "\n")
    net = net_factory(b_auth={"restrict_senders": False}, outbound={
        # The MX of b.test would be 127.0.0.2/3 on port 25-like: the relay must take over.
        "smarthost": {"host": "127.0.0.3", "port": 0, "username": BOB, "password_file": str(secret)},
    })
    net.submit([BOB], "via the relay")
    (msg,) = wait_for_messages(net.b, BOB, 1)
    assert "with ESMTPSA" in msg.get_all("Received")[0], "B received it authenticated over TLS"
    assert "authenticated as bob@b.test" in net.b.log_text()
    net.a.wait_for_log(r"via 127\.0\.0\.3 \(tls verified\)")
    assert "mx1.b.test" not in net.a.log_text(), "the MX was not used"


def test_mta_sts_enforce_keeps_mail_from_mx_hosts_the_policy_does_not_list(net_factory):
    policy = "version: STSv1\r\nmode: enforce\r\nmx: mx9.b.test\r\nmax_age: 86400\r\n"
    net = net_factory(mta_sts=policy, outbound={"retry_intervals_secs": [3600]})
    net.submit([BOB], "sts refused")
    wait_until(lambda: "allows none of its MX hosts" in net.a.log_text(), timeout=20, message=net.a.log_tail())
    assert net.policy_server.requests == 1
    assert net.b.stored_messages(BOB) == [], "mx2.b.test is not in the policy: nothing delivered there"
    assert "deferred" in net.queue("list").stdout, "a policy failure is temporary (RFC 8461 5.1)"
    cached = list((net.a.state_dir / "mta-sts").glob("*.json"))
    assert [p.name for p in cached] == ["b.test.json"], cached


def test_mta_sts_enforce_delivers_to_a_listed_mx_over_verified_tls(net_factory):
    policy = "version: STSv1\r\nmode: enforce\r\nmx: *.b.test\r\nmax_age: 86400\r\n"
    net = net_factory(mta_sts=policy)
    net.submit([BOB], "sts ok")
    (msg,) = wait_for_messages(net.b, BOB, 1)
    net.a.wait_for_log(r"via mx2\.b\.test \(tls verified\)")
    assert "MTA-STS policy fetched" in net.a.log_text()


def test_mta_sts_enforce_refuses_an_unverifiable_certificate_that_opportunistic_tls_accepts(net_factory):
    # B's certificate comes from a CA A does not trust (the policy host's does): without the policy,
    # opportunistic TLS delivers it encrypted but unverified; the policy must not let that happen.
    policy = "version: STSv1\r\nmode: enforce\r\nmx: *.b.test\r\nmax_age: 86400\r\n"
    net = net_factory(mta_sts=policy, b_untrusted=True, outbound={"retry_intervals_secs": [3600]})
    net.submit([BOB], "sts unverifiable")
    wait_until(lambda: "TLS handshake with mx2.b.test" in net.a.log_text(), timeout=20, message=net.a.log_tail())
    assert net.b.stored_messages(BOB) == []
    assert "deferred" in net.queue("list").stdout


def test_without_a_policy_the_same_unverifiable_peer_gets_the_mail_encrypted(net_factory):
    net = net_factory(b_untrusted=True)
    net.submit([BOB], "opportunistic")
    wait_for_messages(net.b, BOB, 1)
    net.a.wait_for_log(r"via mx2\.b\.test \(tls unverified\)")


def test_dsn_parameters_go_on_to_a_peer_that_offers_dsn(net_factory):
    net = net_factory()
    sink = SmtpSink(net.tmp / "sink", net.b.smtp_port, [])
    try:
        net.submit(["carol@c.test"], "dsn on", mail_options=["RET=HDRS", "ENVID=QQ314159"],
                   rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;carol+40c.test"])
        wait_until(lambda: sink.messages(), timeout=20, message=net.a.log_tail())
        (dump,) = sink.messages()
    finally:
        sink.stop()
    assert "X-Mail-Args: <alice@a.test> RET=HDRS ENVID=QQ314159" in dump, dump
    assert "X-Rcpt-Args: <carol@c.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;carol+40c.test" in dump, dump
    time.sleep(1)
    assert net.a.stored_messages(ALICE) == [], "the peer offers DSN: notifications are its job now"


def test_notify_success_to_a_peer_without_dsn_gives_a_relayed_notice(net_factory):
    net = net_factory()
    sink = SmtpSink(net.tmp / "sink", net.b.smtp_port, ["-N"])
    try:
        net.submit(["carol@c.test"], "tell me", mail_options=["ENVID=E1"],
                   rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;carol+40c.test"])
        (notice,) = wait_for_messages(net.a, ALICE, 1)
    finally:
        sink.stop()
    text = notice.as_string()
    assert notice["Subject"] == "Delivery Status Notification (success)"
    assert "Action: relayed" in text and "Status: 2.0.0" in text, text
    assert "Original-Envelope-Id: E1" in text and "Original-Recipient: rfc822; carol@c.test" in text, text


def test_notify_never_suppresses_the_bounce_and_ret_full_returns_the_whole_message(net_factory):
    net = net_factory()
    net.submit(["nobody@b.test"], "quiet failure", rcpt_options=["NOTIFY=NEVER"])
    wait_until(lambda: "the sender asked for no report" in net.a.log_text(), timeout=20,
               message=net.a.log_tail())
    assert net.a.stored_messages(ALICE) == []
    net.submit(["nobody@b.test"], "loud failure", body="the whole body\r\n", mail_options=["RET=FULL"])
    (report,) = wait_for_messages(net.a, ALICE, 1)
    parts = [p.get_content_type() for p in report.walk()]
    assert "message/rfc822" in parts, parts
    assert "the whole body" in report.as_string()


def test_notify_success_for_a_local_recipient_gives_a_delivered_notice(net_factory):
    net = net_factory()
    net.submit([ALICE], "to myself", rcpt_options=["NOTIFY=SUCCESS"])
    messages = wait_for_messages(net.a, ALICE, 2)
    subjects = sorted(m["Subject"] for m in messages)
    assert subjects == ["Delivery Status Notification (success)", "to myself"], subjects
    notice = next(m for m in messages if m["Subject"].startswith("Delivery"))
    assert "Action: delivered" in notice.as_string()
