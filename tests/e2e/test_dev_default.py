"""`rustmail serve` without --config: dev defaults on 127.0.0.1:2525 / :1110 with a demo account."""

from __future__ import annotations

import poplib
import signal
import smtplib
import subprocess

import pytest

from e2e_helpers import (
    NET_TIMEOUT,
    SENDER,
    STOP_TIMEOUT,
    child_env,
    make_message,
    parse_demo_password,
    port_accepts,
    port_is_free,
    split_prepended_headers,
    pop3_message_bytes,
    wait_until,
)

DEV_SMTP = 2525
DEV_POP3 = 1110
DEMO = "demo@localhost"


def complete_lines(path) -> str:
    text = path.read_text(errors="replace")
    return text[: text.rfind("\n") + 1]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("demo account demo@localhost password: Xy7-abc_123\n", "Xy7-abc_123"),
        ("INFO created demo@localhost\npassword: s3cr3t\n", "s3cr3t"),
        ("Demo account: demo@localhost (password 'Abc123')\n", "Abc123"),
        ("user demo@localhost, password is hunter2.\n", "hunter2."),
        (
            "rustmail development mode (no --config): SMTP 127.0.0.1:2525\n  demo account: demo@localhost\n"
            "  password: 3AceaAqmg5ydpb3f   (shown only this once; its hash is in rustmail-data/demo-password.hash)\n",
            "3AceaAqmg5ydpb3f",
        ),
        ("state in rustmail-data/demo-password.hash\n", None),
        ("listening\n", None),
    ],
)
def test_parse_demo_password_is_tolerant(text, expected):
    assert parse_demo_password(text) == expected


def test_dev_default_serve_demo_account_send_and_fetch(rustmail_bin, tmp_path):
    busy = [p for p in (DEV_SMTP, DEV_POP3) if not port_is_free(p)]
    if busy:
        pytest.skip(f"dev default ports busy on 127.0.0.1: {busy}; cannot test `serve` without --config")

    stdout_path = tmp_path / "stdout.txt"
    stderr_path = tmp_path / "stderr.log"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [str(rustmail_bin), "serve"],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=child_env(),
        )

    def logs() -> str:
        return (
            f"--- stdout ---\n{stdout_path.read_text(errors='replace')}\n"
            f"--- stderr ---\n{stderr_path.read_text(errors='replace')[-6000:]}"
        )

    def alive_and(cond):
        def check():
            if proc.poll() is not None:
                raise AssertionError(f"`rustmail serve` exited with {proc.returncode}\n{logs()}")
            return cond()
        return check

    try:
        try:
            wait_until(
                alive_and(lambda: port_accepts(DEV_SMTP) and port_accepts(DEV_POP3)),
                timeout=30,
                message=lambda: f"dev default server not listening on {DEV_SMTP}/{DEV_POP3}\n{logs()}",
            )
            password = wait_until(
                alive_and(lambda: parse_demo_password(complete_lines(stdout_path))),
                timeout=10,
                message=lambda: f"no demo password found on stdout\n{logs()}",
            )
        except AssertionError as exc:
            if proc.poll() is not None:
                pytest.fail(f"`rustmail serve` exited with {proc.returncode}\n{logs()}", pytrace=False)
            raise exc

        assert "demo@localhost" in stdout_path.read_text(errors="replace"), logs()

        subject, msg = make_message(DEMO)
        with smtplib.SMTP("127.0.0.1", DEV_SMTP, local_hostname="client.test", timeout=NET_TIMEOUT) as s:
            assert s.sendmail(SENDER, [DEMO], msg) == {}
        assert (tmp_path / "rustmail-data").is_dir(), "storage ./rustmail-data not created in the cwd"

        p = poplib.POP3("127.0.0.1", DEV_POP3, timeout=NET_TIMEOUT)
        try:
            p.user(DEMO)
            p.pass_(password)
            count, _ = p.stat()
            assert count == 1
            _, lines, _ = p.retr(1)
            _, rest = split_prepended_headers(lines)
            assert pop3_message_bytes(rest) == msg
        finally:
            p.quit()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
                pytest.fail(f"dev server did not stop within {STOP_TIMEOUT}s of SIGTERM\n{logs()}")
    assert proc.returncode == 0, f"dev server exited with {proc.returncode} after SIGTERM\n{logs()}"
