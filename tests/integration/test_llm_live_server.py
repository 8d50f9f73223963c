"""Optional: the model planner against a real OpenAI-compatible server on loopback, end to end.

Off by default (marked `slow`, and skipped unless SETPOINT_LIVE_LLM_BASE_URL
is set), because no model server can be installed from the project's own
files in CI time. To run it with llama.cpp's server from PyPI and any small
GGUF model you have (Qwen2.5 0.5B/1.5B Instruct handles tool calls):

    .venv/bin/pip install 'llama-cpp-python[server]'
    .venv/bin/python -m llama_cpp.server --model ./qwen2.5-1.5b-instruct-q4_k_m.gguf \\
        --host 127.0.0.1 --port 8011 --chat_format chatml-function-calling &
    SETPOINT_LIVE_LLM_BASE_URL=http://127.0.0.1:8011/v1 SETPOINT_LIVE_LLM_MODEL=qwen \\
        .venv/bin/python -m pytest -m slow tests/integration/test_llm_live_server.py

vLLM (`--enable-auto-tool-choice`), LM Studio or Ollama's /v1 work the same way.
What it proves is the wire path: the real SDK sends our request to a real
server, a real model's answer comes back and is validated, and whatever
became of it, nothing invalid ran. Whether a small model plans well is what
`setpoint llm eval --live` measures, not this test.
"""

from __future__ import annotations

import os

import pytest
from harness import Harness, eventually
from test_issues import slow_poll

from reconciler.settings import Settings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("SETPOINT_LIVE_LLM_BASE_URL"),
        reason="set SETPOINT_LIVE_LLM_BASE_URL (and SETPOINT_LIVE_LLM_MODEL) to a real OpenAI-compatible server",
    ),
    pytest.mark.timeout(600),
]

FINAL = {"healed", "awaiting_approval", "unhealable", "failed", "blocked"}


async def test_a_real_model_on_loopback_answers_and_its_answer_is_validated(harness: Harness) -> None:
    model = {
        "provider": "openai", "model": os.environ.get("SETPOINT_LIVE_LLM_MODEL", "local"),
        "base_url": os.environ["SETPOINT_LIVE_LLM_BASE_URL"], "timeout_seconds": 300,
    }  # fmt: skip
    raw = harness.settings.model_dump(mode="json")
    raw["llm"] = {"tiers": {"small": [model]}}
    harness.settings = Settings.model_validate(raw)
    slow_poll(harness)
    await harness.start()
    await harness.put_desired(harness.resource("app", "listen 8080\n"))
    await harness.wait_status("app", "Converged")

    await harness.report_issue("app", "i1", "the app cannot read its config file since the last deploy")

    async def settled() -> dict[str, object] | None:
        state = (await harness.issue_states("app")).get("i1")
        return state if state is not None and state["state"] in FINAL else None

    state = await eventually(settled, timeout=540, what="the issue to be settled by the model's answer")
    assert (harness.root / "app").read_text() == "listen 8080\n", "whatever ran, it wrote only the desired content"
    answered = await harness.metric(
        f'setpoint_llm_requests_total{{model="{model["model"]}",provider="openai",result="ok",tier="small"}}'
    )
    assert answered is not None and answered >= 1, f"the server never answered: {state}"
