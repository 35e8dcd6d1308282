# Proves: mail goes from one rustmail to another as on the Internet. alice submits on 587 of the sender
# (a.test) to bob@b.test; the sender looks up the MX of b.test on a real DNS server (dnsmasq on the
# client node), delivers over STARTTLS with the receiver's certificate verified, DKIM-signed with a key
# made by `rustmail dkim-keygen` and published in that DNS; bob fetches it over POP3 from the receiver and
# an independent verifier (dkimpy) checks the signature; `rustmail` itself is on the PATH. A message to an unknown user of b.test comes back
# to alice as a bounce in her POP3 mailbox; one to a domain whose MX refuses connections waits in the
# queue, shown deferred by `rustmail queue list` and dropped by `rustmail queue remove`, both against the
# running service.
#
# Nodes and addresses (the NixOS test driver numbers the nodes in the order of their names; the nspawn
# twin gives the same addresses): client 192.168.1.1 (DNS, mail clients), receiver 192.168.1.2 (b.test),
# sender 192.168.1.3 (a.test).
import re

CLIENT, RECEIVER, SENDER = "192.168.1.1", "192.168.1.2", "192.168.1.3"
alice = "--user alice@a.test --password alice-password"
bob = "--user bob@b.test --password bob-password"
config = "--config /etc/rustmail/rustmail.toml"
# The test CA (the nspawn twin's client reads it from the containers).
ca = globals().get("CA_FILE", "/etc/rustmail-test/ca.pem")
submit = f"mailclient --host {SENDER} --cafile {ca} send --port 587 --starttls --login alice@a.test:alice-password"

start_all()
for node in (sender, receiver):
    node.wait_for_unit("rustmail-smtp.socket")
    node.wait_for_unit("rustmail-pop3.socket")
sender.wait_for_unit("rustmail-submission.socket")

with subtest("a DKIM key for a.test, published in the DNS with the MX records"):
    # rustmail starts on its first connection, or as here when asked; rustmail dkim-keygen made the key
    # just before (sender.nix).
    sender.succeed("systemctl start rustmail.service")
    record = sender.succeed("cat /var/lib/rustmail-test/dkim.txt")
    assert record.startswith("vmtest._domainkey.a.test. IN TXT ("), record
    strings = ",".join(f'"{s}"' for s in re.findall(r'"([^"]*)"', record))
    zone = "\n".join([
        "no-resolv", "no-hosts", "local=/test/", f"listen-address={CLIENT}", "bind-interfaces",
        "mx-host=a.test,mx.a.test,10", f"host-record=mx.a.test,{SENDER}",
        "mx-host=b.test,mx.b.test,10", f"host-record=mx.b.test,{RECEIVER}",
        # Nothing listens on port 25 of the client: connections are refused, delivery deferred.
        "mx-host=down.test,mx.down.test,10", f"host-record=mx.down.test,{CLIENT}",
        f"txt-record=vmtest._domainkey.a.test,{strings}",
    ])
    client.succeed(f"cat > /tmp/rustmail-dns.conf <<'EOF'\n{zone}\nEOF",
                   "dnsmasq --conf-file=/tmp/rustmail-dns.conf --pid-file=/tmp/rustmail-dns.pid")

with subtest("submitted on 587, delivered over verified TLS, DKIM-signed"):
    client.succeed(f"{submit} --sender alice@a.test --to bob@b.test --subject 'across the network' --body 'Hello Bob'")
    client.wait_until_succeeds(f"mailclient --host {RECEIVER} fetch {bob} > /tmp/bob.eml && "
                               "grep -q 'across the network' /tmp/bob.eml", timeout=120)
    got = client.succeed("cat /tmp/bob.eml")
    assert "Hello Bob" in got and "DKIM-Signature:" in got, got
    assert re.search(r"Received: from mx\.a\.test .*\n?.*with ESMTPS", got), got
    verified = client.succeed(f"mailclient dkim-verify --dns {CLIENT} /tmp/bob.eml")
    assert "dkim pass d=a.test s=vmtest" in verified, verified
    journal = sender.succeed("journalctl -u rustmail.service --no-pager")
    assert re.search(r"delivery delivered: \S+ to <bob@b\.test> via mx\.b\.test \(tls verified\)", journal), journal

with subtest("an unknown user of b.test: a bounce in alice's mailbox"):
    client.succeed(f"{submit} --sender alice@a.test --to nobody@b.test --subject 'to nobody'")
    client.wait_until_succeeds(f"mailclient --host {SENDER} fetch {alice} > /tmp/alice.eml && "
                               "grep -q 'Action: failed' /tmp/alice.eml", timeout=120)
    report = client.succeed("cat /tmp/alice.eml")
    assert "multipart/report" in report and "Final-Recipient: rfc822; nobody@b.test" in report, report
    assert "Status: 5.1.1" in report and "Subject: to nobody" in report, report

with subtest("a deferred message in rustmail queue list, removed with rustmail queue remove"):
    client.succeed(f"{submit} --sender alice@a.test --to carol@down.test --subject 'to a host that is down'")
    sender.wait_until_succeeds(f"rustmail queue list {config} > /tmp/queue.txt && grep -q 'deferred, ' /tmp/queue.txt",
                               timeout=60)
    full = sender.succeed(f"rustmail queue list {config}")
    assert "<carol@down.test>" in full and "mx.down.test" in full, full
    queue_id = full.split()[0]
    sender.succeed(f"rustmail queue remove {queue_id} {config}")
    sender.wait_until_succeeds(f"rustmail queue list {config} > /tmp/queue.txt && grep -q 'is empty' /tmp/queue.txt",
                               timeout=30)
