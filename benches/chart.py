#!/usr/bin/env python3
"""Draws docs/benchmarks-smtp.png from the raw runs of benches/smtp_throughput.py --json FILE: median
messages per second by number of connections, one line per server, for each message size.

    .venv/bin/pip install matplotlib==3.11.2
    .venv/bin/python benches/chart.py RUNS.json [docs/benchmarks-smtp.png]
"""

import json
import statistics
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> int:
    runs = [r for r in json.load(open(sys.argv[1])) if "size" in r]  # not the idle-connection runs
    out = sys.argv[2] if len(sys.argv) > 2 else "docs/benchmarks-smtp.png"
    by = defaultdict(list)
    for r in runs:
        by[(r["size"], r["server"], r["sessions"])].append(r["msg_per_s"])
    sizes = sorted({r["size"] for r in runs})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for server in ("rustmail", "postfix", "smtp-sink"):
            points = sorted((s, statistics.median(v)) for (z, name, s), v in by.items() if z == size and name == server)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=server,
                        linestyle="--" if server == "smtp-sink" else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("connections")
        ax.set_ylabel("messages per second (median)")
        ax.set_title(f"SMTP receipt, {size // 1024} KiB messages, fsync before 250")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
