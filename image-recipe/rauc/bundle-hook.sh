#!/bin/sh
# Slot hook of the clinic gateway's update bundles (image-recipe/bundle.sh copies it into each
# bundle as hook.sh; the manifest names it in [hooks] and sets hooks=post-install on both
# images). It ships inside the signed bundle, so it always matches the images it checks.
#
# `slot-post-install` runs after RAUC wrote one image to its slot and before RAUC marks the
# new slot primary (RAUC 1.8 src/update_handler.c img_to_raw_handler, then
# src/install.c launch_and_wait_default_handler: mark_active only after every image). It
# reads the written slot back; a non-zero exit fails the install with the target slot still
# marked bad (out of BootOrder, no BootNext), so a bad write is never booted.
#   rootfs: `veritysetup verify` of the whole slot (data and hash tree) against the root hash
#           in the signed gateway-update.json: every data block is read and hashed.
#   efi:    sha256 of the first RAUC_IMAGE_SIZE bytes of the slot equals RAUC_IMAGE_DIGEST
#           (the image's sha256 from the signed manifest).
# The slot's cached pages are dropped first (blockdev --flushbufs on a block device): the read
# goes to the disk, not to the page cache RAUC just wrote through.
# Messages name the slot and the failing check, nothing else.
set -eu

fail() {
    echo "gateway bundle hook: $*" >&2
    exit 1
}

hook=${1:-}
case "$hook" in
    slot-post-install) ;;
    *) fail "unexpected hook '$hook' (this bundle declares slot post-install only)" ;;
esac

slot=${RAUC_SLOT_NAME:?RAUC_SLOT_NAME not set}
dev=${RAUC_SLOT_DEVICE:?RAUC_SLOT_DEVICE not set}
bundle=${RAUC_BUNDLE_MOUNT_POINT:?RAUC_BUNDLE_MOUNT_POINT not set}

# One "key": value pair per line, as bundle.sh writes gateway-update.json.
json_field() {
    sed -n "s/^ *\"$1\": *\"\{0,1\}\([0-9a-f]*\)\"\{0,1\},\{0,1\} *\$/\1/p" "$bundle/gateway-update.json"
}

if [ -b "$dev" ]; then
    blockdev --flushbufs "$dev" || fail "$slot: cannot drop the slot's cached pages (blockdev --flushbufs)"
fi

case "${RAUC_SLOT_CLASS:-}" in
    rootfs)
        roothash=$(json_field roothash)
        data_blocks=$(json_field data_blocks)
        hash_offset=$(json_field hash_offset)
        printf '%s' "$roothash" | grep -Eq '^[0-9a-f]{64}$' \
            || fail "$slot: no valid roothash in the bundle's gateway-update.json"
        printf '%s' "$data_blocks" | grep -Eq '^[1-9][0-9]*$' \
            || fail "$slot: no valid data_blocks in the bundle's gateway-update.json"
        printf '%s' "$hash_offset" | grep -Eq '^[1-9][0-9]*$' \
            || fail "$slot: no valid hash_offset in the bundle's gateway-update.json"
        if ! veritysetup verify --hash-offset="$hash_offset" --data-blocks="$data_blocks" \
            "$dev" "$dev" "$roothash" >/dev/null; then
            fail "$slot: read-back failed: the written root does not verify against the bundle's root hash"
        fi
        echo "gateway bundle hook: $slot: read-back verified (dm-verity root hash, $data_blocks data blocks)"
        ;;
    efi)
        size=${RAUC_IMAGE_SIZE:?RAUC_IMAGE_SIZE not set}
        want=${RAUC_IMAGE_DIGEST:?RAUC_IMAGE_DIGEST not set}
        printf '%s' "$size" | grep -Eq '^[1-9][0-9]*$' || fail "$slot: bad image size '$size'"
        got=$(head -c "$size" "$dev" | sha256sum | cut -d' ' -f1)
        [ "$got" = "$want" ] \
            || fail "$slot: read-back failed: sha256 of the first $size bytes differs from the image"
        echo "gateway bundle hook: $slot: read-back verified (sha256 of $size bytes)"
        ;;
    *)
        fail "$slot: unexpected slot class '${RAUC_SLOT_CLASS:-}'"
        ;;
esac
