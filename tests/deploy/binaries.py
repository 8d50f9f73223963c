"""Programs from Debian packages that some deploy tests run: found on PATH, else a skip naming the package,
or a failure where SETPOINT_REQUIRE_SERVERS=1 (CI), since there a missing program must not pass as a skip."""

from __future__ import annotations

import os
import shutil

import pytest


def require_binary(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        reason = f"{tool} not found: install Debian's `{package}` package"
        if os.environ.get("SETPOINT_REQUIRE_SERVERS") == "1":
            pytest.fail(f"{reason} (SETPOINT_REQUIRE_SERVERS=1)")
        pytest.skip(reason)
    return path
