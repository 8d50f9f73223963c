"""Templates with `{param}` placeholders, and header values with `${ENV_NAME}` secrets.

A template is parsed once, when its definition is loaded, into literal text
and placeholders; `{{` and `}}` stand for literal braces, and any other brace
is an error, so a typo never reaches a command line. What a placeholder
becomes depends on where it stands, never on its value:

- an argv element that is exactly `{param}` is that parameter's value as one
  argument; a placeholder inside a longer element is text within that one
  argument. Nothing is ever split or passed through a shell.
- in a URL, the value is percent-quoted with no safe characters, so it is
  one path segment or query value and cannot add a `/`, `?`, `#`, `@` or `&`.
- in a JSON body, a string that is exactly `{param}` becomes the parameter's
  typed JSON value; a placeholder inside a longer string is text within it.

A value as text is the string itself, or its JSON form for a number or a
boolean (`5`, `1.5`, `true`).

Header values may name environment variables as `${NAME}`; they are read
when the definition is loaded and kept in `Secret`s, whose `repr` and `str`
never show the value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from pydantic import JsonValue

from tools.declarative.errors import Loc, Problem

PARAM_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_SECRET = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Value = str | int | float | bool


@dataclass(frozen=True, slots=True)
class Param:
    name: str


@dataclass(frozen=True, slots=True)
class Template:
    parts: tuple[str | Param, ...]

    @property
    def whole(self) -> Param | None:
        """The placeholder, when the template is exactly one placeholder."""
        return self.parts[0] if len(self.parts) == 1 and isinstance(self.parts[0], Param) else None

    @property
    def params(self) -> list[str]:
        return [part.name for part in self.parts if isinstance(part, Param)]

    def show(self) -> str:
        """The template as written (placeholders as `{name}`)."""
        return "".join(
            part.replace("{", "{{").replace("}", "}}") if isinstance(part, str) else f"{{{part.name}}}"
            for part in self.parts
        )

    def render(self, values: Mapping[str, Value], quote_value: Callable[[str], str] = lambda text: text) -> str:
        return "".join(
            part if isinstance(part, str) else quote_value(as_text(values[part.name])) for part in self.parts
        )


def as_text(value: Value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def parse(text: str, *, loc: Loc, known: frozenset[str]) -> Template:
    """`text` as a template whose placeholders all name one of `known`; Problem at `loc` otherwise."""
    parts: list[str | Param] = []
    literal: list[str] = []
    position = 0
    for match in _TOKEN.finditer(text):
        literal.append(text[position : match.start()])
        position = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            literal.append(token[0])
            continue
        name = match.group(1)
        if name is None or PARAM_NAME.fullmatch(name) is None:
            raise Problem(loc, f"{token!r} in {text!r} is not a placeholder: write {{name}} with a parameter's name, "
                               f"and {{{{ or }}}} for a literal brace")  # fmt: skip
        if name not in known:
            names = ", ".join(sorted(known)) or "none are declared"
            raise Problem(loc, f"placeholder {{{name}}} names no parameter (the parameters: {names})")
        if "".join(literal):
            parts.append("".join(literal))
        literal = []
        parts.append(Param(name))
    literal.append(text[position:])
    if "".join(literal):
        parts.append("".join(literal))
    return Template(tuple(parts))


def quote_component(text: str) -> str:
    """A value as one URL path segment or query value."""
    return quote(text, safe="")


# -- JSON bodies ------------------------------------------------------------------------------------------------




def parse_body(value: JsonValue, *, loc: Loc, known: frozenset[str]) -> object:
    """A JSON body template: every string parsed as a template; keys are literal and may hold no placeholder."""
    if isinstance(value, str):
        template = parse(value, loc=loc, known=known)
        return template if template.params else template.render({})
    if isinstance(value, list):
        return [parse_body(item, loc=(*loc, index), known=known) for index, item in enumerate(value)]
    if isinstance(value, dict):
        parsed: dict[str, object] = {}
        for key, item in value.items():
            if parse(key, loc=(*loc, key), known=known).params:
                raise Problem((*loc, key), f"key {key!r}: a key cannot hold a placeholder; only values can")
            parsed[key.replace("{{", "{").replace("}}", "}")] = parse_body(item, loc=(*loc, key), known=known)
        return parsed
    return value


def render_body(body: object, values: Mapping[str, Value]) -> JsonValue:
    """The body with every placeholder filled: a whole-string placeholder by the typed value, others as text."""
    if isinstance(body, Template):
        whole = body.whole
        return values[whole.name] if whole is not None else body.render(values)
    if isinstance(body, list):
        return [render_body(item, values) for item in body]
    if isinstance(body, dict):
        return {key: render_body(item, values) for key, item in body.items()}
    assert body is None or isinstance(body, str | int | float | bool)
    return body


# -- secrets ----------------------------------------------------------------------------------------------------


class Secret:
    """A header value that names an environment variable: `reveal()` is the only way to its text."""

    __slots__ = ("_parts", "_value", "names")

    def __init__(self, value: str, names: tuple[str, ...], parts: tuple[str, ...] = ()) -> None:
        self._value = value
        self._parts = parts
        self.names = names

    def reveal(self) -> str:
        return self._value

    def scrub(self, text: str) -> str:
        """`text` with every variable's value in it replaced by [REDACTED] (a server may echo a header back)."""
        for part in sorted(self._parts, key=len, reverse=True):
            text = text.replace(part, "[REDACTED]")
        return text

    def __repr__(self) -> str:
        return f"Secret(from {', '.join('$' + name for name in self.names)})"

    __str__ = __repr__


def header_value(text: str, *, loc: Loc, environ: Mapping[str, str] | None) -> str | Secret:
    """`text` with every `${NAME}` replaced by the variable's value (a Secret then); `environ` None: the
    variables are not read (a command that runs no tool), and the value stands empty."""
    names = _SECRET.findall(text)
    for name in names:
        if _ENV_NAME.fullmatch(name) is None:
            raise Problem(loc, f"${{{name}}} is not an environment variable's name")
    if not names:
        _check_header_text(text, loc=loc, what="the value")
        return text
    if environ is None:
        return Secret("", tuple(names))
    missing = [name for name in names if name not in environ]
    if missing:
        raise Problem(loc, f"environment variable {missing[0]} is not set (the header's value names it)")
    for name in names:
        _check_header_text(environ[name], loc=loc, what=f"environment variable {name}")
    value = _SECRET.sub(lambda match: environ[match.group(1)], text)
    return Secret(value, tuple(names), tuple(environ[name] for name in names if environ[name]))


def _check_header_text(text: str, *, loc: Loc, what: str) -> None:
    if any(ch in text for ch in "\r\n\x00"):
        raise Problem(loc, f"{what} holds a line break or NUL, which a header value cannot")
