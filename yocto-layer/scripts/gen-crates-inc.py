#!/usr/bin/env python3
r"""Write recipes-gateway/gatewayd/gatewayd-crates.inc from the workspace's Cargo.lock.

The .inc lists every crates.io package of Cargo.lock as a `crate://crates.io/NAME/VERSION`
entry of SRC_URI and its `SRC_URI[NAME-VERSION.sha256sum]` from the lock file's `checksum`,
in the lock file's order (cargo sorts packages by name, then version). The body has the
layout oe-core's `cargo-update-recipe-crates` class writes, but only for the workspace's
own Cargo.lock: `bitbake -c update_crates gatewayd` walks every Cargo.lock under ${S} and
would also list the crates of the fuzz targets (gateway/*/fuzz/Cargo.lock), which the
recipe never builds. One more difference: the list opens with `SRC_URI += "\` instead of
`SRC_URI += " \`, which oelint-adv reports as an error (oelint.vars.inconspaces); bitbake
reads both the same. This script needs no Yocto build host.

Workspace members (no `source`) are built from the git checkout and are not listed.
Any other source (a git dependency, another registry) is refused with a message: the
recipe would need hand-written SRC_URI entries for it, so silently leaving it out would
only move the failure to do_compile.

Usage (from anywhere; the defaults are the repository's files):
    python3 yocto-layer/scripts/gen-crates-inc.py            # rewrite the .inc
    python3 yocto-layer/scripts/gen-crates-inc.py --check    # exit 1 if it is stale
    python3 yocto-layer/scripts/gen-crates-inc.py --lock L --output F

Python 3.11+ standard library only (tomllib).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

LAYER = Path(__file__).resolve().parent.parent
REPO = LAYER.parent
DEFAULT_LOCK = REPO / "Cargo.lock"
DEFAULT_OUTPUT = LAYER / "recipes-gateway" / "gatewayd" / "gatewayd-crates.inc"
CRATES_IO = "registry+https://github.com/rust-lang/crates.io-index"
REGENERATE = "python3 yocto-layer/scripts/gen-crates-inc.py"


class LockError(Exception):
    """Cargo.lock holds something this generator cannot turn into SRC_URI entries."""


def registry_packages(lock: dict) -> list[tuple[str, str, str]]:
    """(name, version, sha256) of every crates.io package, in Cargo.lock order."""
    out: list[tuple[str, str, str]] = []
    problems: list[str] = []
    for pkg in lock.get("package", []):
        name, version = pkg["name"], pkg["version"]
        source = pkg.get("source")
        if source is None:
            continue  # a workspace member or path dependency: built from the checkout
        if source != CRATES_IO:
            problems.append(
                f"{name} {version}: source {source!r} is not crates.io; add its SRC_URI "
                "entry to gatewayd_git.bb by hand (git: name= and destsuffix=, see "
                "cargo_common.bbclass) and teach this script to skip it"
            )
            continue
        checksum = pkg.get("checksum")
        if not checksum:
            problems.append(f"{name} {version}: no checksum in Cargo.lock")
            continue
        out.append((name, version, checksum))
    if problems:
        raise LockError("\n".join(problems))
    if not out:
        raise LockError("no crates.io package found in Cargo.lock")
    return out


def render(packages: list[tuple[str, str, str]], lock_name: str = "Cargo.lock") -> str:
    lines = [
        "# Generated from the repository's Cargo.lock by yocto-layer/scripts/gen-crates-inc.py.",
        "# Do not edit: after changing Cargo.lock run",
        f"#     {REGENERATE}",
        "# Only the workspace's lock file: `bitbake -c update_crates gatewayd` would also add",
        "# the fuzz targets' lock files (gateway/*/fuzz/Cargo.lock), which are not built here.",
        "",
        f"# from {lock_name}",
        'SRC_URI += "\\',
    ]
    lines += [f"    crate://crates.io/{name}/{version} \\" for name, version, _ in packages]
    lines += ['"', ""]
    lines += [f'SRC_URI[{name}-{version}.sha256sum] = "{sha}"' for name, version, sha in packages]
    return "\n".join(lines) + "\n"


def generate(lock_path: Path) -> str:
    with lock_path.open("rb") as f:
        lock = tomllib.load(f)
    return render(registry_packages(lock))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lock", type=Path, default=DEFAULT_LOCK, help="Cargo.lock to read")
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=".inc to write")
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if --output differs")
    args = ap.parse_args(argv)
    try:
        text = generate(args.lock)
    except LockError as e:
        print(f"gen-crates-inc: {args.lock}:\n{e}", file=sys.stderr)
        return 2
    data = text.encode("utf-8")
    if args.check:
        current = args.output.read_bytes() if args.output.exists() else b""
        if current != data:
            print(f"{args.output} is stale for {args.lock}; regenerate with: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
