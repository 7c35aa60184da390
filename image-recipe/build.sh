#!/usr/bin/env bash
# Builds the appliance image: `image-recipe/build.sh OUTDIR`
#
# Debian 12 (bookworm + bookworm-updates + bookworm-security) into a folder with mmdebstrap
# (as root), the host-built gatewayd and its hardened unit on top, then
#   OUTDIR/rootfs.img   ext4 root file system (label gw-root), mounted read-only
#   OUTDIR/state.img    empty ext4 (label gw-state) for /var/lib/gatewayd
#   OUTDIR/vmlinuz      the Debian kernel, for direct kernel boot
#   OUTDIR/initrd.img   its initramfs (initramfs-tools)
#   OUTDIR/cmdline      the kernel command line to boot it with
#   OUTDIR/manifest.txt package list, sizes and the gatewayd hash
#   OUTDIR/packages.txt every package and version in the image (taken before dpkg is removed)
# and the A/B UEFI disk of the signed-update design (docs/adr/0013, image-recipe/README.md):
#   rootfs.img          is also a dm-verity data device: its hash tree is appended after the
#                       ext4 (which ignores it), at byte `hash_offset` of verity.txt
#   OUTDIR/verity.txt   KEY=VALUE lines ROOTHASH, SALT, DATA_BLOCKS, DATA_BLOCK_SIZE, HASH_OFFSET,
#                       CANARY_BLOCK (what image-recipe/bundle.sh reads; parse, never source)
#   OUTDIR/gw-a.efi     unified kernel images (systemd-stub + kernel + initrd + command line)
#   OUTDIR/gw-b.efi     of slot A and B: the command line names the slot's root partition and
#                       its root hash (gw.verity=), so the hash is bound to what boots
#   OUTDIR/efi.vfat     FAT image of an EFI slot (EFI/Linux/gw-a.efi and gw-b.efi)
#   OUTDIR/disk.img     the factory disk (GPT, sparse): gw-efi-a (efi.vfat + the fallback
#                       EFI/BOOT/BOOTX64.EFI = gw-a.efi), gw-efi-b (empty), gw-root-a
#                       (rootfs.img), gw-root-b (empty), gw-state (empty ext4 gw-state)
#   OUTDIR/disk.txt     the partitions of disk.img: name start size (bytes), one per line
#
# Environment:
#   GATEWAYD   the binary to install (default: target/release/gatewayd; build it first with
#              `cargo build --release -p gatewayd --features tpm` on Debian 12, the image's
#              glibc; a binary without the TPM back end is refused)
#   GW_CONFIG  /etc/gatewayd/gatewayd.toml of the image (default: image-recipe/files/gatewayd.toml)
#   MIRROR     Debian mirror (default http://deb.debian.org/debian)
#   STATE_SIZE size of state.img (default 512M; sparse)
#   GW_UPDATE_CA  the vendor's update CA certificate(s), PEM (required): the RAUC keyring every
#              update bundle's signature must chain to, baked into the verity root
#              (image-recipe/rauc/install-into-root.sh)
#   GW_IMAGE_VERSION  the firmware version (a number, +1 per release; default 1): IMAGE_VERSION
#              in /usr/lib/os-release, what an update bundle's version is compared with
#   GW_VARIANTS  test firmware for the update tests (default: none): space-separated words
#              VERSION or VERSION-broken; each makes OUTDIR/variant-WORD/ with rootfs.img,
#              verity.txt, gw-a.efi, gw-b.efi and efi.vfat (what bundle.sh reads) of the same
#              tree with IMAGE_VERSION=VERSION; -broken also makes `gatewayd run` exit 1 at
#              once (every other gatewayd command works), a firmware that fails its update
#              health check. hw-tests/test_appliance_update.py builds "2 3-broken".
#
# Needs (Debian): mmdebstrap e2fsprogs cryptsetup-bin systemd-boot-efi binutils dosfstools
# mtools fdisk; runs as root (mmdebstrap --mode=root). The only
# network traffic is apt fetching Debian packages from MIRROR.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
out=${1:?usage: image-recipe/build.sh OUTDIR}
gatewayd=${GATEWAYD:-$repo/target/release/gatewayd}
config=${GW_CONFIG:-$here/files/gatewayd.toml}
mirror=${MIRROR:-http://deb.debian.org/debian}
security_mirror=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
state_size=${STATE_SIZE:-512M}
image_version=${GW_IMAGE_VERSION:-1}
update_ca=${GW_UPDATE_CA:-}
stub=/usr/lib/systemd/boot/efi/linuxx64.efi.stub
# The A/B disk (MiB): two EFI slots, two root slots, the state partition.
efi_mib=128
root_mib=640
disk_state_mib=1024

die() { echo "build.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap --mode=root, device-free ext4 with mkfs.ext4 -d)"
for tool in mmdebstrap mkfs.ext4 ldd veritysetup objcopy objdump mkfs.fat mcopy mmd sfdisk debugfs; do
    command -v "$tool" >/dev/null || die "$tool not found: apt-get install -y --no-install-recommends mmdebstrap e2fsprogs cryptsetup-bin binutils dosfstools mtools fdisk"
done
[ -f "$stub" ] || die "no $stub (the UEFI stub of the unified kernel images): apt-get install -y --no-install-recommends systemd-boot-efi"
case "$image_version" in
'' | *[!0-9]* | 0*) die "GW_IMAGE_VERSION=$image_version is not a positive number" ;;
esac
variants=${GW_VARIANTS:-}
for v in $variants; do
    [[ $v =~ ^[1-9][0-9]{0,8}(-broken)?$ ]] || die "GW_VARIANTS: '$v' is not VERSION or VERSION-broken"
done
[ -x "$gatewayd" ] || die "no gatewayd binary at $gatewayd: run \`cargo build --release -p gatewayd --features tpm\`"
# The image's key store is the TPM (files/gatewayd.toml): the binary must have the back end.
case "$(ldd "$gatewayd")" in
    *libtss2-esys*) ;;
    *) die "$gatewayd has no TPM back end (it does not link libtss2-esys): build it with \`cargo build --release -p gatewayd --features tpm\`" ;;
esac
[ -f "$config" ] || die "no config file $config"
[ -n "$update_ca" ] && [ -r "$update_ca" ] || die "GW_UPDATE_CA must name the update CA certificate (PEM): the image's RAUC keyring"

# Runtime libraries gatewayd links (ldd) and the Debian packages that ship them. The TCTI
# for /dev/tpmrm0 is dlopen()ed at run time, so it is listed on its own.
pkg_of() {
    local real
    real=$(readlink -f "$1")
    for p in "$1" "$real" "/usr$real" "${real#/usr}"; do
        dpkg -S "$p" 2>/dev/null | head -n 1 | cut -d: -f1 && return 0
    done
    return 1
}
runtime_pkgs=
for lib in $(ldd "$gatewayd" | awk '/=>/ { print $3 }'); do
    pkg=$(pkg_of "$lib") || die "no Debian package ships $lib (gatewayd links it)"
    case ",$runtime_pkgs," in *",$pkg,"*) ;; *) runtime_pkgs=${runtime_pkgs:+$runtime_pkgs,}$pkg ;; esac
done
echo "gatewayd links: $(ldd "$gatewayd" | awk '/=>/ { print $1 }' | tr '\n' ' ')"
echo "from packages:  $runtime_pkgs"

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/gw-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
t0=$(date +%s)

# usr-is-merged satisfies init-system-helpers on the /usr that mmdebstrap already merged, so
# usrmerge (and perl beyond the Essential perl-base, which only it needs) can be purged below.
# systemd-resolved: host names for https:// uplinks and mqtts:// brokers, from the DNS servers
# networkd's DHCP hands it (glibc's `dns` NSS module asks its stub on 127.0.0.53).
# rauc + rauc-service: the A/B update installer (its D-Bus service); efibootmgr: RAUC's EFI
# boot backend and gw-boot-entries; cryptsetup-bin: veritysetup for the initramfs.
packages=usr-is-merged,systemd-sysv,udev,systemd-resolved,linux-image-amd64,initramfs-tools,e2fsprogs,libtss2-tcti-device0,rauc,rauc-service,efibootmgr,cryptsetup-bin,$runtime_pkgs

# No docs, man pages, info or translations in the image (copyright files stay).
mmdebstrap \
    --variant=apt --mode=root --format=directory \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --essential-hook="mkdir -p \"\$1/etc/initramfs-tools/conf.d\" \"\$1/etc/initramfs-tools/hooks\"" \
    --essential-hook="cp '$here/files/initramfs-modules.conf' \"\$1/etc/initramfs-tools/conf.d/gateway.conf\"" \
    --essential-hook="cp '$here/files/initramfs-hook' \"\$1/etc/initramfs-tools/hooks/gateway-modules\"" \
    --essential-hook="install -D -m 0755 '$here/files/initramfs-verity' \"\$1/etc/initramfs-tools/scripts/local-top/gw-verity\"" \
    --include="$packages" \
    bookworm "$root" \
    "deb $mirror bookworm main" \
    "deb $mirror bookworm-updates main" \
    "deb $security_mirror bookworm-security main"

echo "--- dropping what the gateway does not need"
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get purge -y -q --autoremove \
    usrmerge perl perl-modules-5.36 libperl5.36 libfile-find-rule-perl libnumber-compare-perl libtext-glob-perl
echo "--- installing gatewayd"
install -D -m 0755 "$gatewayd" "$root/usr/bin/gatewayd"
install -D -m 0644 "$repo/config/gatewayd.service" "$root/usr/lib/systemd/system/gatewayd.service"
install -D -m 0644 "$here/files/gatewayd-probe.service" "$root/usr/lib/systemd/system/gatewayd-probe.service"
install -D -m 0755 "$here/files/probe" "$root/usr/libexec/gatewayd/probe"
install -D -m 0644 "$here/files/gatewayd-test-dns.service" "$root/usr/lib/systemd/system/gatewayd-test-dns.service"
install -D -m 0755 "$here/files/test-dns" "$root/usr/libexec/gatewayd/test-dns"
install -D -m 0644 "$here/files/sysusers-gatewayd.conf" "$root/usr/lib/sysusers.d/gatewayd.conf"
install -D -m 0640 "$config" "$root/etc/gatewayd/gatewayd.toml"
install -D -m 0644 "$here/files/20-wired.network" "$root/etc/systemd/network/20-wired.network"
install -D -m 0644 "$here/files/journald-volatile.conf" "$root/etc/systemd/journald.conf.d/volatile.conf"
install -m 0644 "$here/files/fstab" "$root/etc/fstab"
install -D -m 0755 "$here/files/gatewayd-test-hooks" "$root/usr/lib/systemd/system-generators/gatewayd-test-hooks"
install -D -m 0755 "$here/files/boot-entries" "$root/usr/libexec/gatewayd/boot-entries"
install -D -m 0644 "$here/files/gw-boot-entries.service" "$root/usr/lib/systemd/system/gw-boot-entries.service"
# Updates: the trial boot's health check, the reboot gatewayd asks for, the hardware watchdog.
install -D -m 0644 "$here/files/gatewayd-update-health.service" "$root/usr/lib/systemd/system/gatewayd-update-health.service"
install -D -m 0644 "$here/files/gatewayd-reboot.path" "$root/usr/lib/systemd/system/gatewayd-reboot.path"
install -D -m 0644 "$here/files/gatewayd-reboot.service" "$root/usr/lib/systemd/system/gatewayd-reboot.service"
install -D -m 0644 "$here/files/watchdog.conf" "$root/etc/systemd/system.conf.d/gatewayd-watchdog.conf"
# RAUC: system.conf (slots, efi boot backend), the update keyring, D-Bus policy, pre-install handler.
bash "$here/rauc/install-into-root.sh" "$root" "$update_ca"
# An inert file whose blocks the tests corrupt on the disk: reading it must fail (dm-verity).
mkdir -p "$root/usr/share/gatewayd"
{ yes 'gatewayd verity canary: this file is never used; tests flip a byte of it on disk' || true; } \
    | head -c 65536 >"$root/usr/share/gatewayd/verity-canary"
[ "$(stat -c %s "$root/usr/share/gatewayd/verity-canary")" -eq 65536 ] || die "the verity canary is not 64 KiB"
chmod 0644 "$root/usr/share/gatewayd/verity-canary"
# The firmware version: what an update's bundle version is compared with.
sed -i '/^IMAGE_ID=/d; /^IMAGE_VERSION=/d' "$root/usr/lib/os-release"
printf 'IMAGE_ID=clinic-gateway\nIMAGE_VERSION=%s\n' "$image_version" >>"$root/usr/lib/os-release"
echo gateway >"$root/etc/hostname"
mkdir -p "$root/var/lib/gatewayd"

# Users exist at build time: the root file system is read-only at run time.
chroot "$root" systemd-sysusers
chroot "$root" chgrp gatewayd /etc/gatewayd/gatewayd.toml
chroot "$root" getent group tss >/dev/null || die "group tss missing (tpm-udev)"

chroot "$root" systemctl enable gatewayd.service systemd-networkd.service systemd-resolved.service \
    gw-boot-entries.service gatewayd-update-health.service gatewayd-reboot.path
# A slot is marked good by the update health check only, never just for having booted.
chroot "$root" systemctl mask rauc-mark-good.service
# /etc/resolv.conf on the read-only root: a symlink to resolved's stub file in /run (the
# package's postinst makes it too; mmdebstrap handles resolv.conf itself, so make sure).
ln -sfn ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
# An appliance has no console login.
chroot "$root" systemctl mask getty@.service serial-getty@.service console-getty.service
# Nothing writes to / at run time: no apt timers, no first-boot machine-id commit.
# (and no timers that write /var or scrub disks behind the gateway's back).
for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
            e2scrub_reap.service fstrim.timer getty-static.service systemd-machine-id-commit.service; do
    chroot "$root" systemctl mask "$unit"
done

echo "--- kernel and initramfs"
kver=$(basename "$(ls -d "$root"/lib/modules/* | sort -V | tail -n 1)")
# The kernel features of the A/B slots: dm-verity (root), loop and squashfs (RAUC bundles).
for opt in DM_VERITY BLK_DEV_LOOP SQUASHFS SQUASHFS_ZSTD EFIVAR_FS; do
    grep -Eq "^CONFIG_$opt=(y|m)$" "$root/boot/config-$kver" || die "kernel $kver has no CONFIG_$opt"
done
# The initrd opens the verity root: veritysetup, dm-verity and the local-top script in it
# (initramfs-tools runs as a trigger after every package: regenerate if it ran too early).
initrd_has_verity() {
    chroot "$root" lsinitramfs "/boot/initrd.img-$kver" >"$work/initrd.list" || return 1
    for f in 'sbin/veritysetup$' 'scripts/local-top/gw-verity$' '/dm-verity\.ko'; do
        grep -q "$f" "$work/initrd.list" || return 1
    done
}
if ! initrd_has_verity; then
    chroot "$root" update-initramfs -u -k "$kver"
    initrd_has_verity || die "the initrd lacks veritysetup, dm-verity.ko or scripts/local-top/gw-verity"
fi
cp "$root/boot/vmlinuz-$kver" "$out/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$out/initrd.img"
chmod 0644 "$out/vmlinuz" "$out/initrd.img"

echo "--- trimming"
# Modules no gateway (or its VM) uses: sound, video capture, GPUs, wireless, InfiniBand.
for d in sound drivers/media drivers/gpu drivers/infiniband drivers/net/wireless drivers/staging \
         drivers/bluetooth net/bluetooth drivers/isdn drivers/net/ethernet/mellanox; do
    rm -rf "$root/lib/modules/$kver/kernel/$d"
done
chroot "$root" depmod "$kver"
rm -rf "$root"/boot/* "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/*
rm -rf "$root"/usr/share/man "$root"/usr/share/info "$root"/usr/share/locale
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -type f -delete
# Empty machine-id: systemd makes a transient one at each boot (read-only root).
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
# No compilers or remote shells slipped in as dependencies.
for bad in usr/sbin/sshd usr/bin/gcc usr/bin/cc usr/bin/make; do
    [ ! -e "$root/$bad" ] || die "$bad in the image"
done

# The package list, for the manifest and an auditor: the last thing that needs dpkg.
chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' >"$work/packages.txt"
[ -s "$work/packages.txt" ] || die "dpkg-query listed no packages"

echo "--- removing the package manager"
# Last step on the tree: nothing runs dpkg or apt after this. The root is read-only at run
# time, so they could not install anything anyway; without them the image cannot be changed
# package by package and carries no unused tooling (ADR 0007). The files of apt, dpkg and
# debconf go (their lists are taken from dpkg before it goes); the alternatives symlinks in
# /etc/alternatives stay, only update-alternatives and its database go. start-stop-daemon
# (shipped by dpkg) stays: it is a service helper, not package tooling.
# libapt-pkg is apt's library: nothing else in the image links it (checked below).
pm_pkgs="apt dpkg debconf libapt-pkg6.0"
keep_re='^(/etc/alternatives(/.*)?|/s?bin/start-stop-daemon|/usr/s?bin/start-stop-daemon)$'
# shellcheck disable=SC2086  # word splitting of the package names is intended
chroot "$root" dpkg-query -L $pm_pkgs | sort -u >"$work/pm-files.txt"
# The folders only they own (not /var/log, which base-files ships too).
pm_dirs=$(while IFS= read -r f; do
    if [ -n "$f" ] && [ ! -L "$root$f" ] && [ -d "$root$f" ]; then echo "$f"; fi
done <"$work/pm-files.txt")
# shellcheck disable=SC2086  # one argument per folder (dpkg paths have no spaces)
{ chroot "$root" dpkg-query -S $pm_dirs 2>/dev/null || true; } | awk -F': ' -v pm=" $pm_pkgs " '
    $2 ~ /^\// { n = split($1, owner, ", "); own = 1
                  for (i = 1; i <= n; i++) { sub(/:.*/, "", owner[i]); if (index(pm, " " owner[i] " ") == 0) own = 0 }
                  if (own) print $2 }' >"$work/pm-dirs.txt"
while IFS= read -r f; do
    [ -n "$f" ] || continue
    [[ $f =~ $keep_re ]] && continue
    # -d follows symlinks: /bin, /sbin and /lib are symlinks into /usr and stay.
    [ -d "$root$f" ] || rm -f "$root$f"
done <"$work/pm-files.txt"
# The folders only they owned, deepest first, if now empty.
sort -r "$work/pm-dirs.txt" | while IFS= read -r f; do
    [ -n "$f" ] && ! [[ $f =~ $keep_re ]] || continue
    rmdir "$root$f" 2>/dev/null || true
done
# Their units (apt-daily*, dpkg-db-backup) are gone: drop the mask and .wants links to them.
for unit in $(grep -E '/systemd/system/[^/]+$' "$work/pm-files.txt" | xargs -r -n 1 basename); do
    find "$root/etc/systemd/system" -name "$unit" -type l -delete
done
rm -rf "$root"/var/lib/dpkg "$root"/var/lib/apt "$root"/var/cache/apt "$root"/etc/apt \
       "$root"/var/cache/debconf "$root"/etc/dpkg "$root"/usr/share/dpkg "$root"/usr/lib/apt
for tool in apt apt-get apt-cache apt-cdrom apt-config apt-key apt-mark dpkg dpkg-deb dpkg-divert \
            dpkg-maintscript-helper dpkg-query dpkg-realpath dpkg-split dpkg-statoverride \
            dpkg-trigger update-alternatives debconf debconf-apt-progress debconf-communicate \
            debconf-copydb debconf-escape debconf-set-selections debconf-show dpkg-preconfigure \
            dpkg-reconfigure; do
    for dir in usr/bin usr/sbin; do
        [ ! -e "$root/$dir/$tool" ] && [ ! -L "$root/$dir/$tool" ] || die "/$dir/$tool still in the image"
    done
done
# Nothing left in the image links apt's library.
if users=$(grep -rlsF libapt-pkg.so "$root/usr/bin" "$root/usr/sbin" "$root/usr/lib" "$root/usr/libexec"); then
    die "files still refer to libapt-pkg: $users"
fi
# Every alternative still points at a file in the image.
for link in "$root"/etc/alternatives/*; do
    [ -L "$link" ] || continue
    chroot "$root" test -e "${link#"$root"}" || die "alternative ${link#"$root"} -> $(readlink "$link") is broken"
done

echo "--- file systems"
rm -f "$out/state.img"
mkfs.ext4 -q -F -L gw-state -m 0 "$out/state.img" "$state_size"
echo "root=/dev/vda ro console=ttyS0" >"$out/cmdline"

page_up() { echo $(( ($1 + 4095) / 4096 * 4096 )); }
# uki CMDLINE OUT: objcopy adds the sections to systemd's stub at addresses after its own,
# page aligned (.linux last); systemd-stub(7) names the sections. No load options are ever
# passed: the built-in command line is the one that counts (with Secure Boot, the only one).
uki() {
    local end=0 e osrel_at cmd_at initrd_at linux_at sec
    printf '%s' "$1" >"$work/uki-cmdline"
    while read -r _ _ size vma _; do
        e=$(( 16#$vma + 16#$size ))
        [ "$e" -le "$end" ] || end=$e
    done < <(objdump -h "$stub" | awk 'NF == 7 && $1 ~ /^[0-9]+$/')
    osrel_at=$(page_up "$end")
    cmd_at=$(page_up $(( osrel_at + $(stat -Lc %s "$root/usr/lib/os-release") )))
    initrd_at=$(page_up $(( cmd_at + $(stat -c %s "$work/uki-cmdline") )))
    linux_at=$(page_up $(( initrd_at + $(stat -c %s "$out/initrd.img") )))
    objcopy \
        --add-section .osrel="$root/usr/lib/os-release" --change-section-vma .osrel="$(printf 0x%x "$osrel_at")" \
        --add-section .cmdline="$work/uki-cmdline" --change-section-vma .cmdline="$(printf 0x%x "$cmd_at")" \
        --add-section .initrd="$out/initrd.img" --change-section-vma .initrd="$(printf 0x%x "$initrd_at")" \
        --add-section .linux="$out/vmlinuz" --change-section-vma .linux="$(printf 0x%x "$linux_at")" \
        "$stub" "$2"
    for sec in .osrel .cmdline .initrd .linux; do
        objdump -h "$2" | awk -v s="$sec" '$2 == s { found = 1 } END { exit !found }' || die "$2 has no $sec section"
    done
}
slot_cmdline() { # slot_cmdline BOOTNAME PARTLABEL
    echo "console=ttyS0 ro panic=10 systemd.gpt_auto=0 rauc.slot=$1 gw.verity=PARTLABEL=$2,$data_blocks,$hash_offset,$roothash root=/dev/mapper/gw-root"
}

# slot_images DIR: the images of one firmware of the tree $root in DIR: rootfs.img (ext4 +
# its dm-verity hash tree), verity.txt, the UKIs gw-a.efi and gw-b.efi (command lines
# cmdline-a, cmdline-b) and efi.vfat (the FAT image of an EFI slot holding both UKIs).
# Sets used_kib, size_kib, rootfs_bytes, data_blocks, hash_offset, roothash, canary_block.
slot_images() {
    local dir=$1 verity_out salt
    mkdir -p "$dir"
    used_kib=$(du -sk "$root" | cut -f1)
    # The root is never written (read-only, dm-verity): no slack beyond ext4's own metadata.
    size_kib=$(( (used_kib + used_kib / 12 + 16384 + 3) / 4 * 4 ))
    rm -f "$dir/rootfs.img" "$dir/gw-a.efi" "$dir/gw-b.efi" "$dir/efi.vfat"
    mkfs.ext4 -q -F -L gw-root -b 4096 -O ^has_journal -m 0 -d "$root" "$dir/rootfs.img" "${size_kib}K" \
        || die "mkfs.ext4 -d: the root tree ($used_kib KiB) does not fit ${size_kib} KiB"

    # dm-verity: the hash tree goes after the ext4 in the same file (and so in the same partition).
    data_blocks=$(( size_kib / 4 ))
    hash_offset=$(( size_kib * 1024 ))
    verity_out=$work/verity.out
    veritysetup format --data-blocks="$data_blocks" --hash-offset="$hash_offset" \
        "$dir/rootfs.img" "$dir/rootfs.img" >"$verity_out"
    roothash=$(sed -n 's/^Root hash:[[:space:]]*//p' "$verity_out")
    salt=$(sed -n 's/^Salt:[[:space:]]*//p' "$verity_out")
    [[ $roothash =~ ^[0-9a-f]{64}$ ]] || die "veritysetup format printed no sha256 root hash: $(cat "$verity_out")"
    veritysetup verify --data-blocks="$data_blocks" --hash-offset="$hash_offset" \
        "$dir/rootfs.img" "$dir/rootfs.img" "$roothash" || die "veritysetup verify of $dir/rootfs.img failed"
    canary_block=$(debugfs -R "bmap /usr/share/gatewayd/verity-canary 0" "$dir/rootfs.img" 2>/dev/null)
    [[ $canary_block =~ ^[0-9]+$ ]] && [ "$canary_block" -gt 0 ] || die "no block for the verity canary: $canary_block"
    rootfs_bytes=$(stat -c %s "$dir/rootfs.img")
    [ "$rootfs_bytes" -le $(( root_mib * 1048576 )) ] || die "$dir/rootfs.img ($rootfs_bytes bytes) is larger than a root slot ($root_mib MiB)"
    printf '%s\n' "ROOTHASH=$roothash" "SALT=$salt" "DATA_BLOCKS=$data_blocks" "DATA_BLOCK_SIZE=4096" \
        "HASH_OFFSET=$hash_offset" "CANARY_BLOCK=$canary_block" >"$dir/verity.txt"

    # The unified kernel images: the command line names the slot and binds its root hash.
    uki "$(slot_cmdline system0 gw-root-a)" "$dir/gw-a.efi"
    uki "$(slot_cmdline system1 gw-root-b)" "$dir/gw-b.efi"
    slot_cmdline system0 gw-root-a >"$dir/cmdline-a"
    slot_cmdline system1 gw-root-b >"$dir/cmdline-b"

    # FAT without mounting (no loop devices, no vfat in this host's kernel): mkfs.fat -C + mtools.
    mkfs.fat -F 32 -n GW-EFI -C "$dir/efi.vfat" $(( efi_mib * 1024 )) >/dev/null
    mmd -i "$dir/efi.vfat" ::/EFI ::/EFI/Linux
    mcopy -i "$dir/efi.vfat" "$dir/gw-a.efi" ::/EFI/Linux/gw-a.efi
    mcopy -i "$dir/efi.vfat" "$dir/gw-b.efi" ::/EFI/Linux/gw-b.efi
}

echo "--- root file system, dm-verity, unified kernel images, EFI slot image"
slot_images "$out"

echo "--- the factory disk"
rm -f "$out/disk.img"
# The factory gw-efi-a also holds the removable-media fallback, which the firmware boots while
# its NVRAM has no boot entries yet (first power-on; gw-boot-entries.service then makes them).
cp --sparse=always "$out/efi.vfat" "$work/efi-factory.vfat"
mmd -i "$work/efi-factory.vfat" ::/EFI/BOOT
mcopy -i "$work/efi-factory.vfat" "$out/gw-a.efi" ::/EFI/BOOT/BOOTX64.EFI
# GPT on a sparse file (sfdisk needs no device), contents placed with dd conv=notrunc.
esp=C12A7328-F81F-11D2-BA4B-00A0C93EC93B
root_x64=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709
linux_data=0FC63DAF-8483-4772-8E79-3D69D8477DE4
truncate -s $(( (1 + 2 * efi_mib + 2 * root_mib + disk_state_mib + 1) * 1048576 )) "$out/disk.img"
printf '%s\n' "label: gpt" "unit: sectors" \
    "start=2048, size=$(( efi_mib * 2048 )), type=$esp, name=gw-efi-a" \
    "size=$(( efi_mib * 2048 )), type=$esp, name=gw-efi-b" \
    "size=$(( root_mib * 2048 )), type=$root_x64, name=gw-root-a" \
    "size=$(( root_mib * 2048 )), type=$root_x64, name=gw-root-b" \
    "size=$(( disk_state_mib * 2048 )), type=$linux_data, name=gw-state" \
    | sfdisk -q "$out/disk.img"
sfdisk -J "$out/disk.img" | python3 -c '
import json, sys
for p in json.load(sys.stdin)["partitiontable"]["partitions"]:
    print(p["name"], p["start"] * 512, p["size"] * 512)' >"$out/disk.txt"
part_start() { awk -v n="$1" '$1 == n { print $2 }' "$out/disk.txt"; }
for name in gw-efi-a gw-efi-b gw-root-a gw-root-b gw-state; do
    [ -n "$(part_start "$name")" ] || die "disk.img has no partition $name"
done
dd if="$work/efi-factory.vfat" of="$out/disk.img" bs=1M seek=$(( $(part_start gw-efi-a) / 1048576 )) \
    conv=notrunc,sparse status=none
dd if="$out/rootfs.img" of="$out/disk.img" bs=1M seek=$(( $(part_start gw-root-a) / 1048576 )) \
    conv=notrunc,sparse status=none
mkfs.ext4 -q -F -L gw-state -m 0 -E offset="$(part_start gw-state)" "$out/disk.img" "${disk_state_mib}M"
rm -f "$work/efi-factory.vfat"

{
    echo "gatewayd sha256 $(sha256sum "$gatewayd" | cut -d' ' -f1)"
    echo "kernel $kver"
    echo "root tree $(( used_kib / 1024 )) MiB; rootfs.img $(( rootfs_bytes / 1048576 )) MiB (allocated $(( $(du -k "$out/rootfs.img" | cut -f1) / 1024 )) MiB)"
    echo "vmlinuz $(( $(stat -c %s "$out/vmlinuz") / 1024 )) KiB; initrd.img $(( $(stat -c %s "$out/initrd.img") / 1024 )) KiB"
    echo "image version $image_version"
    echo "verity roothash $roothash data_blocks $data_blocks hash_offset $hash_offset (hash tree $(( (rootfs_bytes - hash_offset) / 1024 )) KiB)"
    echo "gw-a.efi $(( $(stat -c %s "$out/gw-a.efi") / 1024 )) KiB; gw-b.efi $(( $(stat -c %s "$out/gw-b.efi") / 1024 )) KiB; efi.vfat $efi_mib MiB"
    echo "disk.img $(( $(stat -c %s "$out/disk.img") / 1048576 )) MiB (allocated $(( $(du -k "$out/disk.img" | cut -f1) / 1024 )) MiB): efi-a/b $efi_mib MiB, root-a/b $root_mib MiB, state $disk_state_mib MiB"
    echo "packages ($(wc -l <"$work/packages.txt"), also in packages.txt; apt, dpkg and debconf then removed:"
    sed 's/^/  /' "$work/packages.txt"
} >"$out/manifest.txt"
cp "$work/packages.txt" "$out/packages.txt"

# Test firmware of the same tree (GW_VARIANTS): the tree is changed for each and put back.
for v in $variants; do
    echo "--- variant $v"
    version=${v%-broken}
    cp -p "$root/usr/lib/os-release" "$work/os-release"
    sed -i 's/^IMAGE_VERSION=.*/IMAGE_VERSION='"$version"'/' "$root/usr/lib/os-release"
    if [ "$v" != "$version" ]; then
        mv "$root/usr/bin/gatewayd" "$work/gatewayd.real"
        install -D -m 0755 "$work/gatewayd.real" "$root/usr/libexec/gatewayd/gatewayd-real"
        printf '%s\n' '#!/bin/sh' \
            '# hw-tests broken firmware (image-recipe/build.sh GW_VARIANTS): `run` fails, all else works.' \
            'if [ "${1:-}" = run ]; then echo "gatewayd: broken test firmware: run exits 1" >&2; exit 1; fi' \
            'exec /usr/libexec/gatewayd/gatewayd-real "$@"' >"$root/usr/bin/gatewayd"
        chmod 0755 "$root/usr/bin/gatewayd"
    fi
    slot_images "$out/variant-$v"
    if [ "$v" != "$version" ]; then
        rm -f "$root/usr/libexec/gatewayd/gatewayd-real"
        mv "$work/gatewayd.real" "$root/usr/bin/gatewayd"
    fi
    cp -p "$work/os-release" "$root/usr/lib/os-release"
    echo "variant $v: root hash $roothash, rootfs.img $(( rootfs_bytes / 1048576 )) MiB" >>"$out/manifest.txt"
done

echo "--- done in $(( $(date +%s) - t0 )) s: $out"
head -n 8 "$out/manifest.txt"
ls -l "$out"
