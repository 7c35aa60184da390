#!/usr/bin/env bash
# The project's test command: `bash hw-tests/run-all.sh [extra pytest args]`.
#
# Installs the real peers when missing (Debian: dcmtk, dicom3tools (dciodvfy), orthanc, orthanc-dicomweb, swtpm,
# tpm2-tools, libtss2, nginx, openssl, mosquitto, mosquitto-clients,
# pkg-config, systemd (systemd-analyze), chromium, fonts-ipafont-gothic, mmdebstrap,
# e2fsprogs, qemu-system-x86, dnsmasq-base, rauc, squashfs-tools; PyPI into hw-tests/.venv: hw-tests/requirements.txt,
# oelint-adv and schemathesis among them), then runs
#   cargo build --release --features tpm, then (without pytest arguments) the appliance lane of
#   pytest (the QEMU tests) in the background, cargo fmt --check, cargo clippy -D warnings,
#   cargo test (both with the TPM back end: --features gatewayd/tpm), the fuzz targets,
#   cargo-deny, and pytest -v over every other test; all against target/release/gatewayd
#   (with extra pytest args: the checks, then one pytest with them over everything;
#   test_appliance.py builds the appliance image into hw-tests/.cache/ once per binary+recipe
#   and boots it in QEMU;
#   test_fresh_build.py builds gatewayd with its default features, libtss2 hidden from
#   pkg-config, and runs it: the README's first command on a fresh machine)
# Works on a fresh Debian 12 with the Rust toolchain and python3, as root or with sudo.
#
# HW_TESTS_ONLY=1 skips fmt/clippy/cargo test (still builds the release binary):
# for iterating on hw-tests only. CI never sets it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

banner() {
    printf '\n==================== %s ====================\n' "$*"
}

# A from-scratch run: no incremental cache (it doubled target/debug, 3.6 GB of 15 GB, and
# a fresh build does not use it). A developer may set CARGO_INCREMENTAL=1 for local runs.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

# The builds need room: debug (clippy + tests) ~5 GB, fuzz ~2.5 GB, release ~1 GB, the
# appliance image and QEMU disks ~3 GB. A full disk shows up as a linker "Bus error"
# (signal 7) or a torn file, far from its cause: say it plainly, before and during the run.
disk_check() {
    local target=${CARGO_TARGET_DIR:-$ROOT/target}
    mkdir -p "$target"
    local free_kb
    free_kb=$(df -Pk "$target" | awk 'NR==2 {print $4}')
    echo "disk: $((free_kb / 1024)) MiB free under $target ($1)"
    if [ "$free_kb" -lt $((2 * 1024 * 1024)) ]; then
        echo "run-all.sh: only $((free_kb / 1024)) MiB free under $target before $1; the run needs about 12 GiB in all" >&2
        exit 1
    fi
}

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi

banner "peers: Debian packages"
need_pkgs=()
for tool in echoscu storescu storescp; do
    command -v "$tool" >/dev/null 2>&1 || { need_pkgs+=(dcmtk); break; }
done
# dciodvfy (David Clunie's validator) judges the de-identified objects (test_deid.py).
command -v dciodvfy >/dev/null 2>&1 || need_pkgs+=(dicom3tools)
[ -x /usr/sbin/Orthanc ] || command -v Orthanc >/dev/null 2>&1 || need_pkgs+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_pkgs+=(orthanc-dicomweb)
command -v pkg-config >/dev/null 2>&1 || need_pkgs+=(pkg-config)
# TPM: libtss2 to build tss-esapi, the TCTIs to reach a TPM, swtpm as the test TPM.
pkg-config --exists tss2-esys 2>/dev/null || need_pkgs+=(libtss2-dev)
[ -e /usr/lib/x86_64-linux-gnu/libtss2-tcti-swtpm.so.0 ] || [ -e /usr/lib/aarch64-linux-gnu/libtss2-tcti-swtpm.so.0 ] || need_pkgs+=(libtss2-tcti-swtpm0)
[ -e /usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0 ] || [ -e /usr/lib/aarch64-linux-gnu/libtss2-tcti-device.so.0 ] || need_pkgs+=(libtss2-tcti-device0)
command -v swtpm >/dev/null 2>&1 || need_pkgs+=(swtpm swtpm-tools)
# The audit repository of test_audit_syslog.py: rsyslog with its GnuTLS stream driver.
[ -x /usr/sbin/rsyslogd ] || need_pkgs+=(rsyslog)
ls /usr/lib/*/rsyslog/lmnsd_gtls.so >/dev/null 2>&1 || need_pkgs+=(rsyslog-gnutls)
command -v tpm2_pcrextend >/dev/null 2>&1 || need_pkgs+=(tpm2-tools)
# mutual-TLS ingress in front of Orthanc, and the test CA.
command -v nginx >/dev/null 2>&1 || need_pkgs+=(nginx)
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
# The vendor's fleet broker (TLS, client certificates, ACL) and its command-line clients.
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || need_pkgs+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 && command -v mosquitto_sub >/dev/null 2>&1 || need_pkgs+=(mosquitto-clients)
# systemd-analyze scores the Yocto layer's unit (test_yocto_layer.py); containers may lack systemd.
command -v systemd-analyze >/dev/null 2>&1 || need_pkgs+=(systemd)
# The kiosk page test drives a real headless browser (DevTools protocol), and hashes the
# kiosk certificate's public key with openssl (above) for Chromium to trust only that.
command -v chromium >/dev/null 2>&1 || need_pkgs+=(chromium)
# A Japanese font, so that the page's screenshot (hw-tests/artifacts/) shows the kanji/kana.
[ -n "$(fc-list :lang=ja 2>/dev/null)" ] || need_pkgs+=(fonts-ipafont-gothic)
# The appliance image (image-recipe/build.sh) and its boot test: mmdebstrap builds the root
# folder, mkfs.ext4 -d the images, QEMU (TCG) boots it with swtpm as its TPM;
# systemd-analyze scores the unit (hw-tests/test_unit.py).
command -v mmdebstrap >/dev/null 2>&1 || need_pkgs+=(mmdebstrap)
command -v mkfs.ext4 >/dev/null 2>&1 || need_pkgs+=(e2fsprogs)
command -v qemu-system-x86_64 >/dev/null 2>&1 || need_pkgs+=(qemu-system-x86)
# Signed update bundles (image-recipe/bundle.sh, hw-tests/test_update_bundle.py): rauc makes,
# checks and installs them; rauc bundle runs mksquashfs.
command -v rauc >/dev/null 2>&1 || need_pkgs+=(rauc)
command -v mksquashfs >/dev/null 2>&1 || need_pkgs+=(squashfs-tools)
# test_update_bundle.py also runs RAUC's service on a private D-Bus bus and builds a small
# preloaded library with cc (veritysetup, mkfs.fat and mtools: the A/B disk's lines below).
command -v dbus-daemon >/dev/null 2>&1 || need_pkgs+=(dbus-daemon)
command -v cc >/dev/null 2>&1 || need_pkgs+=(gcc)
# The test DNS server the appliance guest resolves the broker's host name with
# (test_appliance_fleet.py, on 127.0.0.1 and a port the test picks): dnsmasq-base is the
# binary alone; the `dnsmasq` package would also start a system resolver on port 53.
[ -x /usr/sbin/dnsmasq ] || command -v dnsmasq >/dev/null 2>&1 || need_pkgs+=(dnsmasq-base)
# The A/B UEFI disk (build.sh: veritysetup, the systemd-stub for the UKIs, FAT and GPT
# without mounts or loop devices) and OVMF, the UEFI firmware QEMU boots it with
# (test_appliance_ab.py).
command -v veritysetup >/dev/null 2>&1 || need_pkgs+=(cryptsetup-bin)
[ -f /usr/lib/systemd/boot/efi/linuxx64.efi.stub ] || need_pkgs+=(systemd-boot-efi)
command -v mkfs.fat >/dev/null 2>&1 || need_pkgs+=(dosfstools)
command -v mcopy >/dev/null 2>&1 || need_pkgs+=(mtools)
command -v sfdisk >/dev/null 2>&1 || need_pkgs+=(fdisk)
[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || need_pkgs+=(ovmf)
# The DICOM audit message schema (hw-tests/schema/*.rnc, RELAX NG compact) is converted
# with trang and audit messages validated with xmllint (test_audit_a5.py).
command -v trang >/dev/null 2>&1 || need_pkgs+=(trang)
command -v xmllint >/dev/null 2>&1 || need_pkgs+=(libxml2-utils)
# Debian's python3 has no ensurepip without python3-venv.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    echo "installing: ${need_pkgs[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
else
    echo "all Debian peers already installed"
fi
# The orthanc, nginx, mosquitto and rsyslog packages start system services (4242/8042, 80,
# 1883, the system log): tests start their own.
for svc in orthanc nginx mosquitto rsyslog; do
    if [ -e "/etc/init.d/$svc" ]; then
        "${SUDO[@]}" service "$svc" stop >/dev/null 2>&1 || true
        "${SUDO[@]}" update-rc.d "$svc" disable >/dev/null 2>&1 || true
    fi
done
echo "DCMTK: $(storescu --version 2>&1 | head -n 1)"

banner "peers: Python venv (hw-tests/.venv)"
VENV=$ROOT/hw-tests/.venv
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp=$VENV/.requirements.sha256
want=$(sha256sum hw-tests/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r hw-tests/requirements.txt
    echo "$want" >"$stamp"
else
    echo "requirements unchanged since last install"
fi
"$VENV/bin/python" -c 'import pydicom, pynetdicom, pytest; print("pydicom", pydicom.__version__, "pynetdicom", pynetdicom.__version__, "pytest", pytest.__version__)'
"$VENV/bin/oelint-adv" --version
"$VENV/bin/python" -c 'import schemathesis, websocket; print("schemathesis", schemathesis.__version__, "websocket-client", websocket.__version__)'
echo "$(chromium --version 2>/dev/null | head -n 1)"

# The binary of the hw-tests and the appliance: with the TPM key store (test_appliance.py
# checks that it links libtss2-esys).
disk_check "the release build"
banner "cargo build --release -p gatewayd --features tpm"
cargo build --release -p gatewayd --features tpm
GATEWAYD=${CARGO_TARGET_DIR:-$ROOT/target}/release/gatewayd
ls -l "$GATEWAYD"

export GATEWAYD

# With pytest arguments: the checks below, then one pytest with them over every test.
# Without: two pytest lanes. The appliance lane (the image build and every QEMU boot: mostly
# guest CPU time and waits inside the guest) starts now, beside the cargo checks and then
# beside the other lane (mostly waits on its peers); together they take about the time of
# the longest. Each lane's report is whole: the appliance lane's comes last. The lanes share
# no files (the appliance lane alone uses hw-tests/.cache/appliance-* and .cache/update-ca).
# Both report their slowest tests (--durations): the run must stay under an hour.
APPLIANCE_LANE=(hw-tests/test_appliance.py hw-tests/test_appliance_ab.py hw-tests/test_appliance_fleet.py
                hw-tests/test_appliance_update.py hw-tests/test_powercut.py)
lane_pid=
lane_log=
stop_lane() {
    # An early failure of the foreground: stop the lane the way Ctrl-C would (pytest's
    # teardown kills its QEMU, swtpm and peers), then show what it had done.
    if [ -n "$lane_pid" ] && kill -0 "$lane_pid" 2>/dev/null; then
        kill -INT "$lane_pid" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$lane_pid" 2>/dev/null || break; sleep 1; done
        kill -KILL "$lane_pid" 2>/dev/null || true
        echo "--- appliance lane stopped early; its log so far:"
        cat "$lane_log" 2>/dev/null || true
    fi
    [ -z "$lane_log" ] || rm -f "$lane_log"
}
if [ "$#" -eq 0 ]; then
    disk_check "pytest (appliance lane)"
    lane_log=$(mktemp "${TMPDIR:-/tmp}/gw-appliance-lane.XXXXXX")
    trap stop_lane EXIT
    banner "pytest -v: appliance lane (${APPLIANCE_LANE[*]}) in the background, report at the end"
    t_lane=$(date +%s)
    # A background job of a non-interactive shell starts with SIGINT ignored, and Python then
    # keeps ignoring it: install Python's own handler (KeyboardInterrupt) so stop_lane works.
    "$VENV/bin/python" -c 'import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); import pytest; sys.exit(pytest.main(sys.argv[1:]))' \
        -v --durations=0 "${APPLIANCE_LANE[@]}" >"$lane_log" 2>&1 &
    lane_pid=$!
fi

if [ "${HW_TESTS_ONLY:-0}" != 1 ]; then
    disk_check "the debug builds"
    banner "cargo fmt --all --check"
    cargo fmt --all --check

    banner "architecture rules (hw-tests/lint_rules.sh: no Result<_, String> in library APIs, one id check, one list of key labels)"
    bash hw-tests/lint_rules.sh

    # The TPM back end is an opt-in feature of gatewayd: lint and test it too.
    banner "cargo clippy --workspace --all-targets --features gatewayd/tpm -- -D warnings"
    cargo clippy --workspace --all-targets --features gatewayd/tpm -- -D warnings

    banner "cargo test --workspace --features gatewayd/tpm"
    cargo test --workspace --features gatewayd/tpm

    disk_check "the fuzz builds"
    banner "fuzz targets run (hw-tests/fuzz.sh: every target of gateway/{dicom,hl7,fleet,exchange}/fuzz, ${FUZZ_SECONDS:-30} s each, seed corpus in the repo)"
    bash hw-tests/fuzz.sh

    banner "dependency policy: advisories (offline snapshot), licenses, bans, sources"
    bash hw-tests/deny.sh
else
    banner "HW_TESTS_ONLY=1: fmt, clippy and cargo test not run"
fi

disk_check "pytest"
if [ "$#" -gt 0 ]; then
    banner "pytest -v hw-tests $* (real peers)"
    exec "$VENV/bin/python" -m pytest -v hw-tests "$@"
fi

banner "pytest -v hw-tests: every test outside the appliance lane (real peers)"
t_other=$(date +%s)
deselect=()
for f in "${APPLIANCE_LANE[@]}"; do
    deselect+=(--ignore="$f")
done
rc=0
"$VENV/bin/python" -m pytest -v --durations=25 hw-tests "${deselect[@]}" || rc=$?
echo "other lane: exit $rc after $(( $(date +%s) - t_other )) s"
lane_rc=0
wait "$lane_pid" || lane_rc=$?
lane_pid=
banner "pytest -v: appliance lane report (exit $lane_rc, $(( $(date +%s) - t_lane )) s)"
cat "$lane_log"
if [ "$rc" -ne 0 ] || [ "$lane_rc" -ne 0 ]; then
    echo "run-all.sh: pytest failed (other lane exit $rc, appliance lane exit $lane_rc)" >&2
    exit 1
fi
