"""deploy/container/: the Containerfile read instruction by instruction, and the settings it bakes in.

No container engine is needed: what matters is checked on the text (two
stages, only wheels in the final one, a numeric non-root user, the health
check, the stop signal), and the default settings are loaded by setpoint
itself.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from reconciler.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
CONTAINERFILE = REPO / "deploy" / "container" / "Containerfile"
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|build-essential|python3?-dev|libc6?-dev|cmake|rustc|cargo|hatchling)\b"
)


@dataclass(frozen=True)
class Instruction:
    name: str  # upper case: FROM, RUN, ...
    args: str  # continuation lines joined


def instructions(text: str) -> list[Instruction]:
    found: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # a comment, also between continuation lines, as Docker reads it
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = pending + line
        pending = ""
        name, _, args = whole.partition(" ")
        found.append(Instruction(name.upper(), " ".join(args.split())))
    assert not pending, "the file ends in a continuation line"
    return found


def stages(text: str) -> list[list[Instruction]]:
    """Each FROM and what follows it; what comes before the first FROM (global ARGs) is dropped."""
    result: list[list[Instruction]] = []
    for instruction in instructions(text):
        if instruction.name == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


STAGES = stages(CONTAINERFILE.read_text())
BUILD, FINAL = STAGES[0], STAGES[-1]


def only(stage: list[Instruction], name: str) -> Instruction:
    found = [i for i in stage if i.name == name]
    assert len(found) == 1, f"{name} appears {len(found)} times in the stage"
    return found[0]


def test_two_stages_from_the_same_slim_python() -> None:
    assert len(STAGES) == 2
    base = next(i for i in instructions(CONTAINERFILE.read_text()) if i.name == "ARG").args
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.1[1-9]-slim(-\w+)?", base), base
    assert BUILD[0].args == "${PYTHON_IMAGE} AS build"
    assert FINAL[0].args == "${PYTHON_IMAGE}"


def copied(stage: list[Instruction]) -> list[str]:
    """The sources of the stage's COPY instructions."""
    return [source.rstrip("/") for i in stage if i.name == "COPY" for source in i.args.split()[:-1]]


def test_the_build_stage_copies_every_package_of_the_wheel() -> None:
    wheel = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert set(copied(BUILD)) == {*wheel["packages"], "pyproject.toml", "README.md"}
    assert any(i.name == "RUN" and i.args.startswith("pip wheel --wheel-dir /wheels .") for i in BUILD)


def test_the_final_stage_installs_only_wheels_and_keeps_no_build_tool() -> None:
    runs = [i.args for i in FINAL if i.name == "RUN"]
    install = next(r for r in runs if "pip install" in r)
    assert "--mount=type=bind,from=build,source=/wheels,target=/wheels" in install
    for flag in ("--no-index", "--only-binary=:all:", "--find-links=/wheels"):
        assert flag in install, flag
    assert "pip uninstall --yes --quiet pip setuptools wheel" in install
    for run in runs:
        assert not BUILD_TOOLS.search(run), run
        assert "apt-get install" not in run and "apk add" not in run and "pip wheel" not in run, run
    assert not [i for i in FINAL if i.name == "COPY" and "--from=" in i.args], "only the mounted wheels cross over"


def test_the_final_stage_runs_as_a_numeric_non_root_user() -> None:
    user = only(FINAL, "USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit(), f"USER {user}: numeric, so runAsNonRoot can check it"
    assert int(uid) != 0 and int(gid) != 0
    assert [i.name for i in FINAL].index("USER") > max(j for j, i in enumerate(FINAL) if i.name == "RUN")


def test_health_check_stop_signal_port_and_command() -> None:
    health = only(FINAL, "HEALTHCHECK").args
    assert "http://127.0.0.1:9464/healthz" in health, health
    assert only(FINAL, "STOPSIGNAL").args == "SIGTERM"
    assert only(FINAL, "EXPOSE").args == "9464"
    assert json.loads(only(FINAL, "ENTRYPOINT").args) == ["setpoint"]
    assert json.loads(only(FINAL, "CMD").args) == ["run", "-c", "/etc/setpoint/config.yaml"]


def test_the_default_settings_are_valid_and_listen_on_every_address() -> None:
    copy = only(FINAL, "COPY").args.split()
    assert copy == ["deploy/container/config.yaml", "/etc/setpoint/config.yaml"]
    settings = load_settings(REPO / copy[0])
    assert settings.http.listen == "0.0.0.0:9464"
    assert settings.state_dir == "/var/lib/setpoint"


def test_the_ignore_file_lets_in_what_the_containerfile_copies_and_nothing_else() -> None:
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            body = pattern.lstrip("!").replace("**/", "")
            if fnmatch.fnmatch(path, body) or path.startswith(body + "/") or fnmatch.fnmatch(Path(path).name, body):
                keep = negate
        return keep

    for source in copied(BUILD) + copied(FINAL):
        assert included(source), f"{source} is copied but .dockerignore leaves it out"
    for outside in (".venv", ".git", ".setpoint", "tests", "setpoint.yaml", "reconciler/__pycache__"):
        assert not included(outside), f"{outside} would enter the build context"
