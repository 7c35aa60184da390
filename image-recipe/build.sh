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
#
# Environment:
#   GATEWAYD   the binary to install (default: target/release/gatewayd; build it first with
#              `cargo build --release -p gatewayd --features tpm` on Debian 12, the image's
#              glibc; a binary without the TPM back end is refused)
#   GW_CONFIG  /etc/gatewayd/gatewayd.toml of the image (default: image-recipe/files/gatewayd.toml)
#   MIRROR     Debian mirror (default http://deb.debian.org/debian)
#   STATE_SIZE size of state.img (default 512M; sparse)
#
# Needs (Debian): mmdebstrap e2fsprogs; runs as root (mmdebstrap --mode=root). The only
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

die() { echo "build.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap --mode=root, device-free ext4 with mkfs.ext4 -d)"
for tool in mmdebstrap mkfs.ext4 ldd; do
    command -v "$tool" >/dev/null || die "$tool not found: apt-get install -y --no-install-recommends mmdebstrap e2fsprogs"
done
[ -x "$gatewayd" ] || die "no gatewayd binary at $gatewayd: run \`cargo build --release -p gatewayd --features tpm\`"
# The image's key store is the TPM (files/gatewayd.toml): the binary must have the back end.
case "$(ldd "$gatewayd")" in
    *libtss2-esys*) ;;
    *) die "$gatewayd has no TPM back end (it does not link libtss2-esys): build it with \`cargo build --release -p gatewayd --features tpm\`" ;;
esac
[ -f "$config" ] || die "no config file $config"

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
packages=usr-is-merged,systemd-sysv,udev,systemd-resolved,linux-image-amd64,initramfs-tools,e2fsprogs,libtss2-tcti-device0,$runtime_pkgs

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
echo gateway >"$root/etc/hostname"
mkdir -p "$root/var/lib/gatewayd"

# Users exist at build time: the root file system is read-only at run time.
chroot "$root" systemd-sysusers
chroot "$root" chgrp gatewayd /etc/gatewayd/gatewayd.toml
chroot "$root" getent group tss >/dev/null || die "group tss missing (tpm-udev)"

chroot "$root" systemctl enable gatewayd.service systemd-networkd.service systemd-resolved.service
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
used_kib=$(du -sk "$root" | cut -f1)
size_kib=$(( used_kib + used_kib / 5 + 65536 ))
rm -f "$out/rootfs.img" "$out/state.img"
mkfs.ext4 -q -F -L gw-root -O ^has_journal -m 0 -d "$root" "$out/rootfs.img" "${size_kib}K"
mkfs.ext4 -q -F -L gw-state -m 0 "$out/state.img" "$state_size"
echo "root=/dev/vda ro console=ttyS0" >"$out/cmdline"

{
    echo "gatewayd sha256 $(sha256sum "$gatewayd" | cut -d' ' -f1)"
    echo "kernel $kver"
    echo "root tree $(( used_kib / 1024 )) MiB; rootfs.img $(( $(stat -c %s "$out/rootfs.img") / 1048576 )) MiB (allocated $(( $(du -k "$out/rootfs.img" | cut -f1) / 1024 )) MiB)"
    echo "vmlinuz $(( $(stat -c %s "$out/vmlinuz") / 1024 )) KiB; initrd.img $(( $(stat -c %s "$out/initrd.img") / 1024 )) KiB"
    echo "packages ($(wc -l <"$work/packages.txt"), also in packages.txt; apt, dpkg and debconf then removed:"
    sed 's/^/  /' "$work/packages.txt"
} >"$out/manifest.txt"
cp "$work/packages.txt" "$out/packages.txt"

echo "--- done in $(( $(date +%s) - t0 )) s: $out"
head -n 4 "$out/manifest.txt"
ls -l "$out"
