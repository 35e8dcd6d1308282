"""Admission and resource limits against floods: silent TLS connections, file-descriptor exhaustion,
connection caps. Each test names the attack it guards against."""

from __future__ import annotations

import os
import socket
import threading
import time

from test_tls_submission import TLS_LISTENERS, make_cert
from conftest import ALICE
from e2e_helpers import connect_from, greeted, served_sessions, wait_until



def greeting(s: socket.socket) -> bytes:
    return s.makefile("rb").readline()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tls_flood_server(server_factory, tmp_path, handshake_timeout: int):
    cert, key = make_cert(tmp_path, "flood")
    srv = server_factory(tls={"certificate": cert, "key": key}, extra_listeners=TLS_LISTENERS,
                         limits={"tls_handshake_timeout_secs": handshake_timeout})
    srv.start()
    return srv


def silent_tls_connections(srv, sources) -> list[socket.socket]:
    """One silent connection per source, alternately to 465 and 995: handshakes that never start."""
    return [connect_from(source, srv.ports["submissions"] if i % 2 else srv.ports["pop3s"])
            for i, source in enumerate(sources)]


def test_silent_tls_flood_from_one_address_does_not_lock_out_others(server_factory, tmp_path):
    # Before: the implicit-TLS handshake ran before admission, with the 300 s command timeout, so
    # ~1,000 silent connections to 465/995 from one address made every listener answer 421 (and
    # past 1,024 fds, accept() failed on every listener).
    srv = tls_flood_server(server_factory, tmp_path, 3)
    flood = []
    try:
        flood = silent_tls_connections(srv, ["127.0.0.1"] * 1000)
        # Another address is greeted at once on port 25 and on POP3, while the flood is open.
        other = connect_from("127.0.0.2", srv.smtp_port)
        assert greeting(other).startswith(b"220 "), "SMTP still greets other clients"
        other.close()
        pop = connect_from("127.0.0.3", srv.pop3_port)
        assert greeting(pop).startswith(b"+OK"), "POP3 still greets other clients"
        pop.close()
        # The flood holds at most max_connections + the refusal allowance sockets (256 + 32).
        fds = open_fds(srv.proc.pid)
        print(f"1,000 silent TLS connections: port 25 and POP3 greet another address; server fds {fds}, "
              f"RSS {rss_kib(srv.proc.pid)} KiB")
        assert fds < 256 + 32 + 40, f"{fds} fds open"
        # The flooding address itself is over its per-address limit: refused, not served.
        same = connect_from("127.0.0.1", srv.smtp_port)
        answer = greeting(same)
        assert answer == b"" or answer.startswith(b"421 4."), answer
        same.close()
        # Handshakes time out after 3 s: the flooding address is served again afterwards.
        time.sleep(4)
        for s in flood:
            s.close()
        flood.clear()

        wait_until(lambda: greeted("127.0.0.1", srv.smtp_port), timeout=10,
                   message="the flooding address to be served again")
    finally:
        for s in flood:
            s.close()
    assert "TLS handshake timed out" in srv.log_text()


def test_silent_tls_flood_from_many_addresses_leaves_port_25_greeting(server_factory, tmp_path):
    # Before: every implicit-TLS connection in its handshake took a served slot, so 1,000 silent
    # connections to 465/995 from 200 addresses (5 each, within max_connections_per_ip) held all 256
    # slots for the whole handshake timeout, and port 25 answered everyone else 421.
    srv = tls_flood_server(server_factory, tmp_path, 5)
    flood = []
    try:
        flood = silent_tls_connections(srv, [f"127.4.{i // 5 // 250}.{1 + (i // 5) % 250}" for i in range(1000)])
        time.sleep(0.5)
        greetings = []
        for n in range(20):
            other = connect_from(f"127.5.0.{1 + n}", srv.smtp_port)
            greetings.append(greeting(other))
            other.close()
        pop = connect_from("127.5.1.1", srv.pop3_port)
        pop_greeting = greeting(pop)
        pop.close()
        fds = open_fds(srv.proc.pid)
        print(f"1,000 silent TLS connections from 200 addresses: {sum(g.startswith(b'220 ') for g in greetings)} "
              f"of 20 new port-25 clients greeted; server fds {fds}")
        assert all(g.startswith(b"220 ") for g in greetings), greetings
        assert pop_greeting.startswith(b"+OK"), pop_greeting
        # A quarter of max_connections may be in a handshake, plus the refusal allowance.
        assert fds < 256 // 4 + 32 + 40, f"{fds} fds open"
    finally:
        for s in flood:
            s.close()
    assert "TLS handshakes under way at their cap" in srv.log_text()


def test_fd_exhaustion_backs_off_and_recovers_without_spinning(server_factory):
    # Under a hard limit of 128 open files, 300 connections from many addresses exhaust the fds
    # (the server warns at start that the limit is below what max_connections may need). accept()
    # then fails with EMFILE: the server must back off (not spin), keep its listeners, and serve
    # again as soon as fds are free.
    srv = server_factory(limits={"max_connections_per_ip": 5})
    srv.wrapper = ["prlimit", "--nofile=128:128", "--"]
    srv.start()
    assert "open-files limit is below" in srv.log_text()
    held = []
    try:
        for i in range(300):
            try:
                held.append(connect_from(f"127.0.{1 + i // 5}.{2 + i % 5}", srv.smtp_port, timeout=2))
            except OSError:
                break
        time.sleep(0.5)
        before = cpu_seconds(srv.proc.pid)
        time.sleep(2)
        spent = cpu_seconds(srv.proc.pid) - before
        print(f"out of fds with {len(held)} connections held: {spent:.2f} s of CPU in 2 s")
        # Backing off 100 ms per failed accept costs next to nothing; a spin would use a whole core.
        assert spent < 1.0, f"{spent:.2f} s of CPU in 2 s while out of fds"
        wait_until(lambda: "accept failed, backing off" in srv.log_text(), timeout=5,
                   message="accept to hit the fd limit")
    finally:
        for s in held:
            s.close()

    wait_until(lambda: greeted("127.0.0.1", srv.smtp_port), timeout=10,
               message="service after the fds were freed")
    assert srv.running


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_two_thousand_idle_connections_are_capped_memory_bounded_and_timed_out(server_factory):
    # 2,000 silent clients from 400 addresses: exactly max_connections are served, the rest are
    # refused (a bounded number) or closed at once; the server's memory stays bounded; the idle ones
    # are timed out, after which a fresh client is served.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    srv = server_factory(limits={"command_timeout_secs": 4, "max_connections_per_ip": 5})
    srv.start()
    rss_before = rss_kib(srv.proc.pid)
    conns = []
    try:
        for i in range(2000):
            conns.append(connect_from(f"127.1.{i // 5 // 250}.{1 + (i // 5) % 250}", srv.smtp_port))
        answers = {"220": 0, "421": 0, "closed": 0}
        for c in conns:
            c.settimeout(3)
            try:
                line = c.makefile("rb").readline()
            except OSError:
                line = b""
            answers["220" if line.startswith(b"220") else "421" if line.startswith(b"421") else "closed"] += 1
        rss_during = rss_kib(srv.proc.pid)
        print(f"2,000 idle connections: {answers}; server RSS {rss_before} KiB before, {rss_during} KiB with them open")
        assert answers["220"] == 256, answers
        assert answers["421"] <= 32, answers
        assert rss_during < rss_before + 64 * 1024, f"RSS grew from {rss_before} to {rss_during} KiB"
        # The served ones are idle: the command timeout (4 s, then at most 2 s of closing) ends them,
        # and the server takes new clients.
        time.sleep(4)
        wait_until(lambda: greeted("127.0.0.9", srv.smtp_port), timeout=8,
                   message="a fresh client served after the idle timeout")
    finally:
        for c in conns:
            c.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def drip(sock: socket.socket, preamble: bytes, expect: bytes, payload: bytes, gap: float, result: dict) -> None:
    """On a greeted connection, sends `preamble` (reading replies until `expect`), then one octet of
    `payload` (cycled) every `gap` seconds until the server answers or closes. Records how long the drip
    was held and the answer."""
    f = sock.makefile("rb")
    try:
        if preamble:
            sock.sendall(preamble)
            while expect not in (line := f.readline()):
                if not line:
                    raise AssertionError(f"closed before {expect!r}")
        started = time.monotonic()
        sock.settimeout(gap)
        i = 0
        while True:
            try:
                sock.sendall(payload[i % len(payload):i % len(payload) + 1])
            except OSError:
                result["answer"] = "reset"
                break
            i += 1
            try:
                answer = sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                answer = b""
            result["answer"] = answer.decode(errors="replace").strip() or "closed"
            break
        result["held"] = time.monotonic() - started
        result["octets"] = i
    except Exception as e:  # noqa: BLE001 - recorded and asserted on by the test
        result["answer"] = f"error: {e!r}"
    finally:
        sock.close()


def test_slow_drip_clients_cannot_hold_slots_past_the_per_request_deadlines(server_factory):
    # Before per-request deadlines, every octet restarted the timeout, so one octet a second held a slot
    # for the whole session limit (an hour): max_connections drippers shut the server for everyone.
    # Here 100 drippers fill every slot: 60 dripping an SMTP command, 20 dripping a message after DATA's
    # 354, 20 dripping a POP3 command, each one octet every 0.25 s. The command and POP3 deadlines are
    # 3 s; the DATA deadline is 3 s plus what min_data_rate allows for the octets received (a few here).
    srv = server_factory(limits={"max_connections": 100, "max_connections_per_ip": 5,
                                 "command_timeout_secs": 3, "data_timeout_secs": 3,
                                 "pop3_idle_timeout_secs": 3})
    srv.start()
    kinds = (["smtp-command"] * 60) + (["smtp-data"] * 20) + (["pop3-command"] * 20)
    targets = [(f"127.3.{i // 5}.{1 + i % 5}", srv.pop3_port if kind == "pop3-command" else srv.smtp_port)
               for i, kind in enumerate(kinds)]
    # All 100 greeted before the drip starts (the start-up probe may hold a slot for a moment).
    socks = wait_until(lambda: served_sessions(targets), timeout=10, message="100 drippers to be greeted")
    results: list[dict] = []
    threads = []
    for sock, kind in zip(socks, kinds):
        if kind == "pop3-command":
            args = (b"", b"", f"USER {ALICE}".encode(), 0.25)
        elif kind == "smtp-data":
            args = (f"EHLO drip.example\r\nMAIL FROM:<d@drip.example>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n".encode(),
                    b"354 ", b"Subject: drip\r\n\r\nslow\r\n", 0.25)
        else:
            args = (b"", b"", b"EHLO drip.example", 0.25)
        result = {"kind": kind}
        results.append(result)
        threads.append(threading.Thread(target=drip, args=(sock, *args, result), daemon=True))
    for t in threads:
        t.start()
    time.sleep(1)
    # Every slot is held: a new client is refused with 421 (or closed), not queued behind them.
    refused = connect_from("127.0.0.9", srv.smtp_port)
    answer = greeting(refused)
    refused.close()
    assert answer == b"" or answer.startswith(b"421 4."), answer
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a dripper was still held after 30 s"
    # All were cut by the deadline of the request they were dripping, with its reply.
    by_answer: dict[str, int] = {}
    for r in results:
        key = f"{r['kind']}: {r['answer'][:40]}"
        by_answer[key] = by_answer.get(key, 0) + 1
    longest = max(r.get("held", 0) for r in results)
    print(f"100 drippers: {by_answer}; longest held {longest:.1f} s of drip")
    for r in results:
        if r["kind"] == "pop3-command":
            assert r["answer"].startswith("-ERR [SYS/TEMP] idle timeout"), r
        else:
            assert r["answer"].startswith("421 4.4.2"), r
        # The deadline is 3 s (plus, for DATA, a few octets / 500 per s); the session limit is an hour.
        assert r["held"] < 10, r
    # Nothing of the dripped messages was stored, and a fresh client is served at once.
    assert srv.stored_messages(ALICE) == []
    assert greeted("127.0.0.9", srv.smtp_port)
