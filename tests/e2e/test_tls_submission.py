"""TLS and authenticated submission with real clients: smtplib STARTTLS/SMTP_SSL, poplib STLS/POP3_SSL,
openssl s_client, swaks; injection across the TLS boundary; sending rights; certificate reload."""

from __future__ import annotations

import base64
import email.utils
import poplib
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import ALICE, ALICE_ALIAS, BOB, PASSWORDS
from e2e_helpers import (HOSTNAME, child_env, free_port, make_message, match_trace_headers, port_accepts,
                         wait_until)

TLS_LISTENERS = ("submission", "submissions", "pop3s")


def make_cert(directory: Path, name: str, days: int = 30) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and mx.example.test, made by openssl for this test."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:mx.example.test",
         "-days", str(days), "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key


@pytest.fixture
def certs(tmp_path):
    return make_cert(tmp_path, "first")


@pytest.fixture
def tls_server(server_factory, certs):
    cert, key = certs
    srv = server_factory(tls={"certificate": cert, "key": key}, extra_listeners=TLS_LISTENERS,
                         auth={"allow_plaintext_loopback": False})
    srv.start()
    return srv


def context(cert: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cert))
    return ctx


def stored_text(server, address) -> str:
    (path,) = server.stored_messages(address)
    return path.read_text()


def test_submission_starttls_login_and_send_adds_message_id_and_date(tls_server, certs):
    header = [f"From: {ALICE}", f"To: {BOB}", "Subject: submitted"]
    msg = ("\r\n".join(header) + "\r\n\r\nhello bob\r\n").encode()
    with smtplib.SMTP("127.0.0.1", tls_server.ports["submission"], local_hostname="client.test",
                      timeout=10) as s:
        s.ehlo()
        assert s.has_extn("starttls") and not s.has_extn("auth"), "no AUTH offered before TLS"
        s.starttls(context=context(certs[0]))
        s.ehlo()
        assert "PLAIN" in s.esmtp_features["auth"] and not s.has_extn("starttls")
        s.login(ALICE, PASSWORDS[ALICE])
        assert s.sendmail(ALICE, [BOB], msg) == {}
    (path,) = tls_server.stored_messages(BOB)
    stored = path.read_bytes()
    trace, rest = match_trace_headers(stored, sender=ALICE, rcpt=BOB, protocol="ESMTPSA", eol=b"\n")
    # What was sent follows the trace headers unchanged, but for the two fields RFC 6409 §8.3 has the
    # server add at the end of the header: a Message-ID made of the queue id, and the date.
    head, blank, body = rest.decode().partition("\n\n")
    assert blank and body == "hello bob\n", rest
    fields = head.split("\n")
    assert fields[:3] == header and len(fields) == 5, fields
    assert fields[3] == f"Message-ID: <{trace['id']}@{HOSTNAME}>", fields
    assert fields[4].startswith("Date: "), fields
    date = email.utils.parsedate_to_datetime(fields[4].removeprefix("Date: "))
    assert abs(datetime.now(timezone.utc) - date) < timedelta(hours=1), (fields[4], "not the time of submission")


def test_implicit_tls_submission_on_465(tls_server, certs):
    with smtplib.SMTP_SSL("127.0.0.1", tls_server.ports["submissions"], context=context(certs[0]), timeout=10) as s:
        s.login(ALICE, PASSWORDS[ALICE])
        msg = f"From: Al <{ALICE_ALIAS}>\r\nTo: {BOB}\r\nSubject: alias\r\n\r\nhi\r\n".encode()
        assert s.sendmail(ALICE_ALIAS, [BOB], msg) == {}, "an alias is the account's own address"
    assert len(tls_server.stored_messages(BOB)) == 1


def test_auth_refused_without_tls_and_mail_needs_auth(tls_server):
    with smtplib.SMTP("127.0.0.1", tls_server.ports["submission"], timeout=10) as s:
        s.ehlo()
        code, text = s.docmd("AUTH", "PLAIN AGFsaWNlAHB3")
        assert code == 538, text
        code, text = s.docmd("MAIL", f"FROM:<{ALICE}>")
        assert code == 530, text


def test_sending_as_someone_else_is_refused_and_remote_recipients_are_taken_for_delivery(tls_server, certs):
    with smtplib.SMTP_SSL("127.0.0.1", tls_server.ports["submissions"], context=context(certs[0]), timeout=10) as s:
        s.login(ALICE, PASSWORDS[ALICE])
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            s.sendmail(BOB, [BOB], b"Subject: forged\r\n\r\nx\r\n")
        assert e.value.smtp_code == 553
        s.rset()
        # Outbound delivery (tests/e2e/test_outbound.py) takes recipients at other domains.
        assert s.mail(ALICE)[0] == 250
        assert s.rcpt("friend@remote.test")[0] == 250
        s.rset()


def test_wrong_password_is_535(tls_server, certs):
    with smtplib.SMTP_SSL("127.0.0.1", tls_server.ports["submissions"], context=context(certs[0]), timeout=10) as s:
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login(ALICE, "Guessed-Pa55word")
        assert e.value.smtp_code == 535


def b64(data: str) -> str:
    return base64.b64encode(data.encode()).decode()


def plain(user: str, password: str, authzid: str = "") -> str:
    """An AUTH PLAIN response (RFC 4616): authzid NUL authcid NUL password, in base64."""
    return b64(f"{authzid}\0{user}\0{password}")


def secret_forms(user: str, password: str) -> dict[str, str]:
    """Every form in which a password crosses the wire, and the one a careless log line would show."""
    return {
        "clear": password,
        "PLAIN blob, base64": plain(user, password),
        "PLAIN blob with authzid, base64": plain(user, password, authzid=user),
        "LOGIN password, base64": b64(password),
        "its bytes as Rust's Debug prints them": ", ".join(str(b) for b in password.encode()),
    }


def test_auth_data_never_reaches_the_log_even_at_trace_level(server_factory, certs):
    # README: "AUTH data never reaches the log", "Passwords are never logged". Every way a password is
    # sent (SMTP AUTH PLAIN with and without initial response, with an authzid, AUTH LOGIN with and
    # without initial response, POP3 PASS and AUTH PLAIN), right and wrong, at the most verbose level.
    cert, key = certs
    srv = server_factory(tls={"certificate": cert, "key": key}, extra_listeners=TLS_LISTENERS,
                         auth={"allow_plaintext_loopback": False}, rust_log="trace")
    srv.start()
    right = PASSWORDS[ALICE]
    wrong = ["Wrong-Pl41n-initial", "Wrong-L0gin-challenge", "Wrong-P0p-plain"]

    def smtp_exchange(*steps: tuple[str, int]) -> None:
        with smtplib.SMTP_SSL("127.0.0.1", srv.ports["submissions"], context=context(cert), timeout=30) as s:
            s.ehlo("client.test")
            for line, expected in steps:
                s.putcmd(line)
                code, text = s.getreply()
                assert code == expected, (line, code, text)

    smtp_exchange((f"AUTH PLAIN {plain(ALICE, wrong[0])}", 535))
    smtp_exchange(("AUTH PLAIN", 334), (plain(ALICE, right, authzid=ALICE), 235))
    smtp_exchange(("AUTH LOGIN", 334), (b64(ALICE), 334), (b64(wrong[1]), 535))
    smtp_exchange((f"AUTH LOGIN {b64(ALICE)}", 334), (b64(right), 235))

    p = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], context=context(cert), timeout=30)
    p.user(ALICE)
    p.pass_(right)
    p.quit()
    p = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], context=context(cert), timeout=30)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        p._shortcmd(f"AUTH PLAIN {plain(ALICE, wrong[2])}")
    p.close()
    p = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], context=context(cert), timeout=30)
    assert p._shortcmd("AUTH PLAIN").startswith(b"+")
    assert p._shortcmd(plain(ALICE, right)).startswith(b"+OK")
    p.quit()

    srv.stop_ok()
    log = srv.log_text()
    # The level really was trace: a log with only info lines would prove nothing here.
    assert " TRACE " in log and " DEBUG " in log, srv.log_tail()
    assert "login" in log.lower() and ALICE in log, "the logins were logged (without their secrets)"
    leaks = [f"{form} of {password!r}" for password in [right, *wrong]
             for form, secret in secret_forms(ALICE, password).items() if secret in log]
    assert not leaks, f"AUTH data in the log: {leaks}\n{srv.log_tail()}"


def test_plaintext_sent_after_starttls_is_never_executed(tls_server, certs):
    raw = socket.create_connection(("127.0.0.1", tls_server.ports["submission"]), timeout=10)
    f = raw.makefile("rb")
    f.readline()
    raw.sendall(b"EHLO c.test\r\n")
    while f.readline()[3:4] == b"-":
        pass
    raw.sendall(b"STARTTLS\r\nRSET\r\n")  # one packet: RSET must not run, before or after the handshake
    assert f.readline().startswith(b"220 2.0.0")
    tls = context(certs[0]).wrap_socket(raw, server_hostname="127.0.0.1")
    g = tls.makefile("rb")
    tls.sendall(b"NOOP\r\n")
    assert g.readline() == b"250 2.0.0 OK\r\n", "the first reply over TLS answers NOOP, not the injected RSET"
    tls.close()
    assert "discarding plaintext sent after STARTTLS" in tls_server.log_text()


def test_pop3_stls_and_pop3s(tls_server, certs):
    _, msg = make_message(ALICE)
    tls_server.send([ALICE], msg)
    p = poplib.POP3("127.0.0.1", tls_server.pop3_port, timeout=10)
    assert "STLS" in p.capa() and "USER" not in p.capa()
    with pytest.raises(poplib.error_proto, match=r"not allowed"):
        p.user(ALICE)
    p.stls(context=context(certs[0]))
    assert "USER" in p.capa() and "STLS" not in p.capa()
    p.user(ALICE)
    p.pass_(PASSWORDS[ALICE])
    assert p.stat()[0] == 1
    p.quit()
    q = poplib.POP3_SSL("127.0.0.1", tls_server.ports["pop3s"], context=context(certs[0]), timeout=10)
    q.user(ALICE)
    q.pass_(PASSWORDS[ALICE])
    assert q.stat()[0] == 1
    q.quit()


def test_pop3_plaintext_after_stls_is_discarded(tls_server, certs):
    raw = socket.create_connection(("127.0.0.1", tls_server.pop3_port), timeout=10)
    f = raw.makefile("rb")
    f.readline()
    raw.sendall(f"STLS\r\nUSER {ALICE}\r\n".encode())
    assert f.readline().startswith(b"+OK")
    tls = context(certs[0]).wrap_socket(raw, server_hostname="127.0.0.1")
    g = tls.makefile("rb")
    tls.sendall(f"PASS {PASSWORDS[ALICE]}\r\n".encode())
    assert g.readline() == b"-ERR USER first\r\n", "the USER sent in clear was not kept"
    tls.close()


# A client that would accept TLS 1.0 and 1.1: OpenSSL 3 at its default security level refuses them on
# its own, so a check with it would pass against a server that offers them.
OLD_TLS_CLIENT = ["-cipher", "DEFAULT:@SECLEVEL=0"]
OLD_VERSIONS = (("-tls1_1", "TLSv1.1"), ("-tls1", "TLSv1"))


def openssl_client(port: int, *options: str) -> str:
    out = subprocess.run(
        ["openssl", "s_client", "-brief", "-connect", f"127.0.0.1:{port}", *options],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    return out.stdout + out.stderr


def test_the_old_tls_client_speaks_tls10_and_tls11_to_a_server_that_allows_them(tmp_path):
    # The control for the refusals below: against `openssl s_server` offering only that version, the
    # very client they use completes a TLS 1.1 (1.0) handshake.
    cert, key = make_cert(tmp_path, "old")
    for option, version in OLD_VERSIONS:
        port = free_port()
        log = tmp_path / f"s_server{option}.log"
        with open(log, "wb") as server_out:
            # s_server ends when its stdin does: a pipe keeps it open until the process is killed.
            server = subprocess.Popen(
                ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(cert), "-key", str(key),
                 option, *OLD_TLS_CLIENT],
                stdin=subprocess.PIPE, stdout=server_out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: port_accepts(port), timeout=10, message="openssl s_server to listen")
            out = openssl_client(port, option, *OLD_TLS_CLIENT)
        finally:
            server.kill()
            server.wait(timeout=10)
        assert f"Protocol version: {version}\n" in out, out + log.read_text(errors="replace")


# openssl prints an alert it received as "... alert <description> ... SSL alert number <n>"; one it
# sends itself (a client that refuses by itself) is not reported so. rustls refuses a TLS 1.0/1.1
# ClientHello with handshake_failure (40; it lacks the signature_algorithms extension TLS 1.2 needs)
# or protocol_version (70).
SERVER_REFUSED = re.compile(r"alert (handshake failure|protocol version):.*SSL alert number (40|70)\b")


@pytest.mark.parametrize("starttls,port_name", [("smtp", "submission"), ("pop3", None), (None, "submissions"),
                                                (None, "pop3s")])
def test_openssl_offers_tls12_and_tls13_only(tls_server, starttls, port_name):
    port = tls_server.ports[port_name] if port_name else tls_server.pop3_port
    options = ["-starttls", starttls] if starttls else []
    for version, expect in (("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")):
        out = openssl_client(port, *options, version)
        assert f"Protocol version: {expect}\n" in out, out
    for option, _ in OLD_VERSIONS:
        refusals = tls_server.log_text().count("TLS handshake failed")
        out = openssl_client(port, *options, option, *OLD_TLS_CLIENT)
        assert "Protocol version" not in out and SERVER_REFUSED.search(out), out
        wait_until(lambda: tls_server.log_text().count("TLS handshake failed") > refusals, timeout=10,
                   message="the server to log the refused handshake")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_tls_auth(tls_server):
    done = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{tls_server.ports['submission']}", "--tls", "--auth", "PLAIN",
         "--auth-user", ALICE, "--auth-password", PASSWORDS[ALICE], "--from", ALICE, "--to", BOB,
         "--helo", "client.test", "--header", "Subject: via swaks tls"],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Subject: via swaks tls" in stored_text(tls_server, BOB)


def test_certificate_swap_on_sighup(tls_server, certs, tmp_path):
    def served_cert() -> bytes:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", tls_server.ports["submissions"]), timeout=10) as raw:
            with ctx.wrap_socket(raw) as tls:
                return tls.getpeercert(binary_form=True)

    first = served_cert()
    held = smtplib.SMTP_SSL("127.0.0.1", tls_server.ports["submissions"], context=context(certs[0]), timeout=10)
    new_cert, new_key = make_cert(tmp_path, "second")
    accounts = {ALICE: tls_server.account(ALICE, aliases=[ALICE_ALIAS]), BOB: tls_server.account(BOB)}
    tls_server.tls = {"certificate": new_cert, "key": new_key}
    tls_server.reload(accounts)
    wait_until(lambda: served_cert() != first, timeout=10, message="the new certificate to be served")
    assert held.noop()[0] == 250, "an existing session keeps its connection"
    held.quit()
    # A broken certificate leaves the current one in force.
    current = served_cert()
    _, wrong_key = make_cert(tmp_path, "third")
    tls_server.tls = {"certificate": new_cert, "key": wrong_key}
    tls_server.reload(accounts)
    wait_until(lambda: "tls.key" in tls_server.log_text(), timeout=10, message="the reload to be refused")
    assert served_cert() == current


def test_check_config_verifies_the_pair_and_warns_about_expiry(server_factory, tmp_path, rustmail_bin):
    cert, key = make_cert(tmp_path, "soon", days=5)
    _, other_key = make_cert(tmp_path, "other")
    srv = server_factory(tls={"certificate": cert, "key": key})

    def check_config() -> subprocess.CompletedProcess:
        # child_env: the runner's RUSTMAIL_BIN would be refused as an unknown configuration key.
        return subprocess.run([str(rustmail_bin), "check-config", "--config", str(srv.config_path)],
                              capture_output=True, text=True, env=child_env())

    out = check_config()
    assert out.returncode == 0 and "expires in" in out.stderr, out.stderr
    srv.tls = {"certificate": cert, "key": other_key}
    srv.write_config({ALICE: srv.account(ALICE)})
    out = check_config()
    assert out.returncode == 1 and "tls.key" in out.stderr, (out.returncode, out.stderr)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_submits_over_starttls_and_fetches_over_pop3s(tls_server, certs, tmp_path):
    cert = str(certs[0])
    body = tmp_path / "msg.eml"
    body.write_bytes(f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: via curl tls\r\n\r\nhello\r\n".encode())
    subprocess.run(
        ["curl", "--silent", "--show-error", "--ssl-reqd", "--cacert", cert,
         f"smtp://127.0.0.1:{tls_server.ports['submission']}/client.test",
         "--user", f"{ALICE}:{PASSWORDS[ALICE]}", "--mail-from", ALICE, "--mail-rcpt", BOB,
         "--upload-file", str(body)],
        check=True, capture_output=True, timeout=30)
    out = subprocess.run(
        ["curl", "--silent", "--show-error", "--cacert", cert,
         f"pop3s://127.0.0.1:{tls_server.ports['pop3s']}/1", "--user", f"{BOB}:{PASSWORDS[BOB]}"],
        check=True, capture_output=True, timeout=30).stdout
    assert b"Subject: via curl tls" in out and b"with ESMTPSA" in out


def test_forged_from_header_is_refused_after_data(tls_server, certs):
    with smtplib.SMTP_SSL("127.0.0.1", tls_server.ports["submissions"], context=context(certs[0]), timeout=10) as s:
        s.login(ALICE, PASSWORDS[ALICE])
        forged = f"From: The Boss <{BOB}>\r\nTo: {BOB}\r\nSubject: forged\r\n\r\npay now\r\n".encode()
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail(ALICE, [BOB], forged)
        assert e.value.smtp_code == 553 and b"From:" in e.value.smtp_error
        honest = f"From: \"Alice, Tagged\" <{ALICE.replace('@', '+news@')}>\r\nSubject: ok\r\n\r\nhi\r\n".encode()
        assert s.sendmail(ALICE, [BOB], honest) == {}
    assert [m.read_text().count("Subject: ok") for m in tls_server.stored_messages(BOB)] == [1]
