"""The import-linter contracts in pyproject.toml (ARCHITECTURE.md §1) are part of the suite.

The first test runs `lint-imports` on the repository. The others run it on a
copy of the packages in a temporary directory with one forbidden import
added, to show that each contract really catches what it is there for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ["plans", "tools", "policies", "llm_router", "agents", "reconciler"]


def contract_names() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        config = tomllib.load(f)
    return [contract["name"] for contract in config["tool"]["importlinter"]["contracts"]]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH puts `cwd` ahead of the editable install, so a copy is analysed instead of the repo.
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_every_contract_is_kept() -> None:
    names = contract_names()
    assert len(names) >= 4
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in names:
        assert f"{name} KEPT" in result.stdout, result.stdout
    assert f"{len(names)} kept, 0 broken" in result.stdout


VIOLATIONS = [
    pytest.param("plans/_probe.py", "import reconciler\n", "Layers:", id="plans-imports-reconciler"),
    pytest.param(
        "agents/_probe.py", "import policies\n", "Agents plan; they do not decide policy", id="agents-policies"
    ),
    pytest.param("tools/_probe.py", "import grpc\n", "Only reconciler talks to etcd", id="tools-grpc"),
    pytest.param("agents/_probe.py", "import anthropic\n", "Only llm_router imports model SDKs", id="agents-sdk"),
]


@pytest.mark.parametrize(("path", "source", "contract"), VIOLATIONS)
def test_a_forbidden_import_breaks_its_contract(tmp_path: Path, path: str, source: str, contract: str) -> None:
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / path).write_text(source)

    result = lint_imports(tmp_path)

    assert result.returncode != 0, result.stdout
    broken = [line for line in result.stdout.splitlines() if line.endswith(" BROKEN")]
    assert len(broken) == 1, result.stdout
    assert broken[0].startswith(contract)
    assert path.removesuffix(".py").replace("/", ".") in result.stdout
