"""The README's first command works on a fresh machine; every production artefact has the TPM.

`cargo run --release -p gatewayd -- run` must build and serve without libtss2-dev or
pkg-config: the TPM 2.0 key store is the opt-in cargo feature `tpm`. Pinned here:

- `gatewayd` builds with its default features while pkg-config cannot find tss2
  (`PKG_CONFIG_LIBDIR=/nonexistent PKG_CONFIG_PATH=`), in the workspace's debug profile
  (it shares almost everything with `cargo test`), and does not link libtss2;
- that binary runs the embedded development config (no `--config`, as in the README)
  until `/healthz` answers, then stops cleanly on SIGTERM;
- it refuses `keystore.backend = "tpm"` in `check-config` and `run`, naming the missing
  cargo feature, before creating anything on disk;
- the production artefacts turn the feature on: run-all.sh's release build, clippy and
  tests, the Yocto recipe, the appliance recipe; the binary under test (`GATEWAYD`, the
  one the appliance installs) links libtss2-esys.

The development config listens on its fixed ports (DICOM 127.0.0.1:11112, admin
127.0.0.1:9464); the test fails with a clear message if either is taken.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import gw

REPO = Path(__file__).resolve().parent.parent
# pkg-config finds nothing: what a machine without libtss2-dev looks like to a build script.
NO_TSS2 = {"PKG_CONFIG_LIBDIR": "/nonexistent", "PKG_CONFIG_PATH": "", "PKG_CONFIG_SYSROOT_DIR": ""}
DEV_PORTS = (11112, 9464)
READY_S = 30.0


def _cargo() -> str:
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.fail("cargo not found on PATH: the fresh-build test builds gatewayd itself", pytrace=False)
    return cargo


def _target_dir(cargo: str) -> Path:
    r = subprocess.run([cargo, "metadata", "--format-version", "1", "--no-deps"], cwd=REPO,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"cargo metadata failed:\n{r.stderr}"
    return Path(json.loads(r.stdout)["target_directory"])


def _ldd(binary: Path | str) -> str:
    r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"ldd {binary} failed: {r.stderr}"
    return r.stdout


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def fresh_gatewayd(tmp_path_factory) -> Path:
    """gatewayd built with its default features, libtss2 hidden from pkg-config."""
    cargo = _cargo()
    env = {**os.environ, **NO_TSS2}
    hidden = subprocess.run(["pkg-config", "--exists", "tss2-esys"], env=env, capture_output=True,
                            stdin=subprocess.DEVNULL) if shutil.which("pkg-config") else None
    assert hidden is None or hidden.returncode != 0, "pkg-config still finds tss2-esys: the test proves nothing"
    r = subprocess.run([cargo, "build", "-p", "gatewayd"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=1500, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, (
        "gatewayd does not build with its default features when pkg-config cannot find tss2 "
        f"(the README's first command on a fresh machine):\n{r.stderr[-4000:]}"
    )
    built = _target_dir(cargo) / "debug" / "gatewayd"
    assert built.is_file(), f"cargo build succeeded but {built} is missing"
    # A copy: the next debug build of the workspace (cargo test) replaces target/debug/gatewayd.
    binary = tmp_path_factory.mktemp("fresh") / "gatewayd"
    shutil.copy2(built, binary)
    return binary


def _tpm_config(tmp_path: Path) -> Path:
    # Development mode: the only reason to refuse it is the missing back end.
    cfg = {
        "node": {"id": "fresh", "data_dir": str(tmp_path / "data"), "mode": "development"},
        "keystore": {"backend": "tpm"},
    }
    path = tmp_path / "tpm.toml"
    path.write_text(gw.to_toml(cfg))
    return path


@pytest.mark.timeout(1800)
def test_default_build_needs_no_libtss2_and_does_not_link_it(fresh_gatewayd):
    libs = _ldd(fresh_gatewayd)
    assert "libtss2" not in libs, f"the default build links libtss2:\n{libs}"


@pytest.mark.timeout(1800)
def test_default_build_serves_the_embedded_development_config(fresh_gatewayd, tmp_path):
    taken = [p for p in DEV_PORTS if not _port_is_free(p)]
    assert not taken, f"127.0.0.1 ports {taken} of config/gatewayd.dev.toml are in use: stop what holds them"
    log = (tmp_path / "gatewayd.log").open("w")
    proc = subprocess.Popen([str(fresh_gatewayd), "run"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + READY_S
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen("http://127.0.0.1:9464/healthz", timeout=2) as resp:
                    status = resp.status
                    if status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        text = (tmp_path / "gatewayd.log").read_text(errors="replace")
        assert proc.poll() is None, f"gatewayd run exited {proc.returncode}:\n{text[-3000:]}"
        assert status == 200, f"/healthz did not answer 200 within {READY_S:.0f} s:\n{text[-3000:]}"
        assert (tmp_path / "gatewayd-data").is_dir(), "the development data folder ./gatewayd-data was not made"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, f"gatewayd did not stop cleanly:\n{text[-3000:]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.mark.timeout(1800)
def test_default_build_refuses_the_tpm_key_store_naming_the_feature(fresh_gatewayd, tmp_path):
    path = _tpm_config(tmp_path)
    r = subprocess.run([str(fresh_gatewayd), "check-config", "--config", str(path)], capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2, f"check-config exited {r.returncode}: {r.stdout}{r.stderr}"
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("keystore.backend: ")]
    assert lines, f"no `keystore.backend: ...` line:\n{r.stderr}"
    assert "cargo feature `tpm`" in lines[0] and "--features tpm" in lines[0], lines[0]

    r = subprocess.run([str(fresh_gatewayd), "run", "--config", str(path)], capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2, f"run exited {r.returncode}:\n{r.stderr}"
    assert "keystore.backend" in r.stderr and "--features tpm" in r.stderr, r.stderr
    assert not (tmp_path / "data").exists(), "run created the data folder before refusing the config"


def test_production_artefacts_build_with_the_tpm_feature(gatewayd_bin):
    run_all = (REPO / "hw-tests" / "run-all.sh").read_text()
    assert "cargo build --release -p gatewayd --features tpm" in run_all
    assert "cargo test --workspace --features gatewayd/tpm" in run_all
    assert "cargo clippy --workspace --all-targets --features gatewayd/tpm" in run_all
    recipe = (REPO / "yocto-layer" / "recipes-gateway" / "gatewayd" / "gatewayd_git.bb").read_text()
    flags = [ln for ln in recipe.splitlines() if ln.startswith("CARGO_BUILD_FLAGS:append")]
    assert flags and "--features tpm" in flags[0], flags
    assert "libtss2-esys" in (REPO / "image-recipe" / "build.sh").read_text()
    # The binary the hw-tests and the appliance use has the TPM back end.
    libs = _ldd(gatewayd_bin)
    assert "libtss2-esys" in libs, f"GATEWAYD={gatewayd_bin} was built without --features tpm:\n{libs}"
