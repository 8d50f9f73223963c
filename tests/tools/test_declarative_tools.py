"""Declarative tools: loading with line-precise errors, command tools run for real, http tools against a real server.

Command tools run a real script that records its argv, environment and pid;
http tools call a real aiohttp server on loopback that records what it got.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from plans import ResourceKey, RiskLevel
from tools import ToolContext, ToolRegistry, ToolStatus
from tools.builtin.files import file_tools
from tools.declarative import CommandTool, HttpTool, ToolDefinitionError, load_tools, register
from tools.declarative.command import MAX_CAPTURE_BYTES

CTX = ToolContext(plan_id="p1", resource=ResourceKey(kind="service", name="web"), step_index=0)
SECRET = "s3cr3t-token-0123456789"


def tools_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tools.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def load(path: Path, *, allowed: list[str] | None = None, environ: dict[str, str] | None = None) -> list[Any]:
    return list(load_tools([str(path)], allowed_executables=["/usr/bin/*", "/bin/*"] if allowed is None else allowed,
                           environ=environ if environ is not None else {}))  # fmt: skip


def load_error(path: Path, **kwargs: Any) -> str:
    with pytest.raises(ToolDefinitionError) as caught:
        load(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


GOOD = """
tools:
  - name: demo.echo
    description: Echo a word.
    kind: command
    risk: low
    idempotent: true
    kinds: [service]
    parameters:
      type: object
      properties:
        word: {type: string, maxLength: 40}
        times: {type: integer, minimum: 1, default: 1}
      required: [word]
    argv: [echo, "{word}", "times={times}"]
"""


def test_a_good_definition_becomes_a_tool_with_a_strict_parameter_model(tmp_path: Path) -> None:
    [tool] = load(tools_file(tmp_path, GOOD))

    assert isinstance(tool, CommandTool)
    assert (tool.name, tool.risk, tool.idempotent, tool.kinds) == ("demo.echo", RiskLevel.LOW, True, {"service"})
    assert tool.defined_at == f"tool definition file {tmp_path / 'tools.yaml'} line 2"
    schema = tool.parameters.model_json_schema()
    assert schema["additionalProperties"] is False and schema["required"] == ["word"]
    assert schema["properties"]["word"]["maxLength"] == 40
    params = tool.parameters.model_validate({"word": "hi"}, strict=True)
    assert tool.command(params) == ["echo", "hi", "times=1"]
    with pytest.raises(ValidationError):
        tool.parameters.model_validate({"word": "hi", "shell": "sh"}, strict=True)
    with pytest.raises(ValidationError):
        tool.parameters.model_validate({"word": "hi", "times": "2"}, strict=True)


def _with(line: str, replacement: str) -> str:
    assert line in GOOD, line
    return GOOD.replace(line, replacement, 1)


# (the change to GOOD, the line the error must name, what the error must say)
BAD_FIELDS = [
    pytest.param(_with("name: demo.echo", "name: echo"), 2, "tool 'echo', name", id="name-not-dotted"),
    pytest.param(_with("    description: Echo a word.\n", ""), 2, "description is required", id="no-description"),
    pytest.param(_with("kind: command", "kind: shell"), 4, "kind: must be command or http, not 'shell'", id="kind"),
    pytest.param(_with("risk: low", "risk: extreme"), 5, "tool 'demo.echo', risk", id="risk"),
    pytest.param(_with("idempotent: true", "idempotent: maybe"), 6, "idempotent", id="idempotent"),
    pytest.param(_with("kinds: [service]", "kinds: [service]\n    timeout_seconds: 0"), 8, "timeout_seconds",
                 id="timeout"),
    pytest.param(_with("kinds: [service]", "kinds: [Not A Kind]"), 7, "kind 'Not A Kind' does not match",
                 id="kinds"),
    pytest.param(_with("kinds: [service]", "kinds: [service]\n    shell: true"), 8, "shell is not a known field",
                 id="unknown-field"),
    pytest.param(_with("type: object", "type: object\n      format: strict"), 10,
                 "parameters.format: keyword 'format' is not supported", id="unsupported-top-keyword"),
    pytest.param(_with("type: object", "type: object\n      additionalProperties: true"), 10,
                 "additionalProperties: must be false", id="additional-properties"),
    pytest.param(_with("{type: string, maxLength: 40}", "{type: string, format: email}"), 11,
                 "parameters.properties.word.format: keyword 'format' is not supported for a string",
                 id="unsupported-property-keyword"),
    pytest.param(_with("{type: string, maxLength: 40}", "{type: array}"), 11, "must be one of string, integer",
                 id="property-type"),
    pytest.param(_with("{type: integer, minimum: 1, default: 1}", "{type: integer, minimum: 1}"), 12,
                 "parameter 'times' is not required, so it needs a default", id="optional-without-default"),
    pytest.param(_with("{type: integer, minimum: 1, default: 1}", "{type: integer, minimum: 1, default: 0}"), 12,
                 "parameters.properties.times.default: default 0 ", id="default-outside-its-bounds"),
    pytest.param(_with("{type: string, maxLength: 40}", "{type: string, pattern: '(?<=a)b'}"), 11,
                 "look-around", id="pattern-the-engine-cannot-run"),
    pytest.param(_with("{type: string, maxLength: 40}", "{type: string, enum: [a, 2]}"), 11,
                 "enum.1: enum value 2", id="enum-value-of-another-type"),
    pytest.param(_with("required: [word]", "required: [word, nope]"), 13, "'nope' is not a declared property",
                 id="required-undeclared"),
    pytest.param(_with('"{word}"', '"{wrod}"'), 14, "argv.1: placeholder {wrod} names no parameter",
                 id="unknown-placeholder"),
    pytest.param(_with('"{word}"', '"{word!r}"'), 14, "is not a placeholder", id="not-a-placeholder"),
    pytest.param(_with("argv: [echo,", 'argv: ["{word}",'), 14, "argv.0: the program may not be a placeholder",
                 id="program-placeholder"),
    pytest.param(_with("argv: [echo,", "argv: [no-such-program-here,"), 14, "'no-such-program-here' is not found",
                 id="program-missing"),
    pytest.param(_with("argv: [echo,", "argv: [bin/echo,"), 14, "is a relative path", id="program-relative"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "line", "says"), BAD_FIELDS)
def test_each_bad_field_is_one_sentence_naming_file_line_tool_and_field(
    tmp_path: Path, text: str, line: int, says: str
) -> None:
    path = tools_file(tmp_path, text)

    message = load_error(path)

    assert message.startswith(f"tool definition file {path} line {line}: tool "), message
    assert says in message, message


HTTP = """
tools:
  - name: app.reload
    description: Reload.
    kind: http
    risk: medium
    idempotent: true
    parameters:
      type: object
      properties:
        port: {type: integer}
      required: [port]
    method: POST
    url: "http://127.0.0.1:{port}/-/reload"
    headers:
      Authorization: "Bearer ${APP_TOKEN}"
    body: {port: "{port}"}
    expect_status: [200, "300-399"]
"""


@pytest.mark.parametrize(
    ("old", "new", "line", "says"),
    [
        ("url: \"http://127.0.0.1:{port}/-/reload\"", "url: \"ftp://127.0.0.1/{port}\"", 13, "url: must start with"),
        ("url: \"http://127.0.0.1:{port}/-/reload\"", "url: \"http://{port}/\"", 13, "a literal host"),
        ("url: \"http://127.0.0.1:{port}/-/reload\"", "url: \"http://api{port}/-/reload\"", 13,
         "{port} stands in the host part: only an integer port may, after ':'"),
        ("url: \"http://127.0.0.1:{port}/-/reload\"", "url: \"http://127.0.0.1:{port}{port}/\"", 13,
         "{port} stands in the host part"),
        ("method: POST", "method: BREW", 12, "method"),
        ('expect_status: [200, "300-399"]', 'expect_status: [200, "2xx"]', 17, "'2xx' is not a status or a range"),
        ('body: {port: "{port}"}', 'body: {"{port}": 1}', 16, "a key cannot hold a placeholder"),
        ('Authorization: "Bearer ${APP_TOKEN}"', 'X-A: "${not a name}"', 15, "is not an environment variable"),
    ],
)  # fmt: skip
def test_each_bad_http_field_is_located(tmp_path: Path, old: str, new: str, line: int, says: str) -> None:
    path = tools_file(tmp_path, HTTP.replace(old, new))

    message = load_error(path, environ={"APP_TOKEN": SECRET})

    assert message.startswith(f"tool definition file {path} line {line}: tool 'app.reload', "), message
    assert says in message, message


def test_a_missing_secret_is_named_and_a_secret_is_never_shown(tmp_path: Path) -> None:
    path = tools_file(tmp_path, HTTP)

    missing = load_error(path, environ={})
    [tool] = load(path, environ={"APP_TOKEN": SECRET})
    newline = load_error(path, environ={"APP_TOKEN": SECRET + "\r\nX-Evil: 1"})

    assert f"{path} line 15: tool 'app.reload', headers.Authorization: environment variable APP_TOKEN is not set" in (
        missing
    )
    assert SECRET not in repr(tool) and SECRET not in repr(tool._headers) and SECRET not in str(vars(tool))
    assert "line break" in newline and SECRET not in newline


def test_a_file_that_is_not_a_tools_list_or_not_yaml_is_located(tmp_path: Path) -> None:
    listed = load_error(tools_file(tmp_path, "- name: a.b\n"))
    broken = load_error(tools_file(tmp_path, "tools:\n  - name: [a.b\n"))

    assert "line 1: a tool definition file holds one key, tools" in listed
    assert "line 3 column 1: not valid YAML" in broken or "line 2" in broken


def test_a_name_defined_twice_names_both_places(tmp_path: Path) -> None:
    first = tools_file(tmp_path, GOOD)
    second = tmp_path / "more.yaml"
    second.write_text(textwrap.dedent(GOOD).lstrip("\n"))

    with pytest.raises(ToolDefinitionError) as caught:
        load_tools([str(first), str(second)], allowed_executables=["/usr/bin/*", "/bin/*"], environ={})

    assert str(caught.value) == (
        f"tool definition file {second} line 2: tool 'demo.echo' is defined twice "
        f"(first at tool definition file {first} line 2)"
    )


def test_a_built_in_tools_name_is_refused_naming_both(tmp_path: Path) -> None:
    path = tools_file(tmp_path, GOOD.replace("name: demo.echo", "name: file.write"))
    registry = ToolRegistry(file_tools(allowed_roots=[str(tmp_path)]))

    with pytest.raises(ToolDefinitionError) as caught:
        register(registry, load(path))

    assert str(caught.value) == (
        f"tool definition file {path} line 2: tool 'file.write' has the name of the built-in tool 'file.write' "
        f"(FileWrite); give the declared tool another name"
    )


# -- command tools, run for real ---------------------------------------------------------------------------------


@dataclass
class Script:
    """An executable that writes its argv, environment and pid to a JSON file, then does what `body` says."""

    path: Path
    record: Path

    def ran(self) -> dict[str, Any]:
        return dict(json.loads(self.record.read_text()))


def make_script(directory: Path, body: str = "", name: str = "record") -> Script:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    record = directory / f"{name}.json"
    path.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys, time, subprocess\n"
        f"json.dump({{'argv': sys.argv, 'env': dict(os.environ), 'cwd': os.getcwd(), 'pid': os.getpid()}}, "
        f"open({str(record)!r}, 'w'))\n" + textwrap.dedent(body)
    )
    path.chmod(0o755)
    return Script(path, record)


def command_file(tmp_path: Path, argv: list[str], *, timeout: float = 10, env: dict[str, str] | None = None,
                 schema: dict[str, Any] | None = None) -> Path:  # fmt: skip
    definition = {
        "name": "demo.run", "description": "Run the script.", "kind": "command", "risk": "low", "idempotent": False,
        "timeout_seconds": timeout, "argv": argv, "env": env or {},
        "parameters": schema or {"type": "object", "properties": {"arg": {"type": "string"}}, "required": ["arg"]},
    }  # fmt: skip
    path = tmp_path / "command.yaml"
    path.write_text(json.dumps({"tools": [definition]}))
    return path


async def run(tool: CommandTool | HttpTool, **params: Any) -> Any:
    return await tool.execute(tool.parameters.model_validate(params, strict=True), CTX)


HOSTILE = ["x; rm -rf /tmp/setpoint-should-not-exist", "$(touch {canary})", "`touch {canary}`", "*", "a b\tc\nd",
           "'quoted' \"double\"", "|| true &&", ">{canary}"]  # fmt: skip


@pytest.mark.parametrize("hostile", HOSTILE)
async def test_a_command_argument_arrives_as_one_argv_element_never_through_a_shell(
    tmp_path: Path, hostile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = make_script(tmp_path / "bin")
    canary = tmp_path / "canary"
    value = hostile.replace("{canary}", str(canary))
    monkeypatch.chdir(tmp_path)  # a glob, were it expanded, would find files here
    (tmp_path / "a-file").write_text("")
    [tool] = load(command_file(tmp_path, [str(script.path), "{arg}", "--value={arg}", "fixed"]),
                  allowed=[str(script.path)])  # fmt: skip

    result = await run(tool, arg=value)

    assert result.status is ToolStatus.SUCCESS, result.error
    assert script.ran()["argv"][1:] == [value, f"--value={value}", "fixed"]
    assert not canary.exists(), "nothing was expanded or redirected"


async def test_a_command_runs_with_only_path_lang_and_its_env_in_slash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    script = make_script(tmp_path / "bin", "print('out'); print('err', file=sys.stderr)")
    [tool] = load(command_file(tmp_path, [str(script.path), "{arg}"], env={"MODE": "fast"}),
                  allowed=[str(script.path)])  # fmt: skip

    result = await run(tool, arg="a")

    ran = script.ran()
    assert {k: v for k, v in ran["env"].items() if k not in ("LC_CTYPE",)} == {
        "PATH": os.environ["PATH"], "LANG": "C.UTF-8", "MODE": "fast"
    }
    assert ran["cwd"] == "/"
    assert result.output == {"exit_code": 0, "stdout": "out\n", "stderr": "err\n"}


async def test_argv_zero_is_as_written_and_the_program_is_found_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = make_script(tmp_path / "bin", name="greet")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    [tool] = load(command_file(tmp_path, ["greet", "{arg}"]), allowed=[str(tmp_path / "bin" / "*")])

    result = await run(tool, arg="hi")

    assert result.ok, result.error
    assert script.ran()["argv"] == [str(script.path), "hi"]  # python reports the script it runs as argv[0]


async def test_a_value_that_would_start_an_option_is_refused_unless_after_double_dash(tmp_path: Path) -> None:
    script = make_script(tmp_path / "bin")
    [plain] = load(command_file(tmp_path, [str(script.path), "{arg}"]), allowed=[str(script.path)])
    [ended] = load(command_file(tmp_path, [str(script.path), "--", "{arg}"]), allowed=[str(script.path)])
    [inside] = load(command_file(tmp_path, [str(script.path), "--name={arg}"]), allowed=[str(script.path)])

    with pytest.raises(ValidationError, match="may not start with '-'"):
        plain.parameters.model_validate({"arg": "-H evil.example"}, strict=True)
    assert (await run(ended, arg="-H")).ok
    assert script.ran()["argv"][1:] == ["--", "-H"]
    assert (await run(inside, arg="-H")).ok


def test_programs_outside_the_allowlist_are_refused_when_loaded(tmp_path: Path) -> None:
    allowed_dir = tmp_path / "allowed"
    script = make_script(allowed_dir)
    outside = make_script(tmp_path / "outside", name="other")
    link = allowed_dir / "innocent"
    link.symlink_to(outside.path)

    empty = load_error(command_file(tmp_path, [str(script.path), "{arg}"]), allowed=[])
    elsewhere = load_error(command_file(tmp_path, ["/bin/sh", "-c", "{arg}"]), allowed=[str(allowed_dir / "*")])
    via_link = load_error(command_file(tmp_path, [str(link), "{arg}"]), allowed=[str(allowed_dir / "*")])

    assert [] == [m for m in (empty, elsewhere, via_link) if "argv.0" not in m]
    assert "tools.allowed_executables is empty, which refuses every command tool" in empty
    assert "does not allow" in elsewhere
    assert f"resolves to {outside.path}" in via_link and "does not allow" in via_link


async def test_a_program_swapped_for_a_link_outside_after_loading_is_refused_at_run(tmp_path: Path) -> None:
    allowed_dir = tmp_path / "allowed"
    script = make_script(allowed_dir)
    outside = make_script(tmp_path / "outside", name="other")
    [tool] = load(command_file(tmp_path, [str(script.path), "{arg}"]), allowed=[str(allowed_dir / "*")])
    script.path.unlink()
    script.path.symlink_to(outside.path)

    result = await run(tool, arg="x")

    assert result.status is ToolStatus.ERROR and "does not allow" in str(result.error)
    assert not outside.record.exists(), "the program outside the allowlist never ran"


async def test_a_non_zero_exit_is_an_error_with_the_code_and_the_tail_of_stderr(tmp_path: Path) -> None:
    script = make_script(tmp_path / "bin", "print('x' * 5000, file=sys.stderr); print('unit not found', "
                                           "file=sys.stderr); sys.exit(3)")  # fmt: skip
    [tool] = load(command_file(tmp_path, [str(script.path), "{arg}"]), allowed=[str(script.path)])

    result = await run(tool, arg="a")

    assert result.status is ToolStatus.ERROR
    assert str(result.error).startswith(f"{script.path} exited with code 3: ")
    assert str(result.error).endswith("unit not found") and len(str(result.error)) < 400
    assert result.output["exit_code"] == 3


async def test_output_is_capped_to_its_tail(tmp_path: Path) -> None:
    script = make_script(tmp_path / "bin", "sys.stdout.write('a' * 300000 + 'THE END')")
    [tool] = load(command_file(tmp_path, [str(script.path), "{arg}"]), allowed=[str(script.path)])

    result = await run(tool, arg="a")

    stdout = str(result.output["stdout"])
    assert len(stdout) == MAX_CAPTURE_BYTES and stdout.endswith("THE END")


SPAWNS_AND_HANGS = """
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[2], "w").write(f"{os.getpid()} {child.pid}")
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # dead, waiting for whoever adopted it to reap it


async def _wait_gone(pids: list[int]) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while not all(_gone(pid) for pid in pids):
        assert asyncio.get_running_loop().time() < deadline, f"still running: {[p for p in pids if not _gone(p)]}"
        await asyncio.sleep(0.05)


def _read_pids(path: Path) -> list[int]:
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


async def _pids(path: Path) -> list[int]:
    deadline = asyncio.get_running_loop().time() + 10
    while len(pids := _read_pids(path)) < 2:
        assert asyncio.get_running_loop().time() < deadline, "the script never started its child"
        await asyncio.sleep(0.05)
    return pids


async def test_a_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    script = make_script(tmp_path / "bin", SPAWNS_AND_HANGS)
    pids = tmp_path / "pids"
    [tool] = load(command_file(tmp_path, [str(script.path), "{arg}", str(pids)], timeout=1.5),
                  allowed=[str(script.path)])  # fmt: skip

    result = await run(tool, arg="a")

    assert result.status is ToolStatus.ERROR
    assert "did not finish within 1.5 s; its process group was killed" in str(result.error)
    assert not result.retryable, "not idempotent: a timed-out call may have taken effect"
    await _wait_gone(await _pids(pids))


async def test_a_cancelled_step_kills_the_whole_process_group(tmp_path: Path) -> None:
    script = make_script(tmp_path / "bin", SPAWNS_AND_HANGS)
    pids = tmp_path / "pids"
    [tool] = load(command_file(tmp_path, [str(script.path), "{arg}", str(pids)], timeout=60),
                  allowed=[str(script.path)])  # fmt: skip
    task = asyncio.create_task(run(tool, arg="a"))
    running = await _pids(pids)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await _wait_gone(running)


# -- http tools, against a real server ---------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    url: str
    seen: list[Seen] = field(default_factory=list)
    status: int = 200
    echo_auth: bool = False


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server(url="")

    async def handle(request: web.Request) -> web.Response:
        state.seen.append(Seen(request.method, request.raw_path, dict(request.headers), await request.read()))
        text = f"you sent {request.headers.get('Authorization', '')}" if state.echo_auth else "ok"
        return web.Response(status=state.status, text=text)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


def http_file(tmp_path: Path, server: Server, **overrides: Any) -> Path:
    definition = {
        "name": "app.call", "description": "Call the app.", "kind": "http", "risk": "medium", "idempotent": True,
        "timeout_seconds": 5, "method": "PUT", "url": server.url + "/items/{name}?q={query}",
        "headers": {"Authorization": "Bearer ${APP_TOKEN}", "X-Fixed": "yes"},
        "body": {"count": "{count}", "flag": "{flag}", "label": "item {name}", "nested": ["{count}", {"k": "{{x}}"}]},
        "parameters": {"type": "object", "required": ["name", "query", "count", "flag"], "properties": {
            "name": {"type": "string"}, "query": {"type": "string"}, "count": {"type": "integer"},
            "flag": {"type": "boolean"}}},
    } | overrides  # fmt: skip
    path = tmp_path / "http.yaml"
    path.write_text(json.dumps({"tools": [definition]}))
    return path


PARAMS = {"name": "a/b c?d#e", "query": "x&y=z", "count": 7, "flag": True}


async def test_an_http_tool_sends_method_quoted_url_typed_json_body_and_the_secret_header(
    tmp_path: Path, server: Server
) -> None:
    [tool] = load(http_file(tmp_path, server), environ={"APP_TOKEN": SECRET})

    result = await run(tool, **PARAMS)

    assert result.status is ToolStatus.SUCCESS, result.error
    assert result.output == {"status": 200, "body": "ok", "truncated": False}
    [seen] = server.seen
    assert seen.method == "PUT"
    assert seen.raw_path == "/items/a%2Fb%20c%3Fd%23e?q=x%26y%3Dz"
    assert json.loads(seen.body) == {"count": 7, "flag": True, "label": "item a/b c?d#e", "nested": [7, {"k": "{x}"}]}
    assert seen.headers["Authorization"] == f"Bearer {SECRET}" and seen.headers["X-Fixed"] == "yes"
    assert seen.headers["Content-Type"] == "application/json"


async def test_an_unexpected_status_is_an_error_and_the_secret_appears_nowhere(
    tmp_path: Path, server: Server, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    server.status, server.echo_auth = 500, True
    [tool] = load(http_file(tmp_path, server), environ={"APP_TOKEN": SECRET})

    result = await run(tool, **PARAMS)

    assert result.status is ToolStatus.ERROR
    assert str(result.error).startswith(f"PUT {server.url}/items/a%2Fb%20c%3Fd%23e?q=x%26y%3Dz answered 500, "
                                        f"expected 200-299: you sent Bearer [REDACTED]")  # fmt: skip
    captured = capsys.readouterr()
    everything = [result.model_dump_json(), repr(tool), captured.out, captured.err, caplog.text]
    assert [text for text in everything if SECRET in text] == []
    assert server.seen[0].headers["Authorization"] == f"Bearer {SECRET}", "the server did get it"


@pytest.mark.parametrize(
    ("expect", "status", "ok"),
    [([204], 204, True), ([204], 200, False), ("300-399", 302, True), ([200, "500-503"], 503, True),
     ("200-299", 404, False)],
)  # fmt: skip
async def test_expect_status_decides_success(
    tmp_path: Path, server: Server, expect: Any, status: int, ok: bool
) -> None:
    server.status = status
    [tool] = load(http_file(tmp_path, server, expect_status=expect), environ={"APP_TOKEN": SECRET})

    result = await run(tool, **PARAMS)

    assert result.ok is ok, result.error
    assert len(server.seen) == 1, "a redirect is not followed"


async def test_a_refused_connection_is_retryable_and_says_so(tmp_path: Path, server: Server) -> None:
    dead = Server(url="http://127.0.0.1:9")  # discard: nothing listens on loopback
    [tool] = load(http_file(tmp_path, dead), environ={"APP_TOKEN": SECRET})

    result = await run(tool, **PARAMS)

    assert result.status is ToolStatus.ERROR and result.retryable
    assert "cannot connect" in str(result.error) and SECRET not in str(result.error)


async def test_loaded_without_secrets_a_tool_validates_but_does_not_run(tmp_path: Path, server: Server) -> None:
    [tool] = load_tools([str(http_file(tmp_path, server))], allowed_executables=[], resolve_host=False)

    result = await run(tool, **PARAMS)

    assert result.status is ToolStatus.ERROR and "without reading its secrets" in str(result.error)
    assert server.seen == []
