"""YAML documents that remember where each value came from, so an error can name the file and line.

Settings, policy files and resource files are read through here. A syntax
error says `FILE line L column C: problem`, never `<unicode string>`, and a
value that fails validation later is located with `Document.line(loc)`:
the line of the deepest part of the path that exists in the file.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from plans.errors import describe_validation_error

Loc = tuple[str | int, ...]


class YamlError(ValueError):
    """A file could not be read or parsed; the message names the file and, when known, the line."""


@dataclass(frozen=True, slots=True)
class Document:
    data: object
    name: str
    lines: dict[Loc, int] = field(default_factory=dict)  # 1-based line of each path's value

    def line(self, loc: Sequence[str | int]) -> int | None:
        """The line of the deepest prefix of `loc` that is in the file."""
        loc = tuple(loc)
        while loc not in self.lines and loc:
            loc = loc[:-1]
        return self.lines.get(loc)

    def where(self, loc: Sequence[str | int]) -> str:
        """`NAME line N` for `loc`, or just `NAME`."""
        line = self.line(loc)
        return f"{self.name} line {line}" if line is not None else self.name

    def describe(self, error: ValidationError, **describe: Any) -> str:
        """`NAME line N: <the first problem>` for a validation error raised on this document's data."""
        first = error.errors()[0]
        return f"{self.where(first['loc'])}: {describe_validation_error(error, **describe)}"


def read_text(path: str | Path, *, what: str = "") -> tuple[str, str]:
    """The text of `path` (`-` is standard input) and the name to report it by (`what` before the path)."""
    name = f"{what} {'standard input' if str(path) == '-' else path}".strip()
    try:
        if str(path) == "-":
            return sys.stdin.read(), name
        return Path(path).read_text(encoding="utf-8"), name
    except OSError as e:
        raise YamlError(f"cannot read {name}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise YamlError(f"{name} is not UTF-8 text (byte {e.start})") from None


def parse_documents(text: str, name: str) -> list[Document]:
    """Every document in `text`, with the line of each value; YamlError naming `name` and the line."""
    loader = yaml.SafeLoader(text)
    loader.name = name
    documents: list[Document] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            assert node is not None  # check_node said there is one
            lines: dict[Loc, int] = {}
            _record(node, (), lines)
            documents.append(Document(loader.construct_document(node), name, lines))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name} line {mark.line + 1} column {mark.column + 1}" if mark is not None else name
        raise YamlError(f"{where}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise YamlError(f"{name}: not valid YAML: {e}") from None
    finally:
        loader.dispose()
    return documents


def load_document(path: str | Path, *, what: str = "") -> Document:
    """The single document in `path`; an empty file is an empty mapping. `what` names the file's role."""
    text, name = read_text(path, what=what)
    documents = parse_documents(text, name)
    if len(documents) > 1:
        raise YamlError(f"{name} holds {len(documents)} YAML documents; it must hold one")
    return documents[0] if documents else Document({}, name)


def _record(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> None:
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                _record(value_node, (*loc, str(key_node.value)), lines)
                lines[(*loc, str(key_node.value))] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record(item, (*loc, index), lines)
