#!/usr/bin/env python3
"""Draws the charts of docs/BENCHMARKS.md from the raw runs (--json FILE) of the benchmarks: median
messages per second by number of connections (SMTP, benches/smtp_throughput.py, one panel per message
size) or of sessions (POP3, benches/pop3_throughput.py), one line per server.

    .venv/bin/pip install matplotlib==3.11.2
    .venv/bin/python benches/chart.py SMTP.json [docs/benchmarks-smtp.png]
    .venv/bin/python benches/chart.py --pop3 POP3.json [docs/benchmarks-pop3.png]
"""

import json
import statistics
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def panel(ax, points_by_server: dict, xlabel: str, title: str) -> None:
    for server, points in points_by_server.items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=server,
                    linestyle="--" if server == "smtp-sink" else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("messages per second (median)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def medians(runs: list[dict], key) -> dict:
    by = defaultdict(list)
    for r in runs:
        by[key(r)].append(r["msg_per_s"])
    return {k: statistics.median(v) for k, v in by.items()}


def main() -> int:
    pop3 = sys.argv[1] == "--pop3"
    args = sys.argv[2:] if pop3 else sys.argv[1:]
    runs = [r for r in json.load(open(args[0])) if "msg_per_s" in r]  # not the idle-connection runs
    out = args[1] if len(args) > 1 else f"docs/benchmarks-{'pop3' if pop3 else 'smtp'}.png"
    if pop3:
        fig, axes = plt.subplots(1, 1, figsize=(5.5, 4), squeeze=False)
        med = medians(runs, lambda r: (r["server"], r["sessions"]))
        panel(axes[0][0], {name: sorted((s, v) for (n, s), v in med.items() if n == name)
                           for name in ("rustmail", "dovecot")},
              "sessions", "POP3 download + delete, 4 KiB messages (mpop)")
    else:
        sizes = sorted({r["size"] for r in runs})
        fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
        med = medians(runs, lambda r: (r["size"], r["server"], r["sessions"]))
        for ax, size in zip(axes[0], sizes):
            panel(ax, {name: sorted((s, v) for (z, n, s), v in med.items() if z == size and n == name)
                       for name in ("rustmail", "postfix", "smtp-sink")},
                  "connections", f"SMTP receipt, {size // 1024} KiB messages, fsync before 250")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
