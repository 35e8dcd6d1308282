"""Command line: check-config, hash-password, serve with a bad --config."""

from __future__ import annotations

import subprocess

import pytest

from conftest import ALICE, ALICE_ALIAS, BOB
from e2e_helpers import child_env, free_port, render_config


def run(binary, *args, input_bytes=None, timeout=30):
    proc = subprocess.run(
        [str(binary), *args],
        input=input_bytes,
        stdin=None if input_bytes is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=timeout,
        check=False,
        env=child_env(),
    )
    return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


@pytest.fixture
def good_config(tmp_path, password_hashes):
    def build(**overrides):
        kwargs = dict(
            storage_root=tmp_path / "state",
            smtp_listen=[f"127.0.0.1:{free_port()}"],
            pop3_listen=[f"127.0.0.1:{free_port()}"],
            accounts={
                ALICE: {"password_hash": password_hashes[ALICE], "aliases": [ALICE_ALIAS]},
                BOB: {"password_hash": password_hashes[BOB]},
            },
            limits={"max_message_size": 1048576, "max_recipients": 100, "shutdown_timeout_secs": 5},
            auth={"allow_unencrypted_remote": False, "failure_delay_ms": 50},
        )
        kwargs.update(overrides)
        return render_config(**kwargs)

    return build


def write(tmp_path, text, name="rustmail.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_check_config_accepts_valid_config(rustmail_bin, tmp_path, good_config):
    path = write(tmp_path, good_config())
    code, out, err = run(rustmail_bin, "check-config", "--config", str(path))
    assert code == 0, f"check-config rejected a valid config (exit {code})\nstdout:\n{out}\nstderr:\n{err}"


def test_check_config_accepts_minimal_config_without_optional_tables(rustmail_bin, tmp_path, good_config):
    path = write(tmp_path, good_config(limits=None, auth=None))
    code, out, err = run(rustmail_bin, "check-config", "--config", str(path))
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"


def _with_unknown_key(text: str, table: str | None, key: str) -> str:
    if table is None:
        return f"{key} = 1\n" + text
    header = f"[{table}]\n"
    assert header in text, (table, text)
    return text.replace(header, header + f"{key} = 1\n", 1)


@pytest.mark.parametrize(
    "table,key",
    [
        (None, "bogus_top_key"),
        ("listen", "imap"),
        ("limits", "max_recipient"),
        ("auth", "failure_delay"),
        (f'accounts."{ALICE}"', "pasword_hash"),
    ],
)
def test_check_config_rejects_unknown_key_and_names_it(rustmail_bin, tmp_path, good_config, table, key):
    path = write(tmp_path, _with_unknown_key(good_config(), table, key))
    code, out, err = run(rustmail_bin, "check-config", "--config", str(path))
    # README: "exit 1 with the key at fault" (a panic would exit 101).
    assert code == 1, f"check-config exited {code} for unknown key {key!r} in [{table}]\nstdout:\n{out}\nstderr:\n{err}"
    assert key in err, f"check-config's error does not name the key {key!r}\nstdout:\n{out}\nstderr:\n{err}"


def test_check_config_rejects_missing_file(rustmail_bin, tmp_path):
    missing = tmp_path / "missing.toml"
    code, out, err = run(rustmail_bin, "check-config", "--config", str(missing))
    assert code == 1, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert str(missing) in err, f"the error does not name the missing file\nstderr:\n{err}"


def test_serve_with_nonexistent_config_exits_nonzero(rustmail_bin, tmp_path):
    code, out, err = run(rustmail_bin, "serve", "--config", "/nonexistent/rustmail.toml", timeout=30)
    assert code == 1, f"serve with a missing config exited {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "/nonexistent/rustmail.toml" in err, f"the error does not name the missing file\nstderr:\n{err}"


def test_serve_with_invalid_config_exits_nonzero_naming_key(rustmail_bin, tmp_path, good_config):
    path = write(tmp_path, _with_unknown_key(good_config(), None, "bogus_top_key"))
    code, out, err = run(rustmail_bin, "serve", "--config", str(path), timeout=30)
    assert code == 1, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "bogus_top_key" in err, err


def test_hash_password_prints_argon2id_phc_with_fresh_salt(rustmail_bin):
    code1, out1, err1 = run(rustmail_bin, "hash-password", input_bytes=b"same password\n")
    code2, out2, _ = run(rustmail_bin, "hash-password", input_bytes=b"same password\n")
    assert code1 == 0 and code2 == 0, err1
    h1, h2 = out1.strip(), out2.strip()
    assert h1.startswith("$argon2id$") and h2.startswith("$argon2id$"), (out1, out2)
    assert len(h1.splitlines()) == 1, f"stdout should hold only the hash: {out1!r}"
    assert h1 != h2, "two hashes of the same password are identical: no random salt"

