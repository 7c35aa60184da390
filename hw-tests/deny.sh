#!/usr/bin/env bash
# Offline dependency policy check: `bash hw-tests/deny.sh`.
#
# Runs cargo-deny against deny.toml (advisories, licenses, bans, sources) without fetching
# anything for the advisory check: the RustSec advisory-db comes from the snapshot kept in
# ../shared (unpacked by ../shared/tools/advisory-db into target/advisory-dbs/, which is
# deny.toml's db-path). Installs cargo-deny with `cargo install --locked` when it is missing.
# Needs git (the advisory-db is read as a git repository) and, on a fresh machine, crates.io
# to download the locked crate sources.
#
# Environment: CARGO_DENY_VERSION (default 0.20.2, the version deny.toml was written for).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CARGO_DENY_VERSION=${CARGO_DENY_VERSION:-0.20.2}
ADVISORY_TOOL=../shared/tools/advisory-db
# The directory name is the one cargo-deny derives from the default RustSec advisory-db URL.
ADVISORY_DB=target/advisory-dbs/advisory-db-3157b0e258782691

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

die() {
    echo "deny.sh: $*" >&2
    exit 1
}

command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH"
command -v git >/dev/null 2>&1 || die "git not found: the advisory-db snapshot is unpacked and read as a git repository"

if [ ! -f "$ADVISORY_TOOL" ]; then
    die "$ADVISORY_TOOL not found (looked beside the repo root $ROOT): the offline RustSec advisory-db snapshot lives in shared/, which must sit next to this checkout"
fi

if ! cargo deny --version >/dev/null 2>&1; then
    echo "deny.sh: cargo-deny missing, installing $CARGO_DENY_VERSION (takes a few minutes)"
    # cargo-deny's own release profile is fat LTO in one codegen unit, the slowest build there
    # is, for a tool that runs for seconds here: built without LTO, in 16 units.
    CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
        cargo install cargo-deny --locked --version "$CARGO_DENY_VERSION"
fi
installed=$(cargo deny --version)
case "$installed" in
    *" $CARGO_DENY_VERSION") ;;
    *) echo "deny.sh: warning: using $installed; deny.toml was written for $CARGO_DENY_VERSION" >&2 ;;
esac
echo "deny.sh: $installed"

# The locked crate sources must be present for `cargo metadata --offline` on a fresh machine;
# --locked: never rewrite Cargo.lock, check exactly what is committed.
cargo fetch --locked --quiet

bash "$ADVISORY_TOOL" "$ADVISORY_DB" >/dev/null
echo "deny.sh: advisory-db snapshot at $ADVISORY_DB ($(git -C "$ADVISORY_DB" log -1 --format=%ad --date=short))"

cargo deny --offline check advisories licenses bans sources
