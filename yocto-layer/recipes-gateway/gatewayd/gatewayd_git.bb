SUMMARY = "Clinic edge gateway daemon (DICOM, HL7 v2, sealed spool, TPM 2.0)"
DESCRIPTION = "gatewayd terminates DICOM (DIMSE) and HL7 v2 (MLLP) from the clinic LAN, \
               accepts an object only once it is sealed and durable, keeps its keys in a \
               TPM 2.0 and uploads to the cloud archive over mutual TLS. Only the gatewayd \
               package of the project's Cargo workspace is built."
HOMEPAGE = "https://example.invalid/clinic-gateway"
BUGTRACKER = "https://example.invalid/clinic-gateway/issues"
SECTION = "net"
# The project is Apache-2.0 (Cargo.toml: workspace.package.license) and ships no
# license file of its own, so the checksum is of oe-core's copy of the text.
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

# tss-esapi links libtss2-esys/-mu/-tctildr (found with pkg-config). The device TCTI is
# dlopen()ed at run time, which the shared-library scan cannot see: RDEPENDS below.
DEPENDS += "tpm2-tss"

PV = "0.1.0+git"

# Placeholder location: point it at the project's real repository (or a mirror) in a
# bbappend. SRCREV is the commit gatewayd-crates.inc was generated for: bump both together.
SRC_URI = "git://example.invalid/clinic-gateway.git;protocol=https;branch=main \
           file://gatewayd.service \
           file://gatewayd.toml \
           "
SRCREV = "3c83d4ca481a68a6fcda0831c92b261f82beb8e6"

S = "${WORKDIR}/git"

require ${BPN}-crates.inc

inherit cargo cargo-update-recipe-crates pkgconfig systemd useradd

# The workspace's Cargo.toml is at the top of the checkout: CARGO_SRC_DIR stays empty, so
# CARGO_MANIFEST_PATH is ${S}/Cargo.toml and the workspace's Cargo.lock is used (--frozen).
# Build only the daemon, not every workspace member, with its TPM 2.0 key store: the cargo
# feature `tpm` is opt-in (a build without it refuses keystore.backend = "tpm").
CARGO_SRC_DIR = ""
CARGO_BUILD_FLAGS:append = " --package gatewayd --bin gatewayd --features tpm"

# Rust >= 1.88 is needed (edition 2024, Cargo.lock v4). Skip with a clear reason instead of
# failing deep inside do_compile when the toolchain is scarthgap's own 1.75.
python () {
    want = (1, 88)
    rustversion = (d.getVar('RUSTVERSION') or '').rstrip('%')
    parts = rustversion.split('.')
    try:
        have = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        return
    if have < want:
        raise bb.parse.SkipRecipe("gatewayd needs Rust >= %d.%d but RUSTVERSION is %s: add meta-lts-mixins (branch scarthgap/rust) or another newer Rust" % (want[0], want[1], rustversion))
}

# A static system user (not DynamicUser): the spool on the persistent data partition keeps
# one owner across boots and operators run `gatewayd keys ...` as the same user.
USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --user-group --home-dir ${localstatedir}/lib/gatewayd --no-create-home --shell ${base_sbindir}/nologin gatewayd"

do_install() {
    install -d ${D}${bindir}
    install -m 0755 ${B}/target/${CARGO_TARGET_SUBDIR}/gatewayd ${D}${bindir}/gatewayd

    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${WORKDIR}/gatewayd.service ${D}${systemd_system_unitdir}/gatewayd.service

    install -d -m 0755 ${D}${sysconfdir}/gatewayd
    install -m 0644 ${WORKDIR}/gatewayd.toml ${D}${sysconfdir}/gatewayd/gatewayd.toml
}

CONFFILES:${PN} = "${sysconfdir}/gatewayd/gatewayd.toml"

SYSTEMD_SERVICE:${PN} = "gatewayd.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

# tpm2-tss itself: the tss group and the udev rule that gives it /dev/tpmrm0.
RDEPENDS:${PN} = "libtss2-tcti-device \
                  tpm2-tss \
                  "
