"""DANE (RFC 7672) between two real rustmail servers, with a real DNSSEC-signing DNS server (Knot).

Knot serves a root zone it signs itself (ECDSA P-256, NSEC) on 127.0.0.1; host A (rustmail with
`outbound.dane = true`) trusts only that zone's key (`outbound.dnssec_trust_anchor`), and none of the
certificate authorities host B's certificate comes from: WebPKI can never verify B, so every
"tls dane" below is the TLSA records' doing. Each destination domain has its MX on B (127.0.0.3) or on
Postfix's smtp-sink (127.0.0.4, no STARTTLS), and TLSA records that pin B's key (DANE-EE), B's CA
(DANE-TA), nothing B has, or only a PKIX usage; one domain sits in an unsigned (insecure) zone and one
under a DS record whose zone is not signed (bogus).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rdatatype
import pytest

from e2e_helpers import RustmailServer, free_port, hash_password, make_ca_and_cert, wait_until
from test_outbound import SmtpSink, toml_value_any, wait_for_messages

KNOTD = shutil.which("knotd") or "/usr/sbin/knotd"
KEYMGR = shutil.which("keymgr") or "/usr/sbin/keymgr"
# CI (REQUIRE_SYSTEM_TESTS=1) installs knot and must not skip.
pytestmark = pytest.mark.skipif(
    (not os.access(KNOTD, os.X_OK) or shutil.which("smtp-sink") is None)
    and os.environ.get("REQUIRE_SYSTEM_TESTS") != "1",
    reason="Knot DNS and Postfix's smtp-sink are needed (apt-get install knot postfix)")

ALICE = "alice@a.test"
PASSWORD = "alice-d4ne!"
# The destination domains on host B, one per case.
B_DOMAINS = ["ee.test", "ta.test", "wrong.test", "unusable.test", "insecure.test", "bogus.test", "second.test",
             "notlsa.test", "implicit.test", "sub.insecure.test", "cname.test"]
ZEROS = "00" * 32


def der_digest(pem: Path, what: str) -> str:
    """SHA-256 (hex) of the certificate's DER form (`cert`) or of its public key's (`spki`)."""
    cert_der = subprocess.run(["openssl", "x509", "-in", str(pem), "-outform", "DER"], check=True,
                              capture_output=True).stdout
    if what == "cert":
        return hashlib.sha256(cert_der).hexdigest()
    pub = subprocess.run(["openssl", "x509", "-in", str(pem), "-pubkey", "-noout"], check=True,
                         capture_output=True).stdout
    spki = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub, check=True,
                          capture_output=True).stdout
    return hashlib.sha256(spki).hexdigest()


class Knot:
    """knotd on 127.0.0.1: the signed root zone, plus unsigned child zones."""

    def __init__(self, workdir: Path, root: str, children: dict[str, str]) -> None:
        self.dir = workdir
        self.port = free_port()
        (workdir / "db").mkdir()
        zones = [f"  - domain: .\n    file: {workdir}/root.zone\n    dnssec-signing: on\n    dnssec-policy: fast\n"]
        (workdir / "root.zone").write_text(root)
        for name, text in children.items():
            (workdir / f"{name}.zone").write_text(text)
            zones.append(f"  - domain: {name}\n    file: {workdir}/{name}.zone\n")
        self.conf = workdir / "knot.conf"
        self.conf.write_text(
            f"server:\n    listen: 127.0.0.1@{self.port}\n    rundir: {workdir}\n"
            f"database:\n    storage: {workdir}/db\n"
            "log:\n  - target: stderr\n    any: info\n"
            "policy:\n  - id: fast\n    algorithm: ecdsap256sha256\n    nsec3: off\n"
            "template:\n  - id: default\n    zonefile-sync: -1\n    journal-content: none\n"
            "zone:\n" + "".join(zones))
        self.log = workdir / "knotd.log"
        self.proc = subprocess.Popen([KNOTD, "-c", str(self.conf)], stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT)
        wait_until(lambda: self.signed(), timeout=20, message="knotd did not sign the root zone")
        # The root zone's KSK, as the DNSKEY line rustmail takes as its trust anchor.
        keys = subprocess.run([KEYMGR, "-c", str(self.conf), ".", "dnskey"], check=True,
                              capture_output=True, text=True).stdout.split("\n")
        ksk = [line.split(None, 1)[1] for line in keys if " DNSKEY 257 " in line]
        assert len(ksk) == 1, keys
        self.anchor = workdir / "anchor.dnskey"
        self.anchor.write_text(f". 3600 IN {ksk[0]}\n")

    def signed(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"knotd exited: {self.log.read_text()}")
        query = dns.message.make_query(".", dns.rdatatype.DNSKEY, want_dnssec=True)
        try:
            answer = dns.query.udp(query, "127.0.0.1", port=self.port, timeout=1)
        except Exception:
            return False
        return any(rrset.rdtype == dns.rdatatype.RRSIG for rrset in answer.answer)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class World:
    def __init__(self, tmp: Path, binary: Path) -> None:
        self.binary = binary
        hashes = {ALICE: hash_password(binary, PASSWORD)}
        passwords = {ALICE: PASSWORD}
        mk = lambda name: (tmp / name).mkdir() or tmp / name  # noqa: E731
        mx_names = [f"mx.{d}" for d in B_DOMAINS] + ["mx1.second.test", "mx2.second.test"]
        self.ca, cert, key = make_ca_and_cert(mk("pki"), mx_names)
        # B presents its CA after its certificate (the chain DANE-TA needs, RFC 7672 §3.1.2).
        chain = tmp / "pki" / "chain.crt"
        chain.write_text(cert.read_text() + self.ca.read_text())
        self.b = RustmailServer(binary=binary, workdir=mk("b"), passwords={}, hashes={},
                                accounts={f"bob@{d}": {"password_hash": hashes[ALICE]} for d in B_DOMAINS},
                                tls={"certificate": chain, "key": key}, host="127.0.0.3", domains=B_DOMAINS,
                                hostname="mx.ee.test")
        port = self.b.smtp_port
        ee = f"3 1 1 {der_digest(cert, 'spki')}"
        ta = f"2 0 1 {der_digest(self.ca, 'cert')}"
        records = {
            "ee.test": ("127.0.0.3", ee),
            "ta.test": ("127.0.0.3", ta),
            "wrong.test": ("127.0.0.3", f"3 1 1 {ZEROS}"),
            "unusable.test": ("127.0.0.3", f"1 1 1 {der_digest(cert, 'spki')}"),
            "plain.test": ("127.0.0.4", ee),
            "unusable-plain.test": ("127.0.0.4", f"1 1 1 {der_digest(cert, 'spki')}"),
        }
        root = ["$TTL 300", ". SOA ns.test. hostmaster.test. 1 3600 600 86400 300", ". NS ns.test.",
                "ns.test. A 127.0.0.1"]
        for domain, (ip, tlsa) in records.items():
            root += [f"{domain}. MX 10 mx.{domain}.", f"mx.{domain}. A {ip}",
                     f"_{port}._tcp.mx.{domain}. TLSA {tlsa}"]
        # second.test: the first MX's certificate matches nothing, the second's does.
        root += ["second.test. MX 10 mx1.second.test.", "second.test. MX 20 mx2.second.test.",
                 "mx1.second.test. A 127.0.0.3", "mx2.second.test. A 127.0.0.3",
                 f"_{port}._tcp.mx1.second.test. TLSA 3 1 1 {ZEROS}", f"_{port}._tcp.mx2.second.test. TLSA {ee}"]
        # notlsa.test: signed, its MX host has no TLSA records (a signed denial); implicit.test: no MX
        # (a signed denial), its own address and TLSA records.
        root += ["notlsa.test. MX 10 mx.notlsa.test.", "mx.notlsa.test. A 127.0.0.3",
                 "implicit.test. A 127.0.0.3", f"_{port}._tcp.implicit.test. TLSA {ee}",
                 # cname.test: a signed MX naming an alias in the unsigned zone, a CNAME to a signed host.
                 "cname.test. MX 10 alias.insecure.test."]
        # insecure.test: delegated without DS (unsigned: its TLSA records count for nothing);
        # bogus.test: delegated with a DS that no key of its (unsigned) zone matches.
        root += ["insecure.test. NS ns.test.", "bogus.test. NS ns.test.",
                 f"bogus.test. DS 4711 13 2 {'ab' * 32}"]
        child = lambda name: "\n".join([  # noqa: E731
            "$TTL 300", f"@ SOA ns.test. hostmaster.test. 1 3600 600 86400 300", "@ NS ns.test.",
            f"@ MX 10 mx.{name}.", "mx A 127.0.0.3", f"_{port}._tcp.mx TLSA 3 1 1 {ZEROS}",
            # An unsigned MX RRset naming a signed host whose TLSA records B does not match.
            "sub MX 10 mx.wrong.test.", "alias CNAME mx.ee.test.", ""])
        self.knot = Knot(mk("knot"), "\n".join(root) + "\n",
                         {"insecure.test": child("insecure.test"), "bogus.test": child("bogus.test")})
        self.b.start()
        self.sink = SmtpSink(tmp / "sink", port, [])
        settings = {
            "dns_servers": [f"127.0.0.1:{self.knot.port}"],
            "port": port,
            "dane": True,
            "dnssec_trust_anchor": str(self.knot.anchor),
            "mta_sts": False,
            "retry_intervals_secs": [1],
            "connect_timeout_secs": 5,
            "command_timeout_secs": 20,
        }
        extra = "\n[outbound]\n" + "".join(f"{k} = {toml_value_any(v)}\n" for k, v in settings.items())
        # A submits over its plain SMTP listener from 127.0.0.1 as an authenticated user.
        self.a = RustmailServer(binary=binary, workdir=mk("a"), passwords=passwords, hashes=hashes,
                                accounts={ALICE: {"password_hash": hashes[ALICE]}},
                                tls={"certificate": cert, "key": key}, extra_listeners=("submission",),
                                domains=["a.test"], hostname="mx.a.test", extra_toml=extra)
        self.a.start()

    def submit(self, to: str, subject: str) -> None:
        import smtplib
        import ssl
        message = (f"From: Alice <{ALICE}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
                   f"Message-ID: <{subject.replace(' ', '-')}@a.test>\r\n\r\nover DANE?\r\n").encode()
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.check_hostname = False
        with smtplib.SMTP("127.0.0.1", self.a.ports["submission"], local_hostname="client.a.test",
                          timeout=30) as s:
            s.starttls(context=ctx)
            s.login(ALICE, PASSWORD)
            assert s.sendmail(ALICE, [to], message) == {}

    def close(self) -> None:
        for srv in (self.a, self.b):
            if srv.running:
                srv.stop()
        self.sink.stop()
        self.knot.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory, rustmail_bin):
    w = World(tmp_path_factory.mktemp("dane"), rustmail_bin)
    yield w
    print("----- host A\n" + w.a.log_tail() + "\n----- host B\n" + w.b.log_tail() +
          "\n----- knotd\n" + w.knot.log.read_text()[-3000:])
    w.close()


def delivered(world: World, rcpt: str, mx: str, tls: str) -> None:
    """A message to `rcpt` reaches B, and A logs its delivery via `mx` (a pattern) with `tls`."""
    world.submit(rcpt, f"to {rcpt}")
    (msg,) = wait_for_messages(world.b, rcpt, 1)
    assert msg["Subject"] == f"to {rcpt}"
    world.a.wait_for_log(rf"delivery delivered: \S+ to <{rcpt}> via {mx} \(tls {tls}\)", timeout=30)


def deferred_line(world: World, rcpt: str) -> str:
    m = world.a.wait_for_log(rf"delivery deferred: \S+ to <{rcpt}> via \S+ \(tls none\): (.*)", timeout=30)
    return m.group(1)


def test_dane_ee_authenticates_a_certificate_no_certificate_authority_vouches_for(world):
    delivered(world, "bob@ee.test", r"mx\.ee\.test", "dane")


def test_dane_ta_authenticates_a_chain_from_the_pinned_authority(world):
    delivered(world, "bob@ta.test", r"mx\.ta\.test", "dane")


def test_a_certificate_the_tlsa_records_do_not_match_gets_no_mail_and_stays_queued(world):
    world.submit("bob@wrong.test", "dane mismatch")
    reason = deferred_line(world, "bob@wrong.test")
    assert "TLS handshake with mx.wrong.test (DANE: the certificate must match its TLSA records): " \
           "invalid peer certificate" in reason, reason
    # Attempts go on (every second) and keep failing: nothing reaches B, the message stays queued.
    time.sleep(2.5)
    assert world.b.stored_messages("bob@wrong.test") == []
    listing = subprocess.run([str(world.binary), "queue", "list", "--config", str(world.a.config_path)],
                             capture_output=True, text=True, timeout=30)
    assert "bob@wrong.test" in listing.stdout, listing.stdout + listing.stderr


def refused_in_plain_text(world: World, rcpt: str, because: str) -> None:
    """A message to `rcpt`, whose MX is the plain-text smtp-sink, is deferred `because`, never sent."""
    before = len(world.sink.messages())
    world.submit(rcpt, f"to {rcpt}")
    reason = deferred_line(world, rcpt)
    assert f"does not offer STARTTLS, and {because}" in reason, reason
    assert len(world.sink.messages()) == before


def test_a_host_with_tlsa_records_that_offers_no_starttls_gets_no_plain_text(world):
    refused_in_plain_text(world, "bob@plain.test", "its TLSA records (DANE) require TLS")


def test_the_next_mx_is_used_when_the_first_fails_its_dane_check(world):
    delivered(world, "bob@second.test", r"mx2\.second\.test", "dane")
    world.a.wait_for_log(r"cannot use this host, trying the next.*mx=mx1\.second\.test.*DANE: the certificate "
                         r"must match its TLSA records")


def test_signed_tlsa_records_none_usable_still_require_tls_without_authentication(world):
    delivered(world, "bob@unusable.test", r"mx\.unusable\.test", "unverified")
    refused_in_plain_text(world, "bob@unusable-plain.test", "TLS is required")


def test_tlsa_records_of_an_unsigned_zone_count_for_nothing(world):
    delivered(world, "bob@insecure.test", r"mx\.insecure\.test", "unverified")


def test_a_signed_host_named_by_an_unsigned_mx_record_is_not_held_to_its_tlsa_records(world):
    # RFC 7672 §2.2.1: the MX RRset must be secure too (else an attacker could have chosen the host).
    delivered(world, "bob@sub.insecure.test", r"mx\.wrong\.test", "unverified")


def test_an_unsigned_cname_makes_the_host_unsigned(world):
    # The alias's A answer is an unsigned CNAME followed by signed records: not secure, so the host
    # is treated as any unsigned one (had it counted as secure, its TLSA lookup would meet an
    # unsigned denial and the host would be skipped).
    delivered(world, "bob@cname.test", r"alias\.insecure\.test", "unverified")


def test_a_signed_host_without_tlsa_records_gets_mail_as_without_dane(world):
    delivered(world, "bob@notlsa.test", r"mx\.notlsa\.test", "unverified")


def test_the_implicit_mx_of_a_signed_domain_is_held_to_its_tlsa_records(world):
    delivered(world, "bob@implicit.test", r"implicit\.test", "dane")


def test_a_bogus_dnssec_answer_defers_rather_than_deliver(world):
    world.submit("bob@bogus.test", "dane bogus")
    reason = deferred_line(world, "bob@bogus.test")
    assert "DNSSEC" in reason or "dnssec" in reason, reason
    time.sleep(1.5)
    assert world.b.stored_messages("bob@bogus.test") == []
