#!/usr/bin/env python3
"""Checks the nixpkgs pin that users get from this flake (and the README tells them to follow):

1. flake.nix, flake.lock and README.md name the same nixos-YY.MM branch, and flake.lock pins a real
   GitHub revision of NixOS/nixpkgs (40 hex digits, a sha256 narHash): never a `path:` input left from
   an offline `--override-input` run.
2. That branch is still supported today. NixOS releases YY.05 at the end of May and YY.11 at the end of
   November, and supports a release until one month after the next one ships: nixos-25.11 ended at the
   end of June 2026, nixos-26.05 ends at the end of December 2026.
3. The highest `rust-version` in Cargo.lock builds with the rustc of that branch (recorded below; a new
   branch must be recorded here, with the nixpkgs file it was read from).
"""

import datetime
import json
import os
import re
import subprocess
import sys

# rustc of each branch, read from NixOS/nixpkgs pkgs/development/compilers/rust/1_NN.nix on the branch.
RUSTC = {
    "nixos-26.05": (1, 95, 0),
}

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
failures = []


def read(name):
    with open(os.path.join(root, name)) as f:
        return f.read()


lock = json.loads(read("flake.lock"))["nodes"]["nixpkgs"]
locked, original = lock["locked"], lock["original"]
branch = original.get("ref", "")
if not (locked.get("type") == "github" and locked.get("owner") == "NixOS" and locked.get("repo") == "nixpkgs"):
    failures.append(f"flake.lock does not pin github:NixOS/nixpkgs: {locked}")
if not re.fullmatch(r"[0-9a-f]{40}", locked.get("rev", "")):
    failures.append(f"flake.lock rev is not a git revision: {locked.get('rev')}")
if not re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", locked.get("narHash", "")):
    failures.append(f"flake.lock narHash is not a sha256 hash: {locked.get('narHash')}")

m = re.fullmatch(r"nixos-(\d\d)\.(05|11)", branch)
if not m:
    failures.append(f"flake.lock follows {branch!r}, not a NixOS release branch (nixos-YY.05 or nixos-YY.11)")
else:
    for name in ("flake.nix", "README.md"):
        others = set(re.findall(r"nixos-\d\d\.\d\d", read(name))) - {branch}
        if branch not in read(name) or others:
            failures.append(f"{name} names {sorted(others) or 'no branch'} where flake.lock follows {branch}")
    year, month = 2000 + int(m.group(1)), int(m.group(2))
    # End of support: the end of the month after the next release (six months later).
    eol_month = month + 7
    eol_year = year + (eol_month - 1) // 12
    eol_month = (eol_month - 1) % 12 + 1
    first_after = datetime.date(eol_year + eol_month // 12, eol_month % 12 + 1, 1)
    today = datetime.date.today()
    if today >= first_after:
        failures.append(f"{branch} is past its end of life ({first_after - datetime.timedelta(days=1)}); "
                        "pin the current stable branch in flake.nix, flake.lock and README.md")
    else:
        print(f"ok: {branch} is supported until {first_after - datetime.timedelta(days=1)}")

rustc = RUSTC.get(branch)
if rustc is None:
    failures.append(f"the rustc of {branch} is not recorded in tests/nix/check-pin.py (RUSTC)")
else:
    meta = json.loads(subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked"],
        cwd=root, check=True, capture_output=True, text=True).stdout)
    versions = []
    for package in meta["packages"]:
        if package.get("rust_version"):
            parts = tuple(int(x) for x in package["rust_version"].split("."))
            versions.append((parts + (0,) * (3 - len(parts)), package["name"]))
    highest, who = max(versions)
    shown = ".".join(map(str, highest))
    if highest > rustc:
        failures.append(f"{who} needs rustc {shown}, but {branch} has {'.'.join(map(str, rustc))}")
    else:
        print(f"ok: highest rust-version in Cargo.lock is {shown} ({who}); {branch} has rustc "
              f"{'.'.join(map(str, rustc))}")

for failure in failures:
    print(f"FAILED: {failure}")
sys.exit(1 if failures else 0)
