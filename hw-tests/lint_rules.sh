#!/usr/bin/env bash
# Architecture rules that clippy cannot state (CONVENTIONS 4, 14), checked on the source:
#  1. no `Result<_, String>` in a pub fn (or pub trait method) of a library crate under gateway/
#     (the binary gateway/gatewayd may use context-adding strings internally);
#  2. the topic-safe id check is written once (gateway/id): no other crate spells its alphabet test;
#  3. master-key derivation labels live in one place (gateway/keystore KeyPurpose).
# Exit 1 with every hit named; test code (tests.rs, tests/, #[cfg(test)] modules after the marker) is not scanned.
# Run by hw-tests/run-all.sh before clippy.
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0

lib_sources() {
    find gateway -path gateway/gatewayd -prune -o -path '*/fuzz' -prune -o -path '*/tests' -prune \
        -o -name '*.rs' ! -name 'tests.rs' -path '*/src/*' -print
}

# Only the code before a file's `#[cfg(test)]` module is library code.
strip_tests() {
    awk '/^#\[cfg\(test\)\]/{exit} {print FILENAME":"FNR":"$0}' "$1"
}

# A signature: from `pub fn` / `pub type` (or `fn` inside a `pub trait` block) to its `{` or `;`.
signatures() {
    awk '
        FNR == 1 { in_trait = 0; sig = "" }
        /^#\[cfg\(test\)\]/ { nextfile }
        /^pub trait / || /^pub\(crate\) trait / { in_trait = ($0 ~ /^pub trait/) }
        /^}/ { in_trait = 0 }
        {
            if (sig == "" && ($0 ~ /^[[:space:]]*pub (async )?(unsafe )?fn / || $0 ~ /^[[:space:]]*pub type / || (in_trait && $0 ~ /^[[:space:]]+(async )?fn /))) {
                sig = FILENAME ":" FNR ":"; start = 1
            }
            if (sig != "") {
                sig = sig " " $0
                if ($0 ~ /[{;][[:space:]]*$/) { print sig; sig = "" }
            }
        }' "$@"
}
all=$(signatures $(lib_sources) | grep -E 'Result<[^;{]*,[[:space:]]*String>' |
    sed -E 's/[[:space:]]+/ /g' || true)
if [ -n "$all" ]; then
    echo "FAIL: Result<_, String> in the public API of a library crate (use a typed error):"
    echo "$all"
    fail=1
else
    echo "ok: no Result<_, String> in library pub fns"
fi

ids=$(for f in $(lib_sources); do strip_tests "$f"; done | grep -v '^gateway/id/' |
    grep -E "is_ascii_alphanumeric\(\) *\|\| *(matches!\(b, b'\.' \| b'_' \| b'-'\)|b\"-_\.\"|b\"\._-\")" || true)
if [ -n "$ids" ]; then
    echo "FAIL: a second copy of the topic-safe id check (use gateway_id::Id / gateway_id::is_valid):"
    echo "$ids"
    fail=1
else
    echo "ok: the topic-safe id check has one home (gateway/id)"
fi

labels=$(grep -rn --include='*.rs' -E 'update\(b"gatewayd [a-z0-9 -]+ key v[0-9]+"' gateway |
    grep -v '^gateway/keystore/src/master.rs:' || true)
if [ -n "$labels" ]; then
    echo "FAIL: a master-key derivation label outside gateway/keystore (add a KeyPurpose instead):"
    echo "$labels"
    fail=1
else
    echo "ok: master-key derivation labels are all in KeyPurpose"
fi
exit "$fail"
