"""yocto-layer/ (meta-clinic-gateway): what can be checked without a Yocto build host.

- gatewayd-crates.inc is exactly what yocto-layer/scripts/gen-crates-inc.py makes from
  Cargo.lock, and lists every crates.io package of Cargo.lock once, with its checksum;
- oelint-adv (hw-tests/requirements.txt) finds no error in any recipe, append, include or
  class of the layer (warnings and infos are listed in the test's output);
- the layer's default config passes `gatewayd check-config`, and its systemd unit is the
  hardened one the recipe installs.

No bitbake build happens here: see yocto-layer/README.md for what that leaves unverified.
Nothing skips: a missing oelint-adv or systemd-analyze is a failure saying how to install it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYER = REPO / "yocto-layer"
GEN = LAYER / "scripts" / "gen-crates-inc.py"
RECIPE_DIR = LAYER / "recipes-gateway" / "gatewayd"
CRATES_INC = RECIPE_DIR / "gatewayd-crates.inc"
RECIPE = RECIPE_DIR / "gatewayd_git.bb"
UNIT = RECIPE_DIR / "files" / "gatewayd.service"
LAYER_CONFIG = RECIPE_DIR / "files" / "gatewayd.toml"
CRATES_IO = "registry+https://github.com/rust-lang/crates.io-index"
REGENERATE = "python3 yocto-layer/scripts/gen-crates-inc.py"

# HOMEPAGE is a placeholder (example.invalid) and this rule fetches it over the network:
# CI must not depend on the network. Every other rule runs.
OELINT_SUPPRESSED = ["oelint.vars.homepageping"]
OELINT_LINE = re.compile(r"^(?P<path>.+?):(?P<line>\d+):(?P<severity>error|warning|info):(?P<rule>[^:]+):(?P<msg>.*)$")


def registry_packages() -> list[tuple[str, str, str]]:
    lock = tomllib.loads((REPO / "Cargo.lock").read_text())
    return [(p["name"], p["version"], p.get("checksum", "")) for p in lock["package"] if p.get("source") == CRATES_IO]


def run_gen(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GEN), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- gatewayd-crates.inc


def test_crates_inc_is_regenerated_byte_for_byte_from_cargo_lock(tmp_path):
    out = tmp_path / "gatewayd-crates.inc"
    r = run_gen("--lock", str(REPO / "Cargo.lock"), "--output", str(out))
    assert r.returncode == 0, f"gen-crates-inc.py failed:\n{r.stderr}"
    fresh, committed = out.read_bytes(), CRATES_INC.read_bytes()
    if fresh != committed:
        pytest.fail(
            f"{CRATES_INC.relative_to(REPO)} is stale: it does not match Cargo.lock. "
            f"Regenerate it with `{REGENERATE}` and commit it (and bump SRCREV in "
            f"{RECIPE.relative_to(REPO)} to a commit with this Cargo.lock).",
            pytrace=False,
        )
    # The --check mode CI users may call by hand agrees.
    r = run_gen("--check")
    assert r.returncode == 0, r.stderr


def test_crates_inc_lists_each_registry_package_of_cargo_lock_once_with_its_checksum():
    text = CRATES_INC.read_text()
    uris = re.findall(r"crate://crates\.io/([^/\s]+)/([^\s\\]+)", text)
    sums = dict(re.findall(r'^SRC_URI\[([^\]]+)\.sha256sum\] = "([0-9a-f]{64})"$', text, re.M))
    sum_lines = re.findall(r"^SRC_URI\[([^\]]+)\.sha256sum\]", text, re.M)
    packages = registry_packages()
    assert len(packages) > 100, "Cargo.lock has suspiciously few crates.io packages"

    want = {(n, v) for n, v, _ in packages}
    dup_uris = sorted({u for u in uris if uris.count(u) > 1})
    assert not dup_uris, f"crate:// entries listed more than once: {dup_uris}"
    dup_sums = sorted({s for s in sum_lines if sum_lines.count(s) > 1})
    assert not dup_sums, f"checksums set more than once: {dup_sums}"
    missing = sorted(want - set(uris))
    extra = sorted(set(uris) - want)
    assert not missing, f"crates.io packages of Cargo.lock without a crate:// entry: {missing}; run `{REGENERATE}`"
    assert not extra, f"crate:// entries that are not in Cargo.lock: {extra}; run `{REGENERATE}`"
    for name, version, checksum in packages:
        key = f"{name}-{version}"
        assert checksum, f"Cargo.lock has no checksum for {key}"
        assert sums.get(key) == checksum, f"{key}: .inc sha256sum {sums.get(key)!r} != Cargo.lock {checksum!r}"
    assert set(sums) == {f"{n}-{v}" for n, v in want}, "checksums for packages that are not listed"
    # Workspace members are built from the checkout, never fetched as crates.
    lock = tomllib.loads((REPO / "Cargo.lock").read_text())
    members = {p["name"] for p in lock["package"] if "source" not in p}
    assert "gatewayd" in members
    assert not members & {n for n, _ in uris}, "a workspace member is listed as a crates.io crate"


def test_crates_inc_generator_refuses_a_git_dependency_instead_of_dropping_it(tmp_path):
    lock = tmp_path / "Cargo.lock"
    lock.write_text(
        "version = 4\n\n"
        '[[package]]\nname = "a"\nversion = "1.0.0"\n'
        f'source = "{CRATES_IO}"\nchecksum = "{"0" * 64}"\n\n'
        '[[package]]\nname = "b"\nversion = "0.1.0"\n'
        'source = "git+https://example.invalid/b.git#0123456789abcdef0123456789abcdef01234567"\n'
    )
    out = tmp_path / "x.inc"
    r = run_gen("--lock", str(lock), "--output", str(out), cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "b 0.1.0" in r.stderr and "not crates.io" in r.stderr, r.stderr
    assert not out.exists(), "a partial .inc was written"


def test_crates_inc_generator_output_does_not_depend_on_where_it_runs(tmp_path):
    a, b = tmp_path / "a.inc", tmp_path / "b.inc"
    assert run_gen("--output", str(a), cwd=REPO).returncode == 0
    assert run_gen("--output", str(b), cwd=tmp_path).returncode == 0
    assert a.read_bytes() == b.read_bytes() == CRATES_INC.read_bytes()


# ---------------------------------------------------------------- oelint-adv


def oelint_adv() -> str:
    """oelint-adv from the venv that runs pytest (hw-tests/.venv), else from PATH."""
    beside = Path(sys.executable).parent / "oelint-adv"
    if beside.exists():
        return str(beside)
    found = shutil.which("oelint-adv")
    if found:
        return found
    pytest.fail(
        "oelint-adv not found (neither beside the Python running pytest nor on PATH). It is "
        "pinned in hw-tests/requirements.txt: `hw-tests/.venv/bin/pip install -r "
        "hw-tests/requirements.txt` (bash hw-tests/run-all.sh does this).",
        pytrace=False,
    )


def layer_metadata_files() -> list[Path]:
    files = sorted(p for p in LAYER.rglob("*") if p.is_file() and p.suffix in {".bb", ".bbappend", ".inc", ".bbclass"})
    assert RECIPE in files and CRATES_INC in files, files
    return files


def run_oelint(files: list[Path]) -> list[dict]:
    cmd = [
        oelint_adv(),
        "--release",
        "scarthgap",
        "--quiet",
        "--jobs",
        "1",
        "--messageformat",
        "{path}:{line}:{severity}:{id}:{msg}",
        *[a for rule in OELINT_SUPPRESSED for a in ("--suppress", rule)],
        *map(str, files),
    ]
    env = dict(os.environ, NO_COLOR="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=LAYER)
    findings, unparsed = [], []
    for line in (r.stdout + r.stderr).splitlines():
        if not line.strip():
            continue
        m = OELINT_LINE.match(line)
        if m:
            findings.append(m.groupdict())
        else:
            unparsed.append(line)
    assert not unparsed, f"oelint-adv printed something that is not a finding (exit {r.returncode}):\n" + "\n".join(unparsed)
    # Exit status: 0 without findings, non-zero with any finding (warnings included).
    assert (r.returncode == 0) == (not findings), (r.returncode, findings)
    return findings


def test_oelint_adv_reports_errors_it_is_given(tmp_path):
    """The gate below is not vacuous: this oelint-adv sees an error-level finding."""
    bad = tmp_path / "broken_1.0.bb"
    bad.write_text('SRC_URI += " file://x"\n')
    findings = run_oelint([bad])
    assert any(f["severity"] == "error" for f in findings), findings


def test_oelint_adv_scarthgap_finds_no_error_in_the_layer(request):
    files = layer_metadata_files()
    findings = run_oelint(files)
    listing = "\n".join(
        f"{Path(f['path']).resolve().relative_to(LAYER)}:{f['line']}: {f['severity']}: {f['rule']}: {f['msg']}" for f in findings
    )
    request.node.add_report_section("call", "oelint-adv findings", listing or "(none)")
    print(f"oelint-adv --release scarthgap over {len(files)} files:\n{listing or '(no findings)'}")
    errors = [f for f in findings if f["severity"] == "error"]
    assert not errors, "oelint-adv errors in yocto-layer/:\n" + "\n".join(
        line for line in listing.splitlines() if ": error: " in line
    )


# ---------------------------------------------------------------- layer wiring


def bb_value(text: str, var: str) -> str:
    """The value of `VAR = "..."` (continuation lines joined) in a recipe or conf file."""
    m = re.search(rf'^{re.escape(var)}\s*(?:=|\+=|\?=)\s*"((?:[^"\\]|\\.|\\\n)*)"', text, re.M)
    assert m, f"{var} not set"
    return " ".join(m.group(1).replace("\\\n", " ").split())


def test_layer_conf_names_the_collection_its_dependencies_and_scarthgap():
    conf = (LAYER / "conf" / "layer.conf").read_text()
    assert "clinic-gateway" in bb_value(conf, "BBFILE_COLLECTIONS").split()
    assert bb_value(conf, "LAYERSERIES_COMPAT_clinic-gateway").split() == ["scarthgap"]
    assert {"core", "tpm-layer"} <= set(bb_value(conf, "LAYERDEPENDS_clinic-gateway").split())
    assert bb_value(conf, "BBFILE_PATTERN_clinic-gateway") == "^${LAYERDIR}/"
    assert bb_value(conf, "BBFILE_PRIORITY_clinic-gateway").isdigit()


def test_recipe_builds_only_gatewayd_and_installs_unit_and_conffile():
    bb = RECIPE.read_text()
    assert "require ${BPN}-crates.inc" in bb
    assert {"cargo", "cargo-update-recipe-crates", "systemd"} <= set(
        re.search(r"^inherit (.+)$", bb, re.M).group(1).split()
    )
    assert "--package gatewayd" in bb_value(bb, "CARGO_BUILD_FLAGS:append")
    assert "tpm2-tss" in bb_value(bb, "DEPENDS").split()
    assert "libtss2-tcti-device" in bb_value(bb, "RDEPENDS:${PN}").split()
    assert bb_value(bb, "SYSTEMD_SERVICE:${PN}") == UNIT.name
    assert bb_value(bb, "CONFFILES:${PN}") == "${sysconfdir}/gatewayd/gatewayd.toml"
    src_uri = bb_value(bb, "SRC_URI").split()
    assert f"file://{UNIT.name}" in src_uri and f"file://{LAYER_CONFIG.name}" in src_uri
    assert re.fullmatch(r"[0-9a-f]{40}", bb_value(bb, "SRCREV")), "SRCREV must pin a full commit id"
    # The unit runs the binary and the config where do_install puts them.
    unit = UNIT.read_text()
    assert "${bindir}/gatewayd" in bb and "${sysconfdir}/gatewayd/gatewayd.toml" in bb
    # It runs the effective config on the data partition, copied from the default in /etc once.
    assert "ExecStart=/usr/bin/gatewayd run --config /var/lib/gatewayd/config/gatewayd.toml" in unit.splitlines()
    assert any(line.startswith("ExecStartPre=") and "cp /etc/gatewayd/gatewayd.toml" in line
               for line in unit.splitlines()), "the unit does not copy the default config to the data partition"


def test_layer_default_config_passes_check_config(gatewayd_bin):
    r = subprocess.run([gatewayd_bin, "check-config", "--config", str(LAYER_CONFIG)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"check-config rejected {LAYER_CONFIG.relative_to(REPO)}:\n{r.stdout}{r.stderr}"
    cfg = tomllib.loads(LAYER_CONFIG.read_text())
    assert cfg["node"]["mode"] == "production" and cfg["keystore"]["backend"] == "tpm"
    assert cfg["node"]["data_dir"] == "/var/lib/gatewayd", "data_dir must be the unit's StateDirectory"


def test_layer_unit_is_hardened_per_systemd_analyze():
    unit = UNIT.read_text().splitlines()
    for setting in [
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "ProtectSystem=strict",
        "StateDirectory=gatewayd",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/tpmrm0 rw",
        "UMask=0077",
        "MemoryDenyWriteExecute=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
    ]:
        assert setting in unit, f"{UNIT.relative_to(REPO)} lacks {setting}"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail(
            "systemd-analyze not found: `apt-get install -y --no-install-recommends systemd` "
            "(bash hw-tests/run-all.sh does this).",
            pytrace=False,
        )
    r = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=20", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert r.returncode == 0 and score, f"systemd-analyze security (exit {r.returncode}):\n{r.stdout[-3000:]}{r.stderr}"
    assert float(score.group(1)) <= 2.0, f"exposure {score.group(1)} > 2.0:\n{r.stdout}"
