#!/usr/bin/env bash
# Regenerates src/storage_classes.rs from the SOP class table of the dicom-dictionary-std
# crate that Cargo resolved: every SOP class whose name says "Storage", except Storage
# Commitment, the Media Storage Directory and Stored Print (not storage services).
# Usage: bash gateway/dicom/tools/gen-storage-classes.sh > gateway/dicom/src/storage_classes.rs
set -euo pipefail
cd "$(dirname "$0")/../../.."
src=$(cargo metadata --format-version 1 | python3 -c '
import json, sys
m = json.load(sys.stdin)
p = [p for p in m["packages"] if p["name"] == "dicom-dictionary-std"][0]
print(p["manifest_path"].rsplit("/", 1)[0] + "/src/uids.rs")')
version=$(basename "$(dirname "$(dirname "$src")")")
echo "//! Storage SOP classes accepted by the C-STORE SCP: generated from ${version} by"
echo "//! \`tools/gen-storage-classes.sh\`; a unit test checks each entry against the dictionary."
echo
echo "/// Every storage SOP class of the standard dictionary (retired ones included: old"
echo "/// modalities still send them)."
echo "pub static STORAGE_SOP_CLASSES: &[&str] = &["
sed -n '/pub(crate) const SOP_CLASSES/,/^];/p' "$src" \
  | grep -o 'E::new("[^"]*", "[^"]*"' \
  | sed -E 's/E::new\("([^"]*)", "([^"]*)"/\1\t\2/' \
  | grep -i 'storage' \
  | grep -v -i -E 'commitment|media storage directory|stored print' \
  | sort -u -t$'\t' -k1,1 \
  | while IFS=$'\t' read -r uid name; do printf '    "%s", // %s\n' "$uid" "$name"; done
echo "];"
