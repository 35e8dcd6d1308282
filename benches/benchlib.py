"""What the benchmark scripts share: ports, process figures (CPU, PSS, peak RSS), the namespaces they run
in, the work directory and Debian packages. The servers themselves are in servers.py."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOMAIN = "bench.test"
# Not under /tmp: `postfix check` refuses a queue below a world-writable directory (silently: it says
# so only to syslog), and Dovecot's users must be able to walk down to their Maildirs.
WORK_PARENT = "/var/lib/rustmail-bench"
PASSWORD = "bench-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listens on 127.0.0.1:{port}")
            time.sleep(0.02)


def wait_file(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} did not appear")
        time.sleep(0.01)


def count_files(d: Path) -> int:
    try:
        return sum(1 for _ in os.scandir(d))
    except FileNotFoundError:
        return 0


def cpu_seconds(pids: list[int], children: bool = False) -> float:
    """User + system time of `pids` (with `children`: also of their reaped children)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks = int(fields[11]) + int(fields[12])
        if children:
            ticks += int(fields[13]) + int(fields[14])
        total += ticks / os.sysconf("SC_CLK_TCK")
    return total


def reaped_children_cpu() -> float:
    """User + system time of this process's reaped children (the load clients, once waited for): the
    difference across a run is what the client cost, which bounds what any server can reach when
    client and server share the machine's cores."""
    import resource  # noqa: PLC0415

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pss_kib(pids: list[int]) -> int:
    """Proportional set size summed over `pids` (shared pages split between the processes that map them)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def peak_rss_kib(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def idle_connections(server, port: str, greeting: bytes, connections: int = 1000) -> dict:
    """Starts `server`, opens `connections` idle connections to its port named `port` (5 per loopback
    source address,
    so that no per-address limit applies), counts those greeted with `greeting`, and reads the PSS of
    every process of the server with them open."""
    import resource  # noqa: PLC0415

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    server.start()
    socks = []
    try:
        base = pss_kib(server.pids())
        for i in range(connections):
            s = socket.socket()
            s.bind((f"127.9.{i // 5 // 250}.{1 + (i // 5) % 250}", 0))
            s.connect(("127.0.0.1", getattr(server, port)))
            socks.append(s)
        greeted = 0
        for s in socks:
            s.settimeout(10)
            try:
                greeted += s.recv(512).startswith(greeting)
            except OSError:
                pass
        return {"server": server.name, "connections": connections, "greeted": greeted,
                "pss_kib_before": base, "pss_kib": pss_kib(server.pids()), "processes": len(server.pids())}
    finally:
        for s in socks:
            s.close()
        server.stop()


def median_spread(values: list[float], digits: int = 0) -> str:
    """`median (min-max)`, the form every table here uses."""
    f = f"{{:,.{digits}f}}"
    return f"{f.format(statistics.median(values))} ({f.format(min(values))}-{f.format(max(values))})"


def report(problems: list[str], results, json_path: str | None) -> int:
    """The end of every benchmark: the raw figures to `json_path` (when given), each problem printed;
    the exit status (1 when there was one)."""
    import json  # noqa: PLC0415

    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1))
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


def in_namespaces(script: str) -> None:
    """Re-executes the running script in network and mount namespaces of its own, with loopback up."""
    if os.environ.get("RUSTMAIL_BENCH_NS") == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    if os.geteuid() != 0:
        sys.exit(f"{script} needs root (namespaces, mounts, the peers' own users)")
    env = dict(os.environ, RUSTMAIL_BENCH_NS="1")
    os.execvpe("unshare", ["unshare", "--net", "--mount", "--propagation", "private", "--",
                           sys.executable, *sys.argv], env)


def ensure_debian(commands: dict[str, str], install: bool, preseed: str = "") -> None:
    """Each command of `commands` (command -> Debian package) must exist; with `install`, apt-get
    installs the packages of those that do not."""
    missing = sorted({pkg for cmd, pkg in commands.items()
                      if shutil.which(cmd) is None and not Path("/usr/sbin", cmd).exists()})
    if not missing:
        return
    if not install:
        sys.exit(f"missing: apt-get install {' '.join(missing)} (or pass --install)")
    script = (f"echo '{preseed}' | debconf-set-selections && " if preseed else "")
    script += f"apt-get install -y -q --no-install-recommends {' '.join(missing)}"
    subprocess.run(script, shell=True, check=True)


def work_dir() -> Path:
    import tempfile  # noqa: PLC0415

    Path(WORK_PARENT).mkdir(mode=0o755, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=WORK_PARENT))
    os.chmod(work, 0o755)
    return work


def retire(path: Path) -> None:
    """Moves a server's directory from an earlier run aside (deleted with the whole work directory at the
    end) instead of deleting it now. Deleting thousands of files just before a run would make the next
    run's file creations slow for a minute: ext4's inode allocator skips, one by one, every inode freed in
    the last 60 s (5 minutes while its block is dirty), which `perf` showed as a fifth of the server's CPU
    at 16 connections: the cost of the harness's cleanup, not of the server measured."""
    if path.exists():
        retired = path.parent / "retired"
        retired.mkdir(exist_ok=True)
        path.rename(retired / f"{path.name}-{time.monotonic_ns()}")


def sha512_crypt(password: str) -> str:
    """One SHA-512-crypt hash both rustmail and the peers accept, so password checks cost the same."""
    return subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password, capture_output=True,
                          text=True, check=True).stdout.strip()
