"""`gatewayd check-config`: broken configs are refused naming the key; shipped configs pass.

Pins the contract: exit 0 for a valid file, else non-zero with one line per
problem on stderr naming the key (`dicom.listen: ...`), all of them in one run even
without `[node]`; unknown keys are rejected; `mode = "production"` refuses the software key store; `run` refuses
the same files before listening; every file shipped in config/*.toml is valid.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import gw


def _write(tmp_path: Path, cfg: dict, name: str = "cfg.toml") -> Path:
    p = tmp_path / name
    p.write_text(gw.to_toml(cfg))
    return p


def _valid(tmp_path: Path) -> dict:
    return gw.base_config(tmp_path / "data", gw.free_port(), gw.free_port())


def _check(binary: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([binary, "check-config", "--config", str(path)], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)


def _names(line: str, key) -> bool:
    """A key is a dotted path, or a tuple of words that must all be on the line."""
    if isinstance(key, tuple):
        return all(w in line for w in key)
    return key in line


BROKEN = {
    # case id: (overrides, key that a stderr line must name)
    "bad_listen": ({"dicom": {"listen": "x"}}, ("dicom.listen",)),
    # serde reports an unknown field at its table's path: `dicom: unknown field colour` names it too.
    "unknown_key": ({"dicom": {"colour": "blue"}}, ("dicom.colour", ("dicom", "colour"))),
    "unknown_section": ({"bogus": {"a": 1}}, ("bogus",)),
    "bad_size": ({"spool": {"max_bytes": "lots"}}, ("spool.max_bytes",)),
    "bad_duration": ({"dicom": {"artim_timeout": "soon"}}, ("dicom.artim_timeout",)),
    "ae_title_too_long": ({"dicom": {"ae_title": "THIS_IS_LONGER_THAN_16"}}, ("dicom.ae_title",)),
    "bad_admin_listen": ({"admin": {"listen": "127.0.0.1:notaport"}}, ("admin.listen",)),
    # Which of the two keys the message names is the implementer's choice.
    "production_with_software_keystore": ({"node": {"mode": "production"}}, ("keystore.backend", "node.mode")),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_check_config_rejects_broken_config_naming_the_key(tmp_path, gatewayd_bin, case):
    overrides, keys = BROKEN[case]
    path = _write(tmp_path, gw.deep_merge(_valid(tmp_path), overrides))
    r = _check(gatewayd_bin, path)
    assert r.returncode != 0, f"{case}: check-config exited 0 for\n{path.read_text()}"
    lines = [ln for ln in r.stderr.splitlines() if any(_names(ln, k) for k in keys)]
    assert lines, f"{case}: no stderr line names {' or '.join(map(str, keys))}; stderr was:\n{r.stderr}"


def test_check_config_reports_every_problem_on_its_own_line(tmp_path, gatewayd_bin):
    cfg = gw.deep_merge(_valid(tmp_path), {"dicom": {"listen": "x"}, "spool": {"max_bytes": "lots"}})
    r = _check(gatewayd_bin, _write(tmp_path, cfg))
    assert r.returncode != 0
    named = {k for k in ("dicom.listen", "spool.max_bytes") for ln in r.stderr.splitlines() if k in ln}
    assert named == {"dicom.listen", "spool.max_bytes"}, f"expected a line for each problem; stderr:\n{r.stderr}"
    both = [ln for ln in r.stderr.splitlines() if "dicom.listen" in ln and "spool.max_bytes" in ln]
    assert not both, f"two problems on one line: {both}"


def test_check_config_without_node_names_every_problem_of_every_section(tmp_path, gatewayd_bin):
    # No [node], and one problem in each of four sections: all five are reported in one run.
    path = tmp_path / "no-node.toml"
    path.write_text(
        '[dicom]\nlisten = "nonsense"\n'
        '[hl7]\ncharset = "sjis"\n'
        '[spool]\nmax_bytes = "lots"\n'
        '[admin]\nlisten = "127.0.0.1:notaport"\n'
    )
    r = _check(gatewayd_bin, path)
    assert r.returncode == 2, f"check-config exited {r.returncode}:\n{r.stderr}"
    keys = [ln.split(": ", 1)[0] for ln in r.stderr.splitlines() if ": " in ln]
    assert keys == ["node", "dicom.listen", "hl7.charset", "spool.max_bytes", "admin.listen"], r.stderr
    assert "node: missing required key" in r.stderr.splitlines(), r.stderr


def test_check_config_accepts_the_test_config(tmp_path, gatewayd_bin):
    r = _check(gatewayd_bin, _write(tmp_path, _valid(tmp_path)))
    assert r.returncode == 0, f"check-config rejected the contract's config:\n{r.stderr}"


def test_run_refuses_production_with_software_keystore_before_listening(tmp_path, gatewayd_bin):
    cfg = gw.deep_merge(_valid(tmp_path), {"node": {"mode": "production"}})
    path = _write(tmp_path, cfg)
    r = subprocess.run([gatewayd_bin, "run", "--config", str(path)], capture_output=True, text=True, timeout=20,
                       stdin=subprocess.DEVNULL)
    assert r.returncode != 0, "gatewayd run started in production mode with the software key store"
    assert "keystore.backend" in r.stderr or "node.mode" in r.stderr, r.stderr


@pytest.mark.parametrize("name", ["gatewayd.example.toml", "gatewayd.dev.toml"])
def test_shipped_config_passes_check_config(repo_root, gatewayd_bin, name):
    path = repo_root / "config" / name
    assert path.is_file(), f"config/{name} is missing (the repo must ship it)"
    r = _check(gatewayd_bin, path)
    assert r.returncode == 0, f"check-config rejected config/{name}:\n{r.stderr}"


def test_every_toml_in_config_dir_passes_check_config(repo_root, gatewayd_bin):
    tomls = sorted((repo_root / "config").glob("*.toml"))
    assert tomls, "config/ has no .toml file"
    bad = {}
    for p in tomls:
        r = _check(gatewayd_bin, p)
        if r.returncode != 0:
            bad[p.name] = r.stderr.strip()
    assert not bad, f"check-config rejected: {bad}"
