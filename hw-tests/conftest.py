"""Fixtures shared by the real-peer tests.

Nothing here skips: a missing peer tool or a missing gatewayd binary is a
failure with a message saying what to install or build.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gw  # noqa: E402
import pki  # noqa: E402
import tpm  # noqa: E402
import scu  # noqa: E402

REPO = HERE.parent


@pytest.fixture(scope="session", autouse=True)
def dcmtk_tools():
    """DCMTK's echoscu/storescu/storescp must be on PATH (Debian package `dcmtk`)."""
    missing = scu.missing_dcmtk_tools()
    if missing:
        pytest.fail(
            f"DCMTK tools not found on PATH: {', '.join(missing)}. Install them with "
            "`apt-get install -y --no-install-recommends dcmtk` (hw-tests/run-all.sh does this).",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def gatewayd_bin() -> str:
    try:
        return gw.gatewayd_binary()
    except AssertionError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def gateway_factory(tmp_path, gatewayd_bin):
    """``make(overrides=None, start=True, name=...)`` -> a `gw.Gateway` in its
    own subfolder of tmp_path. Every process is SIGKILLed at teardown if still alive."""
    made: list[gw.Gateway] = []

    def make(overrides: dict | None = None, start: bool = True, name: str | None = None) -> gw.Gateway:
        name = name or f"gw{len(made)}"
        g = gw.Gateway(tmp_path / name, overrides, name=name)
        made.append(g)
        if start:
            g.start()
        return g

    yield make
    for g in made:
        g.cleanup()


@pytest.fixture
def gateway(gateway_factory) -> gw.Gateway:
    """A running gateway with the default test config (no peers, no uplink)."""
    return gateway_factory()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def pytest_runtest_makereport(item, call):
    """On failure, attach the log tail of every gateway (and swtpm / nginx / Orthanc) the test started."""
    if call.when != "call" or call.excinfo is None:
        return
    # Other peers (swtpm, nginx, Orthanc helpers) offer their logs through
    # `hwtests_log_sections() -> [(title, text)]`.
    for value in (getattr(item, "funcargs", None) or {}).values():
        sections = getattr(value, "hwtests_log_sections", None)
        if callable(sections):
            for title, text in sections():
                item.add_report_section("call", title, text)
    factory = item.funcargs.get("gateway_factory") if hasattr(item, "funcargs") else None
    if factory is None:
        return
    # The closure keeps the list of gateways it made.
    cells = getattr(factory, "__closure__", None) or ()
    for cell in cells:
        made = cell.cell_contents
        if isinstance(made, list) and all(isinstance(g, gw.Gateway) for g in made):
            for g in made:
                item.add_report_section("call", f"gatewayd log ({g.name})", g.log_tail(80))


def fail_on_assertion(fn, *args, **kwargs):
    """Run a helper; its AssertionError (missing tool, peer did not start) becomes a plain
    test failure with the helper's message."""
    try:
        return fn(*args, **kwargs)
    except AssertionError as e:
        message = str(e)
    pytest.fail(message, pytrace=False)


@pytest.fixture
def swtpm(tmp_path):
    """A running swtpm with its state in tmp_path/swtpm; killed by PID at teardown."""
    fail_on_assertion(tpm.require_tools)
    t = tpm.Swtpm(tmp_path / "swtpm")
    try:
        fail_on_assertion(t.start)
        yield t
    finally:
        t.stop()
        t.cleanup()


@pytest.fixture
def ca(tmp_path):
    """A test CA in tmp_path/pki, outside every gateway folder: it issues nginx's server
    certificate and the gateways' client certificates."""
    fail_on_assertion(pki.require_openssl)
    return pki.CA(tmp_path / "pki")


@pytest.fixture(scope="session")
def appliance_image(gatewayd_bin) -> Path:
    """The appliance image folder (hw-tests/appliance.py): built once per run, then cached."""
    import appliance

    appliance.require_tools()
    appliance.require_tpm_binary(gatewayd_bin)
    return appliance.build_image(gatewayd_bin)


@pytest.fixture
def vms():
    """The appliance VMs a test started (appliance.Vm); qemu and swtpm killed by PID at teardown."""
    made: list = []
    yield made
    for vm in made:
        vm.cleanup()
