"""deploy/systemd/: the unit as systemd reads it (`systemd-analyze verify`, `security`), and what it must say.

systemd-analyze comes with Debian's `systemd` package (`make test` installs
it where it runs as root). Without it these tests skip, unless
SETPOINT_REQUIRE_SERVERS=1 (CI), where a missing tool is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from servers import SYSTEMD_ANALYZE, SYSTEMD_SYSUSERS, require

from reconciler.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "systemd" / "setpoint.service"
INSTALLED_AT = "/usr/local/bin/setpoint"


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections and their assignments in order; a key may repeat (systemd adds or resets, it does not replace)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None and "=" in line, f"not an assignment in a section: {raw!r}"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def one(section: list[tuple[str, str]], key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"{key}= is set {len(found)} times"
    return found[0]


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "min": 60, "m": 60}
    for unit, factor in units.items():
        if value.endswith(unit) and value[: -len(unit)].isdigit():
            return int(value[: -len(unit)]) * factor
    assert value.isdigit(), value
    return int(value)


SERVICE = parse_unit(UNIT.read_text())["Service"]


def copy_for_verify(tmp_path: Path) -> Path:
    """The unit with ExecStart= pointing at this environment's `setpoint`, and nothing else changed.

    `systemd-analyze verify` checks that ExecStart='s program exists and is executable. The unit names where
    the README installs it, /usr/local/bin/setpoint, which a test machine does not have; the console script
    of the environment running the tests is the same program, so only that path is swapped.
    """
    script = Path(sys.executable).parent / "setpoint"
    assert script.is_file() and os.access(script, os.X_OK), f"{script}: install the project (make venv) first"
    text = UNIT.read_text()
    line = f"ExecStart={INSTALLED_AT} "
    assert text.count(line) == 1, f"the unit should start {INSTALLED_AT} (the test swaps that path)"
    copy = tmp_path / "setpoint.service"
    copy.write_text(text.replace(line, f"ExecStart={script} "))
    return copy


def verify(unit: Path) -> None:
    """Fail with systemd-analyze's words on an error or on any warning about the unit or its drop-ins."""
    tool = require(SYSTEMD_ANALYZE)
    done = subprocess.run(
        [tool, "verify", "--man=no", str(unit)], cwd=unit.parent, capture_output=True, text=True, timeout=60
    )
    output = (done.stdout + done.stderr).strip()
    about_unit = [line for line in output.splitlines() if "setpoint" in line]
    assert done.returncode == 0 and not about_unit, f"systemd-analyze verify (exit {done.returncode}):\n{output}"


def test_the_unit_passes_systemd_analyze_verify_without_a_warning(tmp_path: Path) -> None:
    verify(copy_for_verify(tmp_path))


def test_verify_would_see_a_mistake(tmp_path: Path) -> None:
    copy = copy_for_verify(tmp_path)
    copy.write_text(copy.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomes=yes"))
    with pytest.raises(AssertionError, match="Unknown key"):
        verify(copy)


def test_the_run_as_root_drop_in_passes_verify_too(tmp_path: Path) -> None:
    copy = copy_for_verify(tmp_path)
    (tmp_path / "setpoint.service.d").mkdir()
    shutil.copy(DEPLOY / "systemd" / "run-as-root.conf", tmp_path / "setpoint.service.d" / "run-as-root.conf")
    verify(copy)
    dropin = parse_unit((DEPLOY / "systemd" / "run-as-root.conf").read_text())["Service"]
    assert dropin == [("User", ""), ("Group", ""), ("CapabilityBoundingSet", "CAP_DAC_OVERRIDE CAP_FOWNER")]


@pytest.mark.parametrize("dropin", [False, True])
def test_the_sandbox_stays_rated_ok_by_systemd_analyze_security(tmp_path: Path, dropin: bool) -> None:
    copy = copy_for_verify(tmp_path)
    if dropin:
        (tmp_path / "setpoint.service.d").mkdir()
        shutil.copy(DEPLOY / "systemd" / "run-as-root.conf", tmp_path / "setpoint.service.d")
    tool = require(SYSTEMD_ANALYZE)
    # 1.3 as a dedicated user, 1.8 as root with the drop-in, when this was written; above 2.5, say why.
    done = subprocess.run(
        [tool, "security", "--offline=true", "--threshold=25", "--no-pager", str(copy)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-600:] + done.stderr


def test_notify_with_a_watchdog_a_reload_and_a_restart_on_failure() -> None:
    assert one(SERVICE, "Type") == "notify"
    assert one(SERVICE, "NotifyAccess") == "main"
    assert one(SERVICE, "ExecStart") == f"{INSTALLED_AT} run -c /etc/setpoint/config.yaml"
    assert one(SERVICE, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert seconds(one(SERVICE, "WatchdogSec")) == 30
    assert one(SERVICE, "Restart") == "on-failure"
    assert "PYTHONFAULTHANDLER=1" in values(SERVICE, "Environment"), "a watchdog kill should show the stack"


def test_the_stop_timeout_leaves_room_for_the_whole_drain() -> None:
    drain = Settings().reconciler.shutdown_timeout_seconds + 5 + 10  # plans, webhooks, the embedded etcd
    assert seconds(one(SERVICE, "TimeoutStopSec")) > drain
    assert one(SERVICE, "KillMode") == "mixed"


def test_hardening() -> None:
    assert one(SERVICE, "User") == "setpoint" and one(SERVICE, "Group") == "setpoint"
    assert "DynamicUser" not in dict(SERVICE)
    assert values(SERVICE, "CapabilityBoundingSet") == [""] and values(SERVICE, "AmbientCapabilities") == [""]
    for key, value in [
        ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6 AF_NETLINK"),
    ]:  # fmt: skip
        assert one(SERVICE, key) == value, key
    assert values(SERVICE, "SystemCallFilter")[0] == "@system-service"


def test_every_allowed_root_of_the_example_config_is_writable_under_the_unit() -> None:
    config = yaml.safe_load((DEPLOY / "config.example.yaml").read_text())
    writable = one(SERVICE, "ReadWritePaths").split()
    assert sorted(config["agents"]["file"]["allowed_roots"]) == sorted(writable)


def test_the_account_file_creates_the_units_user_and_group(tmp_path: Path) -> None:
    entries = [line.split() for line in (DEPLOY / "systemd" / "setpoint.sysusers").read_text().splitlines()
               if line.strip() and not line.startswith("#")]  # fmt: skip
    assert [(e[0], e[1]) for e in entries] == [("u", one(SERVICE, "User"))]
    tool = require(SYSTEMD_SYSUSERS)
    done = subprocess.run(
        [tool, "--dry-run", f"--root={tmp_path}", str(DEPLOY / "systemd" / "setpoint.sysusers")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Creating group 'setpoint'" in output and "Creating user 'setpoint'" in output, output
