#!/usr/bin/env bash
# Makes a signed RAUC update bundle of the appliance image:
#   image-recipe/bundle.sh IMAGE_DIR VERSION MIN_VERSION KEY CERT OUT
#
# IMAGE_DIR   an image build's output folder (image-recipe/build.sh), read only:
#               rootfs.img  the root file system with its dm-verity hash tree appended
#               efi.vfat    the FAT image of an efi slot (the UKIs)
#               verity.txt  KEY=VALUE lines ROOTHASH, SALT, DATA_BLOCKS, HASH_OFFSET
#                           (what `veritysetup format` printed for rootfs.img; other keys
#                           are ignored, DATA_BLOCK_SIZE if present must be 4096)
# VERSION     the firmware version code (integer, +1 per release); RAUC's manifest version
# MIN_VERSION the anti-downgrade floor a box raises to once this firmware is marked good
#             (integer, <= VERSION)
# KEY, CERT   the vendor's update signing key and certificate (PEM; the certificate must
#             carry extendedKeyUsage=codeSigning and chain to the image's
#             /etc/rauc/update-ca.pem). RAUC_KEY_PASSPHRASE is honoured by rauc.
# OUT         the bundle to write (*.raucb); replaced atomically, never left half-written
#
# Environment:
#   GW_DATA_FORMAT  the data format version this firmware reads and writes (default 1)
#   GW_UPDATE_KEYRING  when set, `rauc bundle` also checks the signature against this keyring
#   GW_BUNDLE_FORMAT   verity (default) or plain. plain is for hosts without device-mapper
#                   (hw-tests/test_update_bundle.py installs with the real rauc on such a
#                   host); the image's system.conf refuses plain bundles (bundle-formats=verity)
#
# The bundle (RAUC 1.8, format verity: the manifest is inside the CMS signature, the payload
# is a squashfs with a dm-verity tree that the kernel checks block by block while installing):
#   manifest.raucm        compatible clinic-gateway-x86_64, version, images, hooks
#   root.ext4             IMAGE_DIR/rootfs.img  -> slot class rootfs (raw)
#   efi.vfat              IMAGE_DIR/efi.vfat    -> slot class efi (raw)
#   hook.sh               image-recipe/rauc/bundle-hook.sh: reads each written slot back
#   gateway-update.json   version, min_version, data_format, roothash, data_blocks,
#                         hash_offset (signed with the payload; read by `gatewayd update
#                         pre-install` and by hook.sh)
# squashfs compression zstd: Debian 12's kernel (6.1) squashfs module has the zstd
# decompressor.
#
# Needs (Debian): rauc squashfs-tools cryptsetup-bin openssl. Needs no root, no loop device.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
die() { echo "bundle.sh: $*" >&2; exit 1; }

[ "$#" -eq 6 ] || die "usage: image-recipe/bundle.sh IMAGE_DIR VERSION MIN_VERSION KEY CERT OUT"
image_dir=$1 version=$2 min_version=$3 key=$4 cert=$5 out=$6
data_format=${GW_DATA_FORMAT:-1}
bundle_format=${GW_BUNDLE_FORMAT:-verity}

for tool in rauc mksquashfs veritysetup; do
    command -v "$tool" >/dev/null || die "$tool not found: apt-get install -y --no-install-recommends rauc squashfs-tools cryptsetup-bin"
done

is_uint() { [[ $1 =~ ^(0|[1-9][0-9]{0,17})$ ]]; }
is_uint "$version" || die "VERSION must be a non-negative integer, got '$version'"
is_uint "$min_version" || die "MIN_VERSION must be a non-negative integer, got '$min_version'"
is_uint "$data_format" || die "GW_DATA_FORMAT must be a non-negative integer, got '$data_format'"
case "$bundle_format" in
    verity|plain) ;;
    *) die "GW_BUNDLE_FORMAT must be verity or plain, got '$bundle_format'" ;;
esac
[ "$min_version" -le "$version" ] || die "MIN_VERSION ($min_version) is above VERSION ($version): a box that marks this firmware good would raise its floor above the firmware it runs"
[ -d "$image_dir" ] || die "no image folder $image_dir"
for f in rootfs.img efi.vfat verity.txt; do
    [ -f "$image_dir/$f" ] || die "no $f in $image_dir (an image build's output folder)"
done
[ -r "$key" ] || die "cannot read the signing key $key"
[ -r "$cert" ] || die "cannot read the signing certificate $cert"
command -v openssl >/dev/null || die "openssl not found: apt-get install -y --no-install-recommends openssl"
# The box verifies with check-purpose=codesign (rauc/system.conf): say so now, not on the box.
openssl x509 -in "$cert" -noout -ext extendedKeyUsage 2>/dev/null | grep -q 'Code Signing' \
    || die "$cert has no extendedKeyUsage codeSigning: the box (check-purpose=codesign) would refuse the bundle"
case "$out" in
    *.raucb) ;;
    *) die "OUT must end in .raucb, got '$out'" ;;
esac

# verity.txt: KEY=VALUE lines, parsed (never sourced).
roothash= salt= data_blocks= hash_offset= data_block_size=4096
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
        ''|'#'*) continue ;;
        ROOTHASH=*) roothash=${line#*=} ;;
        SALT=*) salt=${line#*=} ;;
        DATA_BLOCKS=*) data_blocks=${line#*=} ;;
        HASH_OFFSET=*) hash_offset=${line#*=} ;;
        DATA_BLOCK_SIZE=*) data_block_size=${line#*=} ;;
        *=*) ;; # other keys belong to the image build
        *) die "$image_dir/verity.txt: not a KEY=VALUE line: '$line'" ;;
    esac
done <"$image_dir/verity.txt"
[[ $roothash =~ ^[0-9a-f]{64}$ ]] || die "$image_dir/verity.txt: ROOTHASH must be 64 lowercase hex digits (sha256), got '$roothash'"
[[ $salt =~ ^[0-9a-f]*$ ]] || die "$image_dir/verity.txt: SALT must be hex, got '$salt'"
is_uint "$data_blocks" && [ "$data_blocks" -gt 0 ] || die "$image_dir/verity.txt: DATA_BLOCKS must be a positive integer, got '$data_blocks'"
is_uint "$hash_offset" && [ "$hash_offset" -gt 0 ] || die "$image_dir/verity.txt: HASH_OFFSET must be a positive integer, got '$hash_offset'"
# The slot hook (veritysetup verify) and the initramfs use veritysetup's default 4096-byte blocks.
[ "$data_block_size" = 4096 ] || die "$image_dir/verity.txt: DATA_BLOCK_SIZE must be 4096 (veritysetup's default), got '$data_block_size'"
[ "$hash_offset" -ge $((data_blocks * 4096)) ] || die "$image_dir/verity.txt: HASH_OFFSET ($hash_offset) lies inside the $data_blocks data blocks"

# The root must verify against verity.txt before it is signed: a box would refuse it later.
echo "bundle.sh: verifying $image_dir/rootfs.img against verity.txt"
veritysetup verify --hash-offset="$hash_offset" --data-blocks="$data_blocks" \
    "$image_dir/rootfs.img" "$image_dir/rootfs.img" "$roothash" \
    || die "$image_dir/rootfs.img does not verify against the ROOTHASH in verity.txt"
root_salt=$(veritysetup dump --hash-offset="$hash_offset" "$image_dir/rootfs.img" | awk '$1 == "Salt:" { print $2 }')
if [ -n "$salt" ] && [ "$root_salt" != "$salt" ]; then
    die "$image_dir/rootfs.img: its verity superblock's salt differs from SALT in verity.txt"
fi

out_dir=$(cd "$(dirname "$out")" && pwd) || die "no folder for $out"
out=$out_dir/$(basename "$out")
work=$(mktemp -d "$out_dir/.bundle.XXXXXX")
trap 'rm -rf "$work"' EXIT
content=$work/content
mkdir "$content"

# Hard links when IMAGE_DIR is on the same file system (no copy of ~400 MiB), else a copy.
ln "$image_dir/rootfs.img" "$content/root.ext4" 2>/dev/null \
    || cp --sparse=always "$image_dir/rootfs.img" "$content/root.ext4"
ln "$image_dir/efi.vfat" "$content/efi.vfat" 2>/dev/null \
    || cp --sparse=always "$image_dir/efi.vfat" "$content/efi.vfat"
install -m 0755 "$here/rauc/bundle-hook.sh" "$content/hook.sh"

cat >"$content/manifest.raucm" <<MANIFEST
[update]
compatible=clinic-gateway-x86_64
version=$version
description=clinic gateway firmware $version

[bundle]
format=$bundle_format

[hooks]
filename=hook.sh

[image.rootfs]
filename=root.ext4
hooks=post-install

[image.efi]
filename=efi.vfat
hooks=post-install
MANIFEST

# One "key": value pair per line: hook.sh reads it with sed (the image has no JSON tool).
cat >"$content/gateway-update.json" <<JSON
{
  "version": $version,
  "min_version": $min_version,
  "data_format": $data_format,
  "roothash": "$roothash",
  "data_blocks": $data_blocks,
  "hash_offset": $hash_offset
}
JSON

keyring_args=()
if [ -n "${GW_UPDATE_KEYRING:-}" ]; then
    keyring_args=(--keyring="$GW_UPDATE_KEYRING")
fi
partial=$work/bundle.raucb
rauc bundle --cert="$cert" --key="$key" "${keyring_args[@]}" \
    --mksquashfs-args="-comp zstd" "$content" "$partial" \
    || die "rauc bundle failed"
sync "$partial"
mv -f "$partial" "$out"
sync "$out_dir"
echo "bundle.sh: $out: $bundle_format, version $version, min_version $min_version, data_format $data_format, $(stat -c %s "$out") bytes"
