SUMMARY = "Clinic edge gateway appliance image (reference)"
DESCRIPTION = "core-image-minimal's contents plus gatewayd, on a read-only root file \
               system. Needs systemd and tpm in DISTRO_FEATURES (see \
               kas/clinic-gateway.yml) and persistent storage mounted at \
               /var/lib/gatewayd for the spool (see the layer's README)."
LICENSE = "MIT"

IMAGE_INSTALL = "packagegroup-core-boot \
                 packagegroup-clinic-gateway \
                 ${CORE_IMAGE_EXTRA_INSTALL} \
                 "
IMAGE_LINGUAS = " "
IMAGE_FEATURES += "read-only-rootfs"

REQUIRED_DISTRO_FEATURES = "systemd tpm"

inherit core-image features_check

IMAGE_ROOTFS_SIZE ?= "8192"
IMAGE_ROOTFS_EXTRA_SPACE:append = " + 4096"
