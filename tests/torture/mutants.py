#!/usr/bin/env python3
"""Shows that the power-cut test bites: builds rustmail with one durability step removed (a mutant) and
runs `crash_loop.py --power-cuts` against it, which must then fail with the loss that step prevents.

Each mutation is a literal edit of a copy of the source (the working tree is never touched); an edit
that no longer applies is an error, so a refactoring cannot silently turn a mutation into a no-op. The
mutants are built under target/mutants (its own target directory: target/debug/rustmail stays as it was).

    mutants.py [--cuts N] [--seed S] [NAME ...]     (default: every mutation, 8 cuts each)
    mutants.py --sigkill-only [...]                  the same mutants under plain SIGKILLs, for comparison

Exit status 0 when every mutant was caught with the expected kind of problem. With --sigkill-only the
crash loop runs without the forgetful file system: a SIGKILL leaves the page cache intact, so these
mutants are expected to pass it (this shows why the power cuts are needed); the exit status is then 0
whatever the outcome, and the verdicts are printed. Needs what
crash_loop.py --power-cuts needs (root, libfuse2, fusepy), and cargo.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


@dataclass
class Mutation:
    name: str
    file: str
    old: str
    new: str
    caught_by: str  # a regular expression the failing run's output must match
    what: str


MUTATIONS = [
    Mutation(
        "no-journal-fdatasync",
        "src/storage/journal.rs",
        "match self.flush(&flush) {",
        "match Ok::<(), io::Error>(()) {",
        r"LOST: ",
        "a journalled message is acknowledged without the fdatasync of its journal segment",
    ),
    Mutation(
        "no-fsync-of-message-before-checkpoint",
        "src/storage/journal.rs",
        "chunk.iter().try_for_each(Pending::sync_file)",
        "chunk.iter().try_for_each(|_| Ok::<(), io::Error>(()))",
        r"corrupt or partial: ",
        "the journal checkpoints messages whose Maildir files were not fsynced",
    ),
    Mutation(
        "no-fsync-of-new-before-checkpoint",
        "src/storage/journal.rs",
        'fsync_dir(&m.join("new")).and_then(|()| fsync_dir(&m.join("cur")))',
        'fsync_dir(&m.join("cur"))',
        r"LOST: ",
        "the journal checkpoints messages whose new/ directories were not fsynced",
    ),
    Mutation(
        "no-fsync-at-expunge",
        "src/storage/maildir.rs",
        '    for sub in ["new", "cur"] {\n        if let Err(e) = fsync_dir(&maildir.join(sub)) {',
        '    for sub in [] as [&str; 0] {\n        if let Err(e) = fsync_dir(&maildir.join(sub)) {',
        r"deleted at a QUIT that got \+OK",
        "POP3's UPDATE does not fsync the directories after the unlinks",
    ),
]


def build(mutation: Mutation, workdir: Path) -> Path:
    # The same path each time, so that cargo rebuilds only the crate itself after the first mutant.
    src = workdir / "src-tree"
    shutil.rmtree(src, ignore_errors=True)
    (src / "tests").mkdir(parents=True)
    for name in ("Cargo.toml", "Cargo.lock"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src")
    for test in (REPO / "tests").glob("*.rs"):  # the manifest names tests/dialogs.rs
        shutil.copy2(test, src / "tests" / test.name)
    path = src / mutation.file
    text = path.read_text()
    if text.count(mutation.old) != 1:
        sys.exit(f"mutation {mutation.name}: the text to change occurs {text.count(mutation.old)} times in "
                 f"{mutation.file} (expected once): update tests/torture/mutants.py")
    path.write_text(text.replace(mutation.old, mutation.new))
    env = dict(os.environ, CARGO_TARGET_DIR=str(REPO / "target" / "mutants"))
    print(f"  building the mutant ({mutation.what})", flush=True)
    subprocess.run(["cargo", "build", "--locked", "--quiet"], cwd=src, env=env, check=True)
    binary = workdir / f"rustmail-{mutation.name}"
    shutil.copy2(REPO / "target" / "mutants" / "debug" / "rustmail", binary)
    return binary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help=f"mutations to run (default all: {', '.join(m.name for m in MUTATIONS)})")
    ap.add_argument("--cuts", type=int, default=8, help="power cuts per mutant (default 8)")
    ap.add_argument("--seed", default="mutants", help="crash_loop.py's seed (default 'mutants')")
    ap.add_argument("--sigkill-only", action="store_true",
                    help="plain SIGKILLs instead of power cuts, to compare (expected to miss the mutants)")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from torture_lib import power_cuts_unavailable
    if not args.sigkill_only and (why := power_cuts_unavailable()):
        print(f"SKIPPED: the power-cut test cannot run here: {why}")
        return 77
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if unknown := set(args.names) - {m.name for m in MUTATIONS}:
        sys.exit(f"unknown mutations: {sorted(unknown)}")
    workdir = Path(tempfile.mkdtemp(prefix="rustmail-mutants-"))
    results = []
    try:
        for m in chosen:
            print(f"mutant {m.name}:", flush=True)
            binary = build(m, workdir)
            run = subprocess.run(
                [sys.executable, str(HERE / "crash_loop.py"), *([] if args.sigkill_only else ["--power-cuts"]),
                 "--kills", str(args.cuts), "--seed", args.seed, "--bin", str(binary)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            summary = next((line for line in run.stdout.splitlines() if line.startswith("TORTURE ")), "")
            caught = run.returncode == 1 and re.search(m.caught_by, run.stdout) is not None
            verdict = "caught" if caught else "NOT CAUGHT"
            print(f"  {verdict} (exit status {run.returncode}): {summary or run.stdout[-1500:]}", flush=True)
            for line in [line for line in run.stdout.splitlines() if re.search(m.caught_by, line)][:3]:
                print(f"    {line.strip()}")
            results.append(caught)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    kind = "SIGKILLs" if args.sigkill_only else "power cuts"
    print(f"MUTANTS {kind}={args.cuts} caught={sum(results)} of {len(results)}")
    return 0 if args.sigkill_only or all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
