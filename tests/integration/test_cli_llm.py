"""`setpoint llm route` through real subprocesses against the session's real etcd: what the model would be asked
about a resource now, each feature's points, the tier and its models, and that no model is called."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_cli import run_cli
from test_cli_commands import one_sentence

from plans import ResourceKey
from reconciler.embedded import EmbeddedEtcd
from reconciler.keys import KeySpace
from reconciler.store import EtcdStore

KEY_ENV = {"SETPOINT_ROUTE_TEST_KEY": "sk-route-test-0123456789abcdef"}
CONTENT = "listen 8080\n"


@pytest.fixture
def model_port() -> Iterator[socket.socket]:
    """Where every configured model points: a listening socket that no one should connect to."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


class Setup:
    """A config with models in every tier (all pointing at `model_port`) and the banner kind planned by a model."""

    def __init__(self, etcd: EmbeddedEtcd, tmp_path: Path, port: int, *, models: bool = True) -> None:
        self.endpoint = etcd.endpoint
        self.prefix = f"/llm-{uuid.uuid4().hex[:8]}"
        self.root = tmp_path / "root"
        self.root.mkdir(exist_ok=True)
        url = f"http://127.0.0.1:{port}/v1"

        def model(name: str) -> dict[str, Any]:
            return {"provider": "openai", "model": name, "base_url": url, "api_key_env": "SETPOINT_ROUTE_TEST_KEY"}

        settings: dict[str, Any] = {
            "etcd": {"endpoints": [etcd.endpoint], "prefix": self.prefix},
            "agents": {"file": {"allowed_roots": [str(self.root)]}},
        }
        if models:
            settings["llm"] = {
                "tiers": {"small": [model("small-m")], "standard": [model("standard-m"), model("standard-b")],
                          "large": [model("large-m")]},
                "kinds": {"banner": {"tools": ["file.read", "file.write"], "hint": 0.5}},
            }  # fmt: skip
        self.config = tmp_path / f"config-{uuid.uuid4().hex[:6]}.yaml"
        self.config.write_text(yaml.safe_dump(settings))

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "-c", str(self.config), env=KEY_ENV, check=check)

    def apply(self, kind: str, name: str, spec: dict[str, Any]) -> None:
        result = run_cli(
            "apply", "-f", "-", "-c", str(self.config), env=KEY_ENV,
            stdin=yaml.safe_dump({"kind": kind, "name": name, "spec": spec}),
        )  # fmt: skip
        assert result.stdout.strip() == f"{kind}/{name} applied"

    def observe(self, kind: str, name: str, state: dict[str, Any]) -> None:
        """What an observer would write under actual/."""
        observed = {"kind": kind, "name": name, "state": state, "observed_at": datetime.now(UTC).isoformat()}

        async def put() -> None:
            async with EtcdStore([self.endpoint]) as store:
                await store.put(KeySpace(self.prefix).actual(ResourceKey(kind=kind, name=name)),
                                json.dumps(observed).encode())  # fmt: skip

        asyncio.run(put())

    def route(self, resource: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.cli("llm", "route", resource, "-o", "json").stdout)
        return result


@pytest.fixture
def setup(etcd: EmbeddedEtcd, tmp_path: Path, model_port: socket.socket) -> Iterator[Setup]:
    yield Setup(etcd, tmp_path, model_port.getsockname()[1])
    with pytest.raises(BlockingIOError):  # no command connected to a model
        model_port.accept()


def file_app(setup: Setup) -> None:
    setup.apply("file", "app", {"path": str(setup.root / "app.conf"), "content": CONTENT})
    sha = hashlib.sha256(CONTENT.encode()).hexdigest()
    setup.observe("file", "app", {"exists": True, "sha256": sha, "mode": "0644"})


def points(route: dict[str, Any]) -> dict[str, tuple[Any, float]]:
    return {f["feature"]: (f["value"], f["points"]) for f in route["features"]}


def test_a_file_issue_no_rule_covers_routes_by_the_oldest_issue_and_prints_each_feature(setup: Setup) -> None:
    file_app(setup)
    setup.cli("issues", "report", "file/app", "--summary", "app says its config is unreadable", "--id", "first")
    setup.cli("issues", "report", "file/app", "--summary", "app is down", "--severity", "critical", "--id", "later")

    route = setup.route("file/app")
    table = setup.cli("llm", "route", "file/app").stdout

    assert route["model_asked"] is True and route["task"] == "heal"
    assert route["issue"] == {"id": "first", "summary": "app says its config is unreadable", "severity": "warning"}
    assert route["tools"] == ["file.write", "file.delete", "file.read"]
    assert points(route) == {
        "changed_fields": (0, 0.0), "changed_resources": (1, 0.0), "issue_severity": ("warning", 0.15),
        "candidate_tools": (3, 0.02), "failed_attempts": (0, 0.0), "hint": (None, 0.0),
    }  # fmt: skip
    assert route["total"] == 0.17 and route["thresholds"] == {"standard_at": 0.3, "large_at": 0.6}
    assert (route["scored_tier"], route["tier"], route["models"]) == ("small", "small", ["openai/small-m"])
    lines = table.splitlines()
    assert lines[0] == "file/app: heal of issue first (warning): app says its config is unreadable"
    assert lines[1] == "tools offered: file.write, file.delete, file.read"
    assert lines[3].split() == ["FEATURE", "VALUE", "POINTS"]
    assert lines[6].split() == ["issue_severity", "warning", "0.15"]
    assert lines[10].split() == ["total", "0.17"]
    assert "thresholds: standard from 0.30, large from 0.60" in lines
    assert "tier: small; models, in order: openai/small-m" in lines
    assert lines[-1] == "No model was called."


def test_a_file_the_rules_plan_asks_no_model(setup: Setup) -> None:
    setup.apply("file", "app", {"path": str(setup.root / "app.conf"), "content": CONTENT})

    no_issue = setup.cli("llm", "route", "file/app")
    setup.cli("issues", "report", "file/app", "--summary", "something is off")
    drift = setup.route("file/app")

    assert no_issue.stdout == "file/app: rules plan this resource; no model would be asked\n"
    assert drift == {
        "resource": "file/app", "model_asked": False,
        "reason": "rules repair its drift (not observed yet); no model would be asked",
    }  # fmt: skip


def test_a_kind_planned_by_the_model_routes_its_reconcile_then_its_heal(setup: Setup) -> None:
    spec = {"path": str(setup.root / "banner"), "text": "Authorised use only"}
    setup.apply("banner", "login", spec)

    unobserved = setup.route("banner/login")
    setup.observe("banner", "login", {**spec, "text": "hello"})
    differs = setup.route("banner/login")
    setup.observe("banner", "login", {**spec, "seen": 3})
    converged = setup.cli("llm", "route", "banner/login").stdout
    setup.cli("issues", "report", "banner/login", "--summary", "no banner at login", "--severity", "critical")
    heal = setup.route("banner/login")

    assert unobserved["task"] == "reconcile" and points(unobserved)["changed_fields"] == (2, 0.1)
    assert differs["task"] == "reconcile" and differs["tools"] == ["file.read", "file.write"]
    assert points(differs)["changed_fields"] == (1, 0.05) and points(differs)["hint"] == (0.5, 0.1)
    assert differs["total"] == 0.15 and differs["tier"] == "small"
    assert converged == "banner/login: actual matches desired and no issue is open; no model would be asked\n"
    assert heal["task"] == "heal" and heal["issue"]["severity"] == "critical"
    assert heal["total"] == 0.4 and heal["tier"] == "standard"
    assert heal["models"] == ["openai/standard-m", "openai/standard-b"]


def test_errors_are_one_sentence(etcd: EmbeddedEtcd, tmp_path: Path, setup: Setup) -> None:
    plain = Setup(etcd, tmp_path, 9, models=False)
    plain.apply("file", "app", {"path": str(plain.root / "app.conf"), "content": CONTENT})

    assert one_sentence(plain.cli("llm", "route", "file/app", check=False)) == (
        "setpoint: no language model is configured: llm.tiers is empty"
    )
    assert one_sentence(setup.cli("llm", "route", "file/nope", check=False)) == (
        "setpoint: no desired value for file/nope (`setpoint apply` writes one)"
    )
    assert one_sentence(setup.cli("llm", "route", "widget/w", check=False)) == (
        "setpoint: no agent handles kind 'widget' (a kind a model plans is named in llm.kinds)"
    )
    missing_key = run_cli("llm", "route", "file/app", "-c", str(setup.config), check=False)
    assert "SETPOINT_ROUTE_TEST_KEY is not set" in one_sentence(missing_key)
