"""Fixtures for the rustmail end-to-end tests.

The binary comes from $RUSTMAIL_BIN (default: target/debug/rustmail under the
repo root). Each test that uses `server` gets its own temp dir, config, state
dir and free loopback ports; the server is stopped with SIGTERM at teardown and
must exit with code 0. On a test failure the server log is attached to the report.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from e2e_helpers import DOMAIN, RustmailServer, hash_password, wait_until  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[2]

ALICE = f"alice@{DOMAIN}"
ALICE_ALIAS = f"al@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
CAROL = f"carol@{DOMAIN}"

PASSWORDS = {
    ALICE: "alice-S3cret!",
    BOB: "bob-Secret-2",
    CAROL: "carol-Secret-3",
}

_servers_key = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def rustmail_bin() -> Path:
    raw = os.environ.get("RUSTMAIL_BIN", "target/debug/rustmail")
    path = Path(raw)
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"rustmail binary not found or not executable at {path} "
            f"(set RUSTMAIL_BIN or run `cargo build` first)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def password_hashes(rustmail_bin: Path) -> dict[str, str]:
    """argon2id hashes made by `rustmail hash-password`, once per session."""
    return {addr: hash_password(rustmail_bin, pw) for addr, pw in PASSWORDS.items()}


@pytest.fixture
def server_factory(request, tmp_path: Path, rustmail_bin: Path, password_hashes: dict[str, str]):
    """Create (not start) servers; every one still running at teardown gets SIGTERM
    and must exit with code 0."""
    servers: list[RustmailServer] = []
    request.node.stash[_servers_key] = servers

    def make(accounts: dict[str, dict] | None = None, **kwargs) -> RustmailServer:
        workdir = tmp_path / f"server{len(servers)}"
        workdir.mkdir()
        srv = RustmailServer(
            binary=rustmail_bin,
            workdir=workdir,
            passwords=PASSWORDS,
            hashes=password_hashes,
            accounts={},
            **kwargs,
        )
        if accounts is None:
            accounts = default_accounts(srv)
        srv.write_config(accounts)
        servers.append(srv)
        return srv

    yield make

    problems = []
    for srv in servers:
        if srv.proc is None or (srv.start_failed and not srv.running):
            continue
        was_running = srv.running
        try:
            code = srv.stop()
        except AssertionError as exc:
            problems.append(str(exc))
            continue
        if code != 0:
            how = "at teardown after SIGTERM" if was_running else "on its own during the test"
            problems.append(f"rustmail serve exited with code {code} {how}\n{srv.log_tail()}")
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


def default_accounts(srv: RustmailServer) -> dict[str, dict]:
    return {
        ALICE: srv.account(ALICE, aliases=[ALICE_ALIAS]),
        BOB: srv.account(BOB),
    }


@pytest.fixture
def server(server_factory) -> RustmailServer:
    """A running server with accounts alice (alias al@) and bob."""
    srv = server_factory()
    srv.start()
    return srv


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    # Under CI (.ci/run sets REQUIRE_SYSTEM_TESTS=1) a skipped test is a failure: a missing client or a
    # busy port must not turn a check into one that cannot fail. (An expected failure stays one.)
    if (os.environ.get("REQUIRE_SYSTEM_TESTS") == "1" and report.skipped
            and not hasattr(report, "wasxfail")):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under REQUIRE_SYSTEM_TESTS=1: {reason}"
    if report.failed:
        for i, srv in enumerate(item.stash.get(_servers_key, [])):
            report.sections.append((f"rustmail server log #{i} ({srv.log_path})", srv.log_text()))
    return report

