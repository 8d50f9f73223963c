"""Declarative tools in the running daemon: offered to the model for the kinds they name, run, journalled.

A real daemon on a real etcd; the model is the fake OpenAI-compatible server
of tests/llm_fakes.py, reached by the real SDK over HTTP. The command tool
runs a real script that records its argv; the http tool calls a real aiohttp
server on loopback that echoes the secret header it got, which must reach
no log, plan record or prompt.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from harness import Harness, eventually
from llm_fakes import LlmServer, tool_call
from test_cli import SETPOINT, run_cli
from test_cli_commands import one_sentence
from test_issues import slow_poll
from test_llm_planning import API_KEY, converged_file, use_model

from plans import ResourceKey
from reconciler.daemon import Daemon
from reconciler.errors import StartupError
from reconciler.logs import configure_logging
from reconciler.settings import Settings

SECRET = "reload-secret-9f8e7d6c5b4a"
REPO = Path(__file__).resolve().parents[2]
SERVICE = ResourceKey(kind="service", name="web")


class Reloads:
    """A loopback HTTP server standing in for a service's reload endpoint; echoes the Authorization header."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append({"method": request.method, "path": request.raw_path, "headers": dict(request.headers),
                          "body": await request.read()})  # fmt: skip
        return web.Response(text=f"reloaded; you sent {request.headers.get('Authorization')}")


@pytest.fixture
async def reloads() -> AsyncIterator[Reloads]:
    server = Reloads()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield server
    await runner.cleanup()


def recording_script(directory: Path) -> tuple[Path, Path]:
    """An executable that appends its argv as a JSON line to a file; (its path, the file)."""
    script, record = directory / "svcctl", directory / "svcctl.jsonl"
    script.write_text(f"#!{sys.executable}\nimport json, sys\nopen({str(record)!r}, 'a').write(json.dumps(sys.argv)"
                      f" + '\\n')\n")  # fmt: skip
    script.chmod(0o755)
    return script, record


def definitions(directory: Path, script: Path, reload_url: str, *, kinds: list[str]) -> Path:
    unit = {"type": "string", "pattern": r"^[A-Za-z0-9@._-]+\.service$"}
    tools = [
        {"name": "svc.restart", "description": "Restart a service unit.", "kind": "command", "risk": "low",
         "idempotent": True, "kinds": kinds, "argv": [str(script), "restart", "{unit}"],
         "parameters": {"type": "object", "properties": {"unit": unit}, "required": ["unit"]}},
        {"name": "svc.reload", "description": "Reload a service's configuration.", "kind": "http", "risk": "low",
         "idempotent": True, "kinds": kinds, "method": "POST", "url": reload_url + "/-/reload?unit={unit}",
         "headers": {"Authorization": "Bearer ${SETPOINT_TEST_RELOAD_TOKEN}"}, "body": {"unit": "{unit}"},
         "parameters": {"type": "object", "properties": {"unit": unit}, "required": ["unit"]}},
    ]  # fmt: skip
    path = directory / "tools.yaml"
    path.write_text(yaml.safe_dump({"tools": tools}, sort_keys=False))
    return path


def use_tools(harness: Harness, path: Path, script: Path, **llm: Any) -> None:
    raw = harness.settings.model_dump(mode="json")
    raw["tools"] |= {"definitions": [str(path)], "allowed_executables": [str(script)]}
    raw["llm"] |= llm
    harness.settings = Settings.model_validate(raw)


async def put_json(harness: Harness, key: str, value: dict[str, Any]) -> None:
    await harness.store.put(key, json.dumps(value).encode())


async def service_status(harness: Harness, phase: str | None = None) -> dict[str, Any] | None:
    status = await harness.status(SERVICE.name, kind=SERVICE.kind)
    return status if status is not None and (phase is None or status["phase"] == phase) else None


async def everything_in_etcd(harness: Harness) -> str:
    kvs, _ = await harness.store.get_prefix(harness.keys.prefix + "/")
    return "\n".join(kv.value.decode("utf-8", "replace") for kv in kvs)


async def test_a_declared_tool_is_offered_to_the_model_for_its_kind_and_its_plan_runs_and_is_journalled(
    harness: Harness, llm_server: LlmServer, reloads: Reloads, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    configure_logging("debug")  # every log line the daemon writes, prompts and answers too, is searched below
    monkeypatch.setenv("SETPOINT_TEST_RELOAD_TOKEN", SECRET)
    script, record = recording_script(tmp_path)
    use_model(harness, llm_server, monkeypatch)
    # The kind is planned by a model with svc.restart (llm.kinds); svc.reload comes only through its `kinds`.
    use_tools(harness, definitions(tmp_path, script, reloads.url, kinds=["service"]), script,
              kinds={"service": {"tools": ["svc.restart"]}})  # fmt: skip
    steps = [{"tool": "svc.restart", "parameters": {"unit": "web.service"}, "description": "restart", "risk": "low"},
             {"tool": "svc.reload", "parameters": {"unit": "web.service"}, "description": "reload", "risk": "low"}]
    llm_server.default("openai", tool_call({"reasoning": "web is down; restart and reload it", "steps": steps}))
    await harness.start()
    desired = {"kind": "service", "name": "web", "spec": {"unit": "web.service", "state": "active"}}
    await harness.put_desired(desired)

    await put_json(harness, harness.keys.actual(SERVICE), {
        "kind": "service", "name": "web", "state": {"unit": "web.service", "state": "failed"},
        "observed_at": datetime.now(UTC).isoformat()})  # fmt: skip

    status = await eventually(lambda: _planned(harness), timeout=20, what="a plan for service/web that ran")
    plan = await harness.plan_record(status["plan_id"])
    assert plan["state"] == "succeeded", plan
    assert [step["tool"] for step in plan["plan"]["steps"]] == ["svc.restart", "svc.reload"]
    assert plan["plan"]["planner"].startswith("llm:small:openai/") and plan["decision"] == "auto"
    restart, reload = plan["steps"]
    assert restart["state"] == "succeeded" and restart["output"]["exit_code"] == 0
    assert reload["state"] == "succeeded" and reload["output"]["status"] == 200
    assert reload["output"]["body"] == "reloaded; you sent Bearer [REDACTED]"
    assert json.loads(record.read_text().splitlines()[0]) == [str(script), "restart", "web.service"]
    first = reloads.seen[0]
    assert (first["method"], first["path"]) == ("POST", "/-/reload?unit=web.service")
    assert first["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert json.loads(first["body"]) == {"unit": "web.service"}

    request = llm_server.received_by("openai")[0]
    prompt = "\n".join(str(m.get("content")) for m in request.body["messages"])
    catalogue = [name for name in ("svc.restart", "svc.reload", "file.write") if f'"name": "{name}"' in prompt]
    assert catalogue == ["svc.restart", "svc.reload"], "the kind's tool and the declared one; nothing else"
    assert r"^[A-Za-z0-9@._-]+\\.service$" in prompt, "with its parameters' JSON schema"
    await harness.stop()
    logs = capsys.readouterr().err
    configure_logging("warning")
    assert '"step.succeeded"' in logs and '"llm.prompt"' in logs, "the logs were captured"
    seen_everywhere = [await everything_in_etcd(harness), *(r.raw.decode() for r in llm_server.received), logs]
    assert [text for text in seen_everywhere if SECRET in text] == [], "the secret reached no record, prompt or log"
    assert API_KEY not in seen_everywhere[0]


async def _planned(harness: Harness) -> dict[str, Any] | None:
    status = await service_status(harness)
    if status is None or not status.get("plan_id"):
        return None
    plan = await harness.plan_record(status["plan_id"])
    return status if plan["state"] in ("succeeded", "failed") else None


async def test_a_declared_tool_for_the_file_kind_is_offered_to_a_heal_but_may_target_only_what_the_spec_names(
    harness: Harness, llm_server: LlmServer, reloads: Reloads, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SETPOINT_TEST_RELOAD_TOKEN", SECRET)
    script, record = recording_script(tmp_path)
    use_model(harness, llm_server, monkeypatch)
    use_tools(harness, definitions(tmp_path, script, reloads.url, kinds=["file"]), script)
    slow_poll(harness)
    await harness.start()
    path = await converged_file(harness, "app", "x = 1\n")
    restart = {"tool": "svc.restart", "parameters": {"unit": "sshd.service"}, "description": "r", "risk": "low"}
    llm_server.default("openai", tool_call({"reasoning": "restart something else", "steps": [restart]}))

    await harness.report_issue("app", "i1", "app is slow")

    failed = await harness.wait_issue("app", "i1", "failed")
    assert "may name only what the desired spec names" in failed["message"]
    assert await harness.metric('setpoint_llm_rejected_answers_total{reason="out_of_scope"}') == 2.0
    prompt = "\n".join(str(m.get("content")) for m in llm_server.received_by("openai")[0].body["messages"])
    assert '"name": "svc.restart"' in prompt and '"name": "file.write"' in prompt
    assert not record.exists() and reloads.seen == [], "nothing ran"
    assert path.read_text() == "x = 1\n"


async def test_the_daemon_refuses_to_start_on_a_bad_definition_naming_file_and_line(
    harness: Harness, tmp_path: Path
) -> None:
    script, _ = recording_script(tmp_path)
    path = definitions(tmp_path, script, "http://127.0.0.1:9", kinds=[])
    use_tools(harness, path, script)  # SETPOINT_TEST_RELOAD_TOKEN is not set

    with pytest.raises(StartupError) as caught:
        await Daemon(harness.settings).run(asyncio.Event())

    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "Authorization" in text)
    assert str(caught.value) == (
        f"tool definition file {path} line {line}: tool 'svc.reload', headers.Authorization: environment variable "
        f"SETPOINT_TEST_RELOAD_TOKEN is not set (the header's value names it)"
    )


def test_check_config_accepts_the_shipped_examples_and_locates_an_error(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    systemctl = bin_dir / "systemctl"  # the example runs `systemctl` from PATH: this one, wherever the test runs
    systemctl.write_text("#!/bin/sh\nexit 0\n")
    systemctl.chmod(0o755)
    config = tmp_path / "setpoint.yaml"
    settings: dict[str, Any] = {
        "tools": {"definitions": [str(REPO / "deploy" / "tools.example.yaml")],
                  "allowed_executables": [str(systemctl)]},
        "llm": {"tiers": {"small": [{"provider": "openai", "model": "m", "api_key_env": "SETPOINT_TEST_KEY"}]},
                "kinds": {"service": {"tools": ["systemctl.is_active"]}}},
    }  # fmt: skip
    config.write_text(yaml.safe_dump(settings))
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SERVICE_RELOAD_TOKEN": SECRET,
           "SETPOINT_TEST_KEY": "k"}  # fmt: skip

    good = run_cli("check-config", "-c", str(config), env=env)
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(textwrap.dedent("""\
        tools:
          - name: systemctl.restart
            description: Restart.
            kind: command
            risk: medium
            idempotent: true
            argv: [systemctl, restart, "{unit}"]
    """))
    settings["tools"]["definitions"] = [str(bad_file)]
    config.write_text(yaml.safe_dump(settings))
    bad = one_sentence(run_cli("check-config", "-c", str(config), check=False, env=env))

    assert ("tools: 3 declarative (systemctl.restart, systemctl.is_active, service.reload); offered to a model "
            "planning service") in good.stdout.splitlines()
    assert SECRET not in good.stdout + good.stderr
    assert bad == (f"setpoint: tool definition file {bad_file} line 7: tool 'systemctl.restart', argv.2: "
                   f"placeholder {{unit}} names no parameter (the parameters: none are declared)")  # fmt: skip


async def test_setpoint_plan_shows_a_declared_tools_steps(
    harness: Harness, llm_server: LlmServer, reloads: Reloads, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    script, record = recording_script(tmp_path)
    monkeypatch.setenv("SETPOINT_TEST_RELOAD_TOKEN", SECRET)
    use_model(harness, llm_server, monkeypatch)
    use_tools(harness, definitions(tmp_path, script, reloads.url, kinds=["service"]), script,
              kinds={"service": {"tools": ["svc.restart"]}})  # fmt: skip
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(harness.settings.model_dump(mode="json")))
    await harness.put_desired({"kind": "service", "name": "web", "spec": {"unit": "web.service", "state": "active"}})
    await put_json(harness, harness.keys.actual(SERVICE), {
        "kind": "service", "name": "web", "state": {"unit": "web.service", "state": "failed"},
        "observed_at": datetime.now(UTC).isoformat()})  # fmt: skip
    step = {"tool": "svc.reload", "parameters": {"unit": "web.service"}, "description": "reload web", "risk": "low"}
    llm_server.default("openai", tool_call({"reasoning": "reload it", "steps": [step]}))

    process = await asyncio.create_subprocess_exec(
        *SETPOINT, "plan", "-c", str(config), "-o", "json", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "SETPOINT_TEST_RELOAD_TOKEN": SECRET},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)

    assert process.returncode == 0, err.decode()
    [row] = json.loads(out)
    assert row["resource"] == "service/web" and row["change"] == "will run" and row["decision"] == "auto"
    assert row["steps"] == [{"tool": "svc.reload", "description": "reload web", "risk": "low"}]
    assert reloads.seen == [] and not record.exists(), "a dry run runs nothing"
