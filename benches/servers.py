"""The servers the benchmarks compare, each started as an equivalent local server on loopback: rustmail,
Postfix (SMTP into a Maildir), Dovecot (POP3 from Maildirs) and smtp-sink (the ceiling). Each has
`prepare()` (a fresh work directory and config), `start(prepare=True, wait=True)`, `pids()`, `cpu()` and
`stop()`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from benchlib import DOMAIN, children_of, cpu_seconds, free_port, retire, wait_file, wait_port

USER = f"user@{DOMAIN}"


class Rustmail:
    """rustmail as a benchmarked server: one config, the given accounts, SMTP and POP3 on loopback,
    connection limits raised to 1,100 like the peers'; everything else default."""

    name = "rustmail"

    def __init__(self, work: Path, binary: Path, users: list[str], password_hash: str,
                 max_message_size: int | None = None) -> None:
        self.work, self.binary, self.users, self.hash = work / "rustmail", binary, users, password_hash
        self.max_message_size = max_message_size
        self.proc = None
        self.log = None

    def maildir(self, user: str) -> Path:
        local, domain = user.split("@")
        return self.work / "state" / "mail" / domain / local

    def prepare(self) -> None:
        retire(self.work)
        self.work.mkdir(parents=True)
        self.port, self.pop3_port = free_port(), free_port()
        accounts = "".join(f'[accounts."{u}"]\npassword_hash = "{self.hash}"\n' for u in self.users)
        self.config = self.work / "rustmail.toml"
        self.config.write_text(f"""hostname = "mx.{DOMAIN}"
domains = ["{DOMAIN}"]
storage_root = "{self.work / 'state'}"
[listen]
smtp = ["127.0.0.1:{self.port}"]
pop3 = ["127.0.0.1:{self.pop3_port}"]
[limits]
max_connections = 1100
max_connections_per_ip = 1100
{f"max_message_size = {self.max_message_size}" if self.max_message_size else ""}
{accounts}""")

    @property
    def maildir_new(self) -> Path:
        return self.maildir(USER) / "new"

    def start(self, prepare: bool = True, wait: bool = True, env_extra: dict | None = None) -> None:
        if prepare:
            self.prepare()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUSTMAIL_")}
        env["RUST_LOG"] = "warn"
        env.update(env_extra or {})
        self.log = open(self.work / "server.log", "ab")
        self.proc = subprocess.Popen([str(self.binary), "serve", "--config", str(self.config)],
                                     stdout=self.log, stderr=self.log, env=env)
        if wait:
            wait_port(self.port)

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None
        if self.log:
            self.log.close()
            self.log = None


class Postfix:
    """A Postfix instance of its own: smtpd on one loopback port, virtual(8) delivering to a Maildir as
    nobody, no chroot, every other daemon as Debian ships it. Postfix fsyncs the queue file before its
    250, and virtual(8) fsyncs the Maildir file before it reports the delivery."""

    name = "postfix"

    def __init__(self, work: Path, max_message_size: int | None = None) -> None:
        self.work = work / "postfix"
        self.max_message_size = max_message_size

    def prepare(self) -> None:
        retire(self.work)
        etc = self.work / "etc"
        shutil.copytree("/etc/postfix", etc, symlinks=True)
        (etc / "main.cf").unlink(missing_ok=True)
        self.port = free_port()
        master = []
        for line in (etc / "master.cf").read_text().splitlines():
            fields = line.split()
            if line[:1] not in ("#", " ", "\t", "") and len(fields) >= 8:
                if fields[0] == "smtp" and fields[1] == "inet":
                    fields[0] = f"127.0.0.1:{self.port}"
                fields[4] = "n"  # no chroot: the queue is outside /var/spool/postfix
                line = "  ".join(fields)
            master.append(line)
        (etc / "master.cf").write_text("\n".join(master) + "\n")
        for d in ("spool", "data"):
            (self.work / d).mkdir()
        shutil.chown(self.work / "data", "postfix", "postfix")
        mail = self.work / "mail"
        mail.mkdir(parents=True)
        shutil.chown(mail, "nobody", "nogroup")
        os.chmod(self.work, 0o755)
        (etc / "main.cf").write_text(f"""compatibility_level = 3.6
myhostname = mx.{DOMAIN}
mydomain = {DOMAIN}
myorigin = {DOMAIN}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
queue_directory = {self.work / 'spool'}
data_directory = {self.work / 'data'}
maillog_file = {self.work / 'maillog'}
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {mail}
virtual_mailbox_maps = inline:{{ {USER}={DOMAIN}/user/ }}
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
virtual_minimum_uid = 1
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
default_process_limit = 1100
biff = no
""")
        if self.max_message_size:
            with open(etc / "main.cf", "a") as f:
                f.write(f"message_size_limit = {self.max_message_size}\n"
                        f"virtual_mailbox_limit = {2 * self.max_message_size}\n")
        # The machine's /etc/postfix stays as it is: this mount namespace sees ours there.
        subprocess.run(["mount", "--bind", str(etc), "/etc/postfix"], check=True)

    def start(self, prepare: bool = True, wait: bool = True) -> None:
        if prepare:
            self.prepare()
        started = subprocess.run(["postfix", "start"], capture_output=True, text=True)
        if started.returncode != 0:
            raise SystemExit(f"postfix start failed: {started.stdout}{started.stderr}")
        if wait:
            wait_port(self.port)

    @property
    def maildir_new(self) -> Path:
        return self.work / "mail" / DOMAIN / "user" / "new"

    def pids(self) -> list[int]:
        """The master and its children (each daemon's CPU, and the reaped ones' through the master)."""
        master = int((self.work / "spool" / "pid" / "master.pid").read_text().split()[0])
        return [master] + children_of(master)

    def cpu(self) -> float:
        pids = self.pids()
        return cpu_seconds(pids[:1], children=True) + cpu_seconds(pids[1:])

    def stop(self) -> None:
        subprocess.run(["postfix", "stop"], capture_output=True)
        subprocess.run(["umount", "/etc/postfix"], capture_output=True)


class Dovecot:
    """A Dovecot 2.3 instance of its own: POP3 only, on loopback, passwd-file users (uid nobody) with
    Maildirs under the work directory, `default_process_limit` and `default_client_limit` raised like
    rustmail's connection cap; everything else as Debian ships it (mail_fsync = optimized, one
    pop3-login process per connection)."""

    name = "dovecot"

    def __init__(self, work: Path, users: list[str], password_hash: str) -> None:
        self.home, self.users, self.hash = work / "dovecot", users, password_hash

    def maildir(self, user: str) -> Path:
        return self.home / "mail" / user / "Maildir"

    def prepare(self) -> None:
        retire(self.home)
        for sub in ("run", "state", "mail"):
            (self.home / sub).mkdir(parents=True)
        os.chmod(self.home, 0o755)
        self.pop3_port = free_port()
        self.conf = self.home / "dovecot.conf"
        (self.home / "passwd").write_text("".join(
            f"{u}:{self.hash}:65534:65534::{self.home / 'mail' / u}::userdb_mail=maildir:{self.maildir(u)}\n"
            for u in self.users))
        self.conf.write_text(f"""base_dir = {self.home}/run
state_dir = {self.home}/state
log_path = {self.home}/dovecot.log
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_login_user = dovenull
default_internal_user = dovecot
default_process_limit = 1100
default_client_limit = 2200
pop3_uidl_format = %f
passdb {{
  driver = passwd-file
  args = scheme=SHA512-CRYPT {self.home}/passwd
}}
userdb {{
  driver = passwd-file
  args = {self.home}/passwd
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.pop3_port}
  }}
}}
""")

    def start(self, prepare: bool = True, wait: bool = True) -> None:
        if prepare:
            self.prepare()
        subprocess.run(["chown", "-R", "nobody:nogroup", str(self.home / "mail")], check=True)
        subprocess.run(["dovecot", "-c", str(self.conf)], check=True)
        if wait:
            wait_port(self.pop3_port)
            wait_file(self.home / "run" / "master.pid")  # written after the listeners are open

    def pids(self) -> list[int]:
        master = int((self.home / "run" / "master.pid").read_text().split()[0])
        return [master] + children_of(master)

    def cpu(self) -> float:
        pids = self.pids()
        return cpu_seconds(pids[:1], children=True) + cpu_seconds(pids[1:])

    def stop(self) -> None:
        subprocess.run(["dovecot", "-c", str(self.conf), "stop"], capture_output=True)


class Sink:
    """smtp-sink: answers everything, stores nothing; the ceiling of what smtp-source can send."""

    name = "smtp-sink"
    maildir_new = None

    def __init__(self, work: Path) -> None:
        self.proc = None

    def prepare(self) -> None:
        self.port = free_port()

    def start(self, prepare: bool = True, wait: bool = True) -> None:
        if prepare:
            self.prepare()
        self.proc = subprocess.Popen(["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{self.port}", "256"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def cpu(self) -> float:
        return cpu_seconds([self.proc.pid])

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=10)
