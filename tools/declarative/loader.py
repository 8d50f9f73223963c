"""Reading tool definition files into tools, with every error located by file, line, tool and field.

A file is a mapping with one key, `tools`, holding a list of definitions
(a mapping, so that a settings or policy file given by mistake is refused
rather than half read). Each definition is checked completely when it is
loaded: its fields, its parameter schema, every placeholder, the program a
command runs (resolved and allowed, unless `resolve=False`) and the
environment variables its headers name. A name may be defined once across
all files, and never shadow a built-in tool (`register`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StrictBool, StrictStr, ValidationError, field_validator

from plans import RiskLevel, validate_name
from plans.errors import describe_validation_error
from plans.yamldoc import Document, YamlError, load_document
from tools.declarative.base import DeclaredTool
from tools.declarative.command import KILL_GRACE_SECONDS, CommandTool
from tools.declarative.errors import Loc, Problem, ToolDefinitionError
from tools.declarative.executables import ExecutableNotAllowed, resolve
from tools.declarative.http import HttpTool
from tools.declarative.schema import parameter_model
from tools.declarative.templates import Param, Secret, header_value, parse, parse_body
from tools.registry import ToolRegistry

TOOL_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}(\.[a-z0-9][a-z0-9_-]{0,62})+")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class _Definition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr = Field(pattern=TOOL_NAME.pattern, description="Dotted, e.g. systemctl.restart.")
    description: StrictStr = Field(min_length=1, max_length=1000)
    risk: RiskLevel
    idempotent: StrictBool
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600, description="Defaults to 30 s.")
    kinds: list[StrictStr] = Field(default_factory=list, description="Kinds a model planner is offered it for.")
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, value: list[str]) -> list[str]:
        return [validate_name(kind, what="kind") for kind in value]


class CommandDefinition(_Definition):
    kind: Literal["command"]
    argv: list[StrictStr] = Field(min_length=1, description="The program and its arguments, as templates.")
    env: dict[StrictStr, StrictStr] = Field(default_factory=dict, description="Fixed environment variables.")


StatusRange = Annotated[int, Field(ge=100, le=599)] | StrictStr


class HttpDefinition(_Definition):
    kind: Literal["http"]
    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
    url: StrictStr = Field(min_length=1)
    body: JsonValue = None
    headers: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    expect_status: StatusRange | list[StatusRange] = "200-299"


def load_tools(
    paths: Sequence[str], *, allowed_executables: Sequence[str], resolve_host: bool = True,
    environ: Mapping[str, str] | None = None,
) -> list[DeclaredTool]:  # fmt: skip
    """The tools defined in `paths`, in order; ToolDefinitionError naming file, line, tool and field.
    `resolve_host=False` skips what depends on this machine (programs on PATH, secrets in the environment):
    for commands that run no tool. `environ` defaults to the process's environment."""
    env = os.environ if environ is None else environ
    tools: list[DeclaredTool] = []
    seen: dict[str, str] = {}
    for path in paths:
        try:
            document = load_document(path, what="tool definition file")
        except YamlError as e:
            raise ToolDefinitionError(str(e)) from None
        entries = _entries(document)
        for index, entry in enumerate(entries):
            name = entry.get("name") if isinstance(entry, dict) else None
            label = f"tool {name!r}" if isinstance(name, str) else f"tools.{index}"
            where = document.where(("tools", index, "name"))
            kinds_at = document.where(("tools", index, "kinds"))
            try:
                tool = _tool(entry, allowed=allowed_executables, resolve_host=resolve_host, environ=env)
            except Problem as e:
                field = ".".join(str(part) for part in e.loc) or "(the definition)"
                where = document.where(("tools", index, *e.loc))
                raise ToolDefinitionError(f"{where}: {label}, {field}: {e.message}") from None
            except ValidationError as e:
                where = document.where(("tools", index, *e.errors()[0]["loc"]))
                reason = describe_validation_error(
                    e, what=None, whole="(the definition)", unknown="is not a known field"
                )
                raise ToolDefinitionError(f"{where}: {label}, {reason}") from None
            tool.defined_at, tool.kinds_at = where, kinds_at
            if tool.name in seen:
                raise ToolDefinitionError(f"{where}: tool {tool.name!r} is defined twice (first at {seen[tool.name]})")
            seen[tool.name] = where
            tools.append(tool)
    return tools


def register(registry: ToolRegistry, tools: Iterable[DeclaredTool]) -> None:
    """Add `tools` to `registry`; ToolDefinitionError when one has a built-in tool's name."""
    for tool in tools:
        if tool.name in registry:
            builtin = registry.get(tool.name)
            raise ToolDefinitionError(
                f"{tool.defined_at}: tool {tool.name!r} has the name of the built-in tool {builtin.name!r} "
                f"({type(builtin).__name__}); give the declared tool another name"
            )
        registry.register(tool)


def check_kinds(tools: Iterable[DeclaredTool], known: Collection[str]) -> None:
    """ToolDefinitionError when a tool is offered for a kind no agent handles (a typo, most likely)."""
    for tool in tools:
        for kind in sorted(tool.kinds - set(known)):
            raise ToolDefinitionError(
                f"{tool.kinds_at}: tool {tool.name!r}, kinds: no agent handles kind {kind!r} "
                f"(the kinds: {', '.join(sorted(known))})"
            )


def _entries(document: Document) -> list[Any]:
    data = document.data
    if not isinstance(data, dict) or set(data) != {"tools"}:
        raise ToolDefinitionError(f"{document.where(())}: a tool definition file holds one key, tools: a list of "
                                  f"tool definitions")  # fmt: skip
    if not isinstance(data["tools"], list):
        raise ToolDefinitionError(f"{document.where(('tools',))}: tools must be a list of tool definitions")
    return data["tools"]


def _tool(entry: object, *, allowed: Sequence[str], resolve_host: bool, environ: Mapping[str, str]) -> DeclaredTool:
    if not isinstance(entry, dict):
        raise Problem((), "must be a mapping with name, description, kind, risk, idempotent, ...")
    kind = entry.get("kind")
    if kind not in ("command", "http"):
        raise Problem(("kind",), f"must be command or http, not {kind!r}" if "kind" in entry else "is required")
    if kind == "command":
        return _command(CommandDefinition.model_validate(entry), allowed=allowed, resolve_host=resolve_host)
    return _http(HttpDefinition.model_validate(entry), environ=environ if resolve_host else None)


def _attributes(definition: _Definition, parameters: type[BaseModel], timeout_s: float) -> dict[str, Any]:
    return {
        "name": definition.name, "description": definition.description, "parameters": parameters,
        "risk": definition.risk, "idempotent": definition.idempotent, "timeout_s": timeout_s,
        "kinds": frozenset(definition.kinds),
    }  # fmt: skip


def _command(definition: CommandDefinition, *, allowed: Sequence[str], resolve_host: bool) -> CommandTool:
    names = _names(definition.parameters)
    argv = [parse(element, loc=("argv", i), known=names) for i, element in enumerate(definition.argv)]
    if argv[0].params:
        raise Problem(("argv", 0), "the program may not be a placeholder: it is fixed by the definition")
    # A value that starts an argument could be read as an option, unless a literal `--` came before it.
    end = next((i for i, element in enumerate(definition.argv) if element == "--"), len(argv))
    starting = {first.name for t in argv[1:end] if isinstance(first := t.parts[0], Param)}
    parameters, _ = parameter_model(definition.name, definition.parameters, loc=("parameters",),
                                    option_safe=starting)  # fmt: skip
    for key, value in definition.env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or "\x00" in value:
            raise Problem(("env", key), f"{key!r} is not an environment variable's name, or its value holds a NUL")
    program = definition.argv[0]
    if resolve_host:
        try:
            resolve(program, allowed)
        except ExecutableNotAllowed as e:
            raise Problem(("argv", 0), str(e)) from None
    cls = type(f"Command_{definition.name}", (CommandTool,), _attributes(
        definition, parameters, definition.timeout_seconds + KILL_GRACE_SECONDS))  # fmt: skip
    tool: CommandTool = cls(argv=argv, env=definition.env, allowed=allowed, timeout_seconds=definition.timeout_seconds)
    return tool


def _http(definition: HttpDefinition, *, environ: Mapping[str, str] | None) -> HttpTool:
    names = _names(definition.parameters)
    parameters, _ = parameter_model(definition.name, definition.parameters, loc=("parameters",))
    url = parse(definition.url, loc=("url",), known=names)
    literal = url.parts[0] if url.parts and isinstance(url.parts[0], str) else ""
    if not re.match(r"https?://[^/{]", literal, re.IGNORECASE):
        raise Problem(("url",), "must start with http:// or https:// and a literal host (a placeholder may follow)")
    if any(ch.isspace() or ord(ch) < 32 for part in url.parts if isinstance(part, str) for ch in part):
        raise Problem(("url",), "holds white space or a control character; write it percent-encoded")
    _fixed_host(url.parts, definition.parameters)
    body = parse_body(definition.body, loc=("body",), known=names) if definition.body is not None else None
    headers: dict[str, str | Secret] = {}
    for name, text in definition.headers.items():
        if _HEADER_NAME.fullmatch(name) is None:
            raise Problem(("headers", name), f"{name!r} is not a valid header name")
        headers[name] = header_value(text, loc=("headers", name), environ=environ)
    cls = type(f"Http_{definition.name}", (HttpTool,), _attributes(definition, parameters, definition.timeout_seconds
                                                                     + KILL_GRACE_SECONDS))  # fmt: skip
    tool: HttpTool = cls(
        method=definition.method, url=url, body=body, has_body=definition.body is not None, headers=headers,
        expect=_statuses(definition.expect_status), timeout_seconds=definition.timeout_seconds,
        secrets_read=environ is not None,
    )  # fmt: skip
    return tool


def _fixed_host(parts: Sequence[str | Param], schema: object) -> None:
    """A placeholder before the URL's path may only be an integer port right after a ':': a text value there could
    extend the host name (`http://api{p}` with `.evil.example`) and send the tool's secret headers elsewhere."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    authority = True
    previous = ""
    for part in parts:
        if isinstance(part, str):
            rest = part.split("://", 1)[-1] if part is parts[0] else part
            if "/" in rest or "?" in rest or "#" in rest:
                authority = False
            previous = part
            continue
        if not authority:
            return
        spec = properties.get(part.name) if isinstance(properties, dict) else None
        if not previous.endswith(":") or not isinstance(spec, dict) or spec.get("type") != "integer":
            raise Problem(("url",), f"{{{part.name}}} stands in the host part: only an integer port may, after ':', "
                                    "so the host is always the one written")  # fmt: skip
        previous = ""


def _names(schema: object) -> frozenset[str]:
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict):
        return frozenset()
    return frozenset(name for name in properties if isinstance(name, str))


def _statuses(value: int | str | list[int | str]) -> list[tuple[int, int]]:
    ranges = []
    for index, item in enumerate(value if isinstance(value, list) else [value]):
        loc: Loc = ("expect_status", index) if isinstance(value, list) else ("expect_status",)
        if isinstance(item, int):
            ranges.append((item, item))
            continue
        match = re.fullmatch(r"\s*(\d{3})\s*-\s*(\d{3})\s*", item)
        if match is None or not 100 <= int(match[1]) <= int(match[2]) <= 599:
            raise Problem(loc, f"{item!r} is not a status or a range of statuses such as 200-299")
        ranges.append((int(match[1]), int(match[2])))
    return ranges


