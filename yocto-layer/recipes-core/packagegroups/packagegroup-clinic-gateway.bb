SUMMARY = "Clinic edge gateway: the daemon and its TPM 2.0 run time"
DESCRIPTION = "gatewayd with the TPM device TCTI it loads at run time, and tpm2-tools \
               (a recommendation: BAD_RECOMMENDATIONS drops it) for provisioning and \
               diagnosis."
SECTION = "net"
LICENSE = "MIT"

# Not allarch: libtss2-tcti-device gets a per-architecture name from debian.bbclass.
PACKAGE_ARCH = "${TUNE_PKGARCH}"

inherit packagegroup

RDEPENDS:${PN} = "gatewayd \
                  libtss2-tcti-device \
                  "
RRECOMMENDS:${PN} = "tpm2-tools"
