#!/usr/bin/env bash
# Puts the gateway's RAUC integration into an image root tree:
#   image-recipe/rauc/install-into-root.sh ROOT_TREE UPDATE_CA_PEM
# (image-recipe/build.sh calls it after the packages are in the tree, before the root is
# made read-only). UPDATE_CA_PEM is the vendor's update CA certificate(s), PEM: the keyring
# every bundle's signature must chain to. What lands where:
#   /etc/rauc/system.conf                         slots, efi boot backend, keyring, handler
#   /etc/rauc/update-ca.pem                       the keyring (UPDATE_CA_PEM)
#   /etc/dbus-1/system.d/de.pengutronix.rauc.conf only root and gatewayd may call RAUC
#   /usr/libexec/gatewayd/rauc-pre-install        execs `gatewayd update pre-install`
#   /etc/systemd/system/rauc.service.d/gatewayd.conf  RAUC starts after the state partition
#   /usr/lib/tmpfiles.d/rauc-gatewayd.conf        RAUC's data directory, 0700 root
# The tree must already hold rauc (+ rauc-service), veritysetup (cryptsetup-bin) and
# efibootmgr: the packages are the image build's to include. Needs openssl on the build host.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
die() { echo "install-into-root.sh: $*" >&2; exit 1; }

[ "$#" -eq 2 ] || die "usage: image-recipe/rauc/install-into-root.sh ROOT_TREE UPDATE_CA_PEM"
root=$1 ca=$2
[ -d "$root" ] || die "no root tree at $root"
[ -r "$ca" ] || die "cannot read the update CA $ca"
command -v openssl >/dev/null || die "openssl not found: apt-get install -y --no-install-recommends openssl"

# The keyring: PEM certificates only, each a CA (RAUC trusts self-signed roots in it).
ncerts=$(grep -c -- '-----BEGIN CERTIFICATE-----' "$ca" || true)
[ "$ncerts" -ge 1 ] || die "$ca holds no PEM certificate"
if grep -q -- 'PRIVATE KEY-----' "$ca"; then
    die "$ca holds a private key: the keyring must carry certificates only"
fi
split=$(mktemp -d)
trap 'rm -rf "$split"' EXIT
awk -v dir="$split" '/-----BEGIN CERTIFICATE-----/ { n++ } n { print > (dir "/" n ".pem") } /-----END CERTIFICATE-----/ { close(dir "/" n ".pem") }' "$ca"
for one in "$split"/*.pem; do
    n=$(basename "$one" .pem)
    openssl x509 -in "$one" -noout 2>/dev/null || die "$ca: certificate $n does not parse"
    openssl x509 -in "$one" -noout -text | grep -q 'CA:TRUE' \
        || die "$ca: certificate $n is not a CA certificate (basicConstraints CA:TRUE)"
done

have() {
    local f
    for f in "$@"; do
        [ -e "$root$f" ] && return 0
    done
    return 1
}
have /usr/bin/rauc /bin/rauc || die "$root has no rauc: include the packages rauc and rauc-service in the image"
have /lib/systemd/system/rauc.service /usr/lib/systemd/system/rauc.service \
    || die "$root has no rauc.service: include the package rauc-service in the image (RAUC's D-Bus service)"
have /usr/sbin/veritysetup /sbin/veritysetup || die "$root has no veritysetup: include cryptsetup-bin in the image (the slot read-back hook runs it)"
have /usr/bin/efibootmgr /bin/efibootmgr /usr/sbin/efibootmgr /sbin/efibootmgr \
    || die "$root has no efibootmgr: include efibootmgr in the image (RAUC's efi boot backend runs it)"

install -D -m 0644 "$here/system.conf" "$root/etc/rauc/system.conf"
install -D -m 0644 "$ca" "$root/etc/rauc/update-ca.pem"
install -D -m 0644 "$here/de.pengutronix.rauc.conf" "$root/etc/dbus-1/system.d/de.pengutronix.rauc.conf"
install -D -m 0755 "$here/rauc-pre-install" "$root/usr/libexec/gatewayd/rauc-pre-install"
mkdir -p "$root/etc/systemd/system/rauc.service.d"
cat >"$root/etc/systemd/system/rauc.service.d/gatewayd.conf" <<'UNIT'
# RAUC keeps its slot status in /var/lib/gatewayd/rauc (the state partition).
[Unit]
RequiresMountsFor=/var/lib/gatewayd
UNIT
chmod 0644 "$root/etc/systemd/system/rauc.service.d/gatewayd.conf"
# RAUC's data directory belongs to root. RAUC creates it (0700) for whoever runs it first, and
# gatewayd runs `rauc info` as its own user: made at boot, once the state partition is mounted.
install -D -m 0644 /dev/stdin "$root/usr/lib/tmpfiles.d/rauc-gatewayd.conf" <<'TMPFILES'
# RAUC's slot status on the state partition (image-recipe/rauc/system.conf data-directory).
d /var/lib/gatewayd/rauc 0700 root root -
TMPFILES
echo "install-into-root.sh: RAUC configuration, keyring ($ncerts certificate(s)), D-Bus policy and pre-install handler in $root"
