#!/usr/bin/env bash
# Runs every fuzz target of the gateway for a bounded time and fails on any finding.
#
#   bash hw-tests/fuzz.sh            # every target, FUZZ_SECONDS (default 30) each
#   FUZZ_SECONDS=300 FUZZ_ONLY="parse_roundtrip mllp_split" bash hw-tests/fuzz.sh
#
# Fuzz crates (each its own workspace, outside the main one): gateway/dicom/fuzz,
# gateway/hl7/fuzz, gateway/fleet/fuzz, gateway/exchange/fuzz, gateway/uplink/fuzz,
# gateway/registry/fuzz, gateway/identity/fuzz. Every `[[bin]]` target they
# list (`cargo fuzz list`) is built and run; each needs a seed corpus in
# `gateway/<crate>/fuzz/corpus/<target>/` (small valid inputs, plus every finding once fixed;
# the folders are git-ignored, so seeds are added with `git add -f`).
#
# How it runs, on the stable toolchain only:
# - cargo-fuzz (pinned below) is installed with `cargo install --locked` when missing.
#   libfuzzer-sys and cargo-fuzz's instrumentation flags are nightly-only, so the build runs
#   with RUSTC_BOOTSTRAP=1 and `--sanitizer none` (no ASan: the crates have no unsafe code;
#   panics, overflow checks and debug assertions are what finds bugs here).
# - The fuzzer writes what it discovers into a scratch folder given first; the repo corpus is
#   given second and only read: new corpus entries never land in the tree. (cargo may still
#   refresh a fuzz crate's Cargo.lock when it is stale, as any cargo build does.)
# - A finding is any non-zero exit or any artifact: a crash or panic, a unit slower than
#   FUZZ_UNIT_TIMEOUT seconds, more than FUZZ_RSS_MB of memory. Its artifact is copied to
#   hw-tests/artifacts/fuzz/<target>/ (git-ignored; CI keeps it) and the run fails after all
#   targets have run, naming each target, its finding and its artifact.
# - Bounded time: each build is cut at FUZZ_BUILD_TIMEOUT seconds, each run at
#   FUZZ_SECONDS plus 120 s of start-up slack (libFuzzer itself stops at FUZZ_SECONDS).
#   Every crate is built first; then FUZZ_JOBS targets run at once (default: one per core;
#   libFuzzer uses one core). Default total: every target (19 today) x 30 s / FUZZ_JOBS, plus
#   the builds (a few minutes from cold).
#
# Environment: FUZZ_SECONDS (30), FUZZ_JOBS (nproc), FUZZ_ONLY (space-separated target names; default all),
# FUZZ_TARGET_DIR (target/fuzz: kept apart from the workspace's target dir),
# FUZZ_BUILD_TIMEOUT (1800), FUZZ_UNIT_TIMEOUT (10), FUZZ_RSS_MB (2048).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CARGO_FUZZ_VERSION=0.13.1
FUZZ_CRATES=(gateway/dicom gateway/hl7 gateway/fleet gateway/exchange gateway/uplink gateway/registry gateway/identity)
FUZZ_SECONDS=${FUZZ_SECONDS:-30}
FUZZ_ONLY=${FUZZ_ONLY:-}
FUZZ_TARGET_DIR=${FUZZ_TARGET_DIR:-$ROOT/target/fuzz}
FUZZ_BUILD_TIMEOUT=${FUZZ_BUILD_TIMEOUT:-1800}
FUZZ_UNIT_TIMEOUT=${FUZZ_UNIT_TIMEOUT:-10}
FUZZ_RSS_MB=${FUZZ_RSS_MB:-2048}
FUZZ_JOBS=${FUZZ_JOBS:-$(nproc)}
ARTIFACTS=$ROOT/hw-tests/artifacts/fuzz

for var in FUZZ_SECONDS FUZZ_BUILD_TIMEOUT FUZZ_UNIT_TIMEOUT FUZZ_RSS_MB FUZZ_JOBS; do
    if ! [[ ${!var} =~ ^[1-9][0-9]*$ ]]; then
        echo "fuzz.sh: $var must be a positive whole number of seconds/MiB, not '${!var}'" >&2
        exit 2
    fi
done

if [ "$(cargo fuzz --version 2>/dev/null || true)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
    echo "installing cargo-fuzz $CARGO_FUZZ_VERSION"
    timeout "$FUZZ_BUILD_TIMEOUT" cargo install cargo-fuzz --version "=$CARGO_FUZZ_VERSION" --locked
fi
echo "$(cargo fuzz --version), $(rustc --version)"
HOST=$(rustc -vV | sed -n 's/^host: //p')

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gateway-fuzz.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT

wanted() {
    [ -z "$FUZZ_ONLY" ] && return 0
    local t
    for t in $FUZZ_ONLY; do
        [ "$t" = "$1" ] && return 0
    done
    return 1
}

summary=()
findings=()
ran=0
queue=()

# One target's bounded run. Writes what the report needs into its scratch folder (`summary`,
# and on a finding `finding` and `report`), so that several can run at once.
run_target() {
    local crate=$1 target=$2
    local corpus=$crate/fuzz/corpus/$target
    local bin=$FUZZ_TARGET_DIR/$HOST/release/$target
    local work=$SCRATCH/$target
    mkdir -p "$work/corpus" "$work/artifacts"
    local log=$work/log
    echo "--- run $target for ${FUZZ_SECONDS}s (seeds: $corpus, $(ls -A "$corpus" | wc -l) files)"
    local start rc elapsed runs kind
    start=$(date +%s)
    set +e
    timeout -k 10 $((FUZZ_SECONDS + 120)) "$bin" \
        -max_total_time="$FUZZ_SECONDS" \
        -timeout="$FUZZ_UNIT_TIMEOUT" \
        -rss_limit_mb="$FUZZ_RSS_MB" \
        -artifact_prefix="$work/artifacts/" \
        -print_final_stats=1 \
        "$work/corpus" "$ROOT/$corpus" >"$log" 2>&1
    rc=$?
    set -e
    elapsed=$(($(date +%s) - start))
    runs=$(sed -n 's/^Done \([0-9]*\) runs in .*/\1/p' "$log" | tail -n 1)
    local found=()
    mapfile -t found < <(find "$work/artifacts" -type f | sort)
    if [ "$rc" -eq 0 ] && [ "${#found[@]}" -eq 0 ]; then
        printf '%-22s %-16s clean: %s runs in %ss\n' "$target" "$crate" "${runs:-?}" "$elapsed" >"$work/summary"
        return 0
    fi
    # "panicked at <place>: <message>", else libFuzzer's verdict (deadly signal, timeout
    # after N seconds, out-of-memory (...)).
    kind=$(grep -m1 -A1 'panicked at' "$log" | tr '\n' ' ' | sed 's/^thread .* panicked at/panicked at/' | cut -c1-300 || true)
    if [ -z "$kind" ]; then
        kind=$(grep -m1 -o 'ERROR: libFuzzer: .*' "$log" | sed 's/^ERROR: libFuzzer: //' | cut -c1-200 || true)
    fi
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        kind="run did not stop within $((FUZZ_SECONDS + 120))s (hang outside a unit)"
    fi
    local saved=() a
    mkdir -p "$ARTIFACTS/$target"
    for a in "${found[@]}"; do
        cp "$a" "$ARTIFACTS/$target/"
        saved+=("hw-tests/artifacts/fuzz/$target/$(basename "$a")")
    done
    cp "$log" "$ARTIFACTS/$target.log"
    {
        echo "!!! $target: ${kind:-exit status $rc}; last lines of its log:"
        tail -n 40 "$log" | sed 's/^/    /'
    } >"$work/report"
    echo "$crate/fuzz $target: ${kind:-exit status $rc} (exit $rc); artifact: ${saved[*]:-none}; log: hw-tests/artifacts/fuzz/$target.log; reproduce: (cd $crate && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none $target ${saved[0]:+$ROOT/${saved[0]}})" >"$work/finding"
    printf '%-22s %-16s FINDING: %s\n' "$target" "$crate" "${kind:-exit $rc}" >"$work/summary"
}

# Build every fuzz crate first (cargo uses both cores), then run the targets FUZZ_JOBS at a
# time: libFuzzer runs on one core, and a run is bounded by time, not work.
for crate in "${FUZZ_CRATES[@]}"; do
    if ! list=$(cd "$crate" && cargo fuzz list) || [ -z "$list" ]; then
        echo "fuzz.sh: cannot list the fuzz targets of $crate/fuzz" >&2
        exit 2
    fi
    mapfile -t targets <<<"$list"
    selected=()
    for target in "${targets[@]}"; do
        if wanted "$target"; then selected+=("$target"); fi
    done
    [ "${#selected[@]}" -gt 0 ] || continue

    echo "--- build $crate/fuzz (${selected[*]})"
    # `cargo fuzz build` builds one target, or all of them.
    builds=("${selected[@]}")
    [ "${#selected[@]}" -eq "${#targets[@]}" ] && builds=("")
    for target in "${builds[@]}"; do
        (cd "$crate" && RUSTC_BOOTSTRAP=1 timeout "$FUZZ_BUILD_TIMEOUT" \
            cargo fuzz build --sanitizer none --target-dir "$FUZZ_TARGET_DIR" ${target:+"$target"})
    done

    for target in "${selected[@]}"; do
        corpus=$crate/fuzz/corpus/$target
        if [ ! -d "$corpus" ] || [ -z "$(ls -A "$corpus")" ]; then
            findings+=("$crate/fuzz $target: no seed corpus in $corpus")
            summary+=("$(printf '%-22s %-16s %s' "$target" "$crate" 'NO SEED CORPUS')")
            continue
        fi
        bin=$FUZZ_TARGET_DIR/$HOST/release/$target
        if [ ! -x "$bin" ]; then
            findings+=("$crate/fuzz $target: binary $bin was not built")
            summary+=("$(printf '%-22s %-16s %s' "$target" "$crate" 'NOT BUILT')")
            continue
        fi
        queue+=("$crate $target")
    done
done

echo "--- running ${#queue[@]} targets, $FUZZ_JOBS at a time"
for item in "${queue[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$FUZZ_JOBS" ]; do
        wait -n || true
    done
    # shellcheck disable=SC2086 # "crate target"
    run_target $item &
done
wait
for item in "${queue[@]}"; do
    target=${item#* }
    work=$SCRATCH/$target
    ran=$((ran + 1))
    if [ -f "$work/summary" ]; then
        summary+=("$(cat "$work/summary")")
    else
        summary+=("$(printf '%-22s %-16s %s' "$target" "${item%% *}" 'RUN DID NOT REPORT')")
        findings+=("${item%% *}/fuzz $target: the run ended without a result")
    fi
    if [ -f "$work/finding" ]; then
        cat "$work/report"
        findings+=("$(cat "$work/finding")")
    fi
done

echo
echo "fuzz summary (${FUZZ_SECONDS}s per target):"
[ "${#summary[@]}" -eq 0 ] || printf '  %s\n' "${summary[@]}"
if [ "$ran" -eq 0 ] && [ "${#findings[@]}" -eq 0 ]; then
    echo "fuzz.sh: no fuzz target ran${FUZZ_ONLY:+ (FUZZ_ONLY='$FUZZ_ONLY' names none)}" >&2
    exit 2
fi
if [ "${#findings[@]}" -gt 0 ]; then
    echo >&2
    echo "FUZZING FAILED: ${#findings[@]} target(s) with a finding:" >&2
    printf '  %s\n' "${findings[@]}" >&2
    exit 1
fi
echo "all $ran fuzz targets clean"
