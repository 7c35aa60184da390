"""Staff accounts shared by the running daemon and `gatewayd users ...` (another process).

- While the daemon is busy writing the accounts file (failed kiosk logins count failures and
  lock accounts, each one a save of the whole file), `users add` adds accounts in a loop:
  at the end every account the CLI added is there, and so is every failure the daemon
  recorded (each busy account is locked out);
- `users add` while another process holds the accounts lock (`fcntl.flock` on
  `staff/accounts.lock`) waits a bounded time, then exits non-zero naming the lock file,
  and the accounts file is unchanged; once the lock is free it succeeds;
- a lock file that cannot be opened is an error too, never a silent carry-on unlocked;
- an accounts file that cannot be parsed is never replaced: `users add` and a kiosk login
  fail (exit 1 / HTTP 503) and the file stays byte for byte as it was.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import threading
import time

import gw
import kiosk

PASSWORD = kiosk.PASSWORD
BUSY = [f"busy.{i}" for i in range(6)]
CLI_ADDS = 12
# Failed logins in a row (from any addresses) that lock an account (gateway_staff::MAX_FAILURES).
LOCK_AFTER = 20


def users(g: gw.Gateway, *args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([g.binary, "users", *args, "--config", str(g.config_path)], input=stdin,
                          capture_output=True, text=True, timeout=timeout, cwd=g.workdir)


def add(g: gw.Gateway, name: str, timeout: float = 60):
    return users(g, "add", "--name", name, "--role", "clerk", stdin=PASSWORD + "\n", timeout=timeout)


def listed(g: gw.Gateway) -> dict[str, dict]:
    r = users(g, "list", "--json")
    assert r.returncode == 0, r.stderr
    return {a["name"]: a for a in json.loads(r.stdout)}


def kiosk_gateway(gateway_factory) -> tuple[gw.Gateway, int]:
    """A core gateway with the kiosk on a free port, keys made, not started yet."""
    port = gw.free_port()
    g = gateway_factory({
        "node": {"id": "core-1", "role": "core"},
        "booking": {"listen": f"127.0.0.1:{port}",
                    "schedule": [{"id": "ct-1", "modality": "CT", "station_ae": "CT01",
                                  "hours": kiosk.EVERY_DAY}]},
    }, start=False)
    r = kiosk.cli(g, "keys", "init")
    assert r.returncode == 0, r.stderr
    return g, port


def test_accounts_added_by_the_cli_while_the_daemon_writes_are_never_lost(gateway_factory):
    g, port = kiosk_gateway(gateway_factory)
    for name in BUSY:
        kiosk.add_staff(g, name)
    g.start()
    k = kiosk.Kiosk(g, port)  # trusts the development certificate made at start

    daemon_writes: list[tuple[float, int]] = []
    stop = threading.Event()

    def hammer():
        # Wrong passwords: each answer is saved (failure count, then the lockout) before
        # it is sent; the 20th locks the account. Each client address makes 4 attempts,
        # below the kiosk's per-address throttle (5), so every attempt reaches the file.
        attempt = 0
        for _ in range(LOCK_AFTER):
            for name in BUSY:
                if stop.is_set():
                    return
                source = f"127.0.{10 + attempt // 4 // 250}.{1 + attempt // 4 % 250}"
                r = kiosk.Kiosk(g, port, source).login(name, None, password="not the password!", code="000000")
                daemon_writes.append((time.monotonic(), r.status))
                attempt += 1

    t = threading.Thread(target=hammer)
    t.start()
    cli_start = time.monotonic()
    added = []
    try:
        for i in range(CLI_ADDS):
            name = f"cli.{i}"
            r = add(g, name)
            assert r.returncode == 0, f"users add {name}: {r.stderr}"
            added.append(name)
    finally:
        cli_end = time.monotonic()
        t.join(timeout=120)
        stop.set()
    assert not t.is_alive()
    statuses = [s for _, s in daemon_writes]
    assert statuses and all(s == 401 for s in statuses), statuses
    overlapping = [ts for ts, _ in daemon_writes if cli_start <= ts <= cli_end]
    assert len(overlapping) >= 3, "the daemon's writes did not overlap the CLI's adds"

    accounts = listed(g)
    assert set(added) <= set(accounts), sorted(set(added) - set(accounts))
    assert set(BUSY) <= set(accounts)
    # The daemon's writes were not lost either: twenty failures in a row locked each one.
    assert [n for n in BUSY if not accounts[n]["locked"]] == [], accounts
    # The kiosk (admin) sees the same file.
    secret = kiosk.add_staff(g, "admin.1", "admin")
    assert k.login("admin.1", secret).status == 200
    r = k.request("GET", "/api/accounts")
    assert r.status == 200, r
    assert set(added) | set(BUSY) <= {a["name"] for a in r.json()}
    assert "panicked" not in g.log_text()


def test_users_add_fails_clearly_while_another_process_holds_the_lock(gateway_factory):
    g, port = kiosk_gateway(gateway_factory)
    secret = kiosk.add_staff(g, "clerk.a")
    g.start()
    k = kiosk.Kiosk(g, port)  # trusts the development certificate made at start
    staff = g.data_dir / "staff"
    before = (staff / "accounts.json").read_bytes()

    with open(staff / "accounts.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.monotonic()
        r = add(g, "clerk.b", timeout=60)
        waited = time.monotonic() - started
        assert r.returncode != 0, (r.stdout, r.stderr)
        assert "accounts.lock" in r.stderr and "locked by another process" in r.stderr, r.stderr
        assert waited < 30, waited
        # The daemon cannot record a login either: refused, not passed.
        login = k.login("clerk.a", secret)
        assert login.status == 503, login
        assert (staff / "accounts.json").read_bytes() == before
    assert "clerk.b" not in listed(g)

    r = add(g, "clerk.b")
    assert r.returncode == 0, r.stderr
    assert set(listed(g)) == {"clerk.a", "clerk.b"}
    assert k.login("clerk.a", secret).status == 200


def test_a_lock_file_that_cannot_be_opened_is_an_error(gateway):
    g = gateway
    assert add(g, "clerk.a").returncode == 0
    staff = g.data_dir / "staff"
    before = (staff / "accounts.json").read_bytes()
    (staff / "accounts.lock").unlink()
    (staff / "accounts.lock").mkdir()  # cannot be opened for writing
    r = add(g, "clerk.b")
    assert r.returncode != 0 and "accounts.lock" in r.stderr, (r.stdout, r.stderr)
    assert (staff / "accounts.json").read_bytes() == before
    (staff / "accounts.lock").rmdir()
    assert add(g, "clerk.b").returncode == 0
    assert set(listed(g)) == {"clerk.a", "clerk.b"}


def test_an_unparsable_accounts_file_is_never_replaced(gateway_factory):
    g, port = kiosk_gateway(gateway_factory)
    secret = kiosk.add_staff(g, "clerk.a")
    g.start()
    k = kiosk.Kiosk(g, port)  # trusts the development certificate made at start
    path = g.data_dir / "staff" / "accounts.json"
    garbage = path.read_bytes()[:40]  # a write cut short by hand
    path.write_bytes(garbage)

    r = add(g, "clerk.b")
    assert r.returncode == 1 and "accounts.json" in r.stderr and "unreadable" in r.stderr, r.stderr
    # The daemon opened the store before the damage; its next save must not rewrite it.
    login = k.login("clerk.a", secret)
    assert login.status == 503, login
    login = k.login("clerk.a", None, password="not the password!", code="000000")
    assert login.status == 503, login
    assert path.read_bytes() == garbage
