"""Reading desired resources from YAML or JSON files for `setpoint apply` and `setpoint plan -f`.

A file holds one or many documents; a document is one resource mapping or a
list of them. The whole file is validated before anything is written, and an
error names the file, the line and the field that are wrong. `-` is
standard input.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from plans import Resource
from plans.errors import describe_validation_error
from plans.yamldoc import YamlError, parse_documents, read_text


class DocumentError(ValueError):
    pass


def load_resources(path: Path | str) -> list[Resource]:
    """Every resource in `path` (`-`: standard input), or DocumentError for the first problem found."""
    try:
        text, name = read_text(path)
        documents = parse_documents(text, name)
    except YamlError as e:
        raise DocumentError(str(e)) from None
    resources: list[Resource] = []
    seen: dict[str, str] = {}
    for document in documents:
        if document.data is None:
            continue
        items = document.data if isinstance(document.data, list) else [document.data]
        for index, item in enumerate(items):
            loc: tuple[int, ...] = (index,) if isinstance(document.data, list) else ()
            where = document.where(loc)
            if not isinstance(item, dict):
                raise DocumentError(f"{where}: expected a mapping with kind, name and spec")
            try:
                resource = Resource.model_validate(item)
            except ValidationError as e:
                first = e.errors()[0]["loc"]
                reason = describe_validation_error(e, whole="resource")
                raise DocumentError(f"{document.where((*loc, *first))}: {reason}") from None
            key = str(resource.key)
            if key in seen:
                raise DocumentError(f"{where}: {key} is already defined at {seen[key]}")
            seen[key] = where
            resources.append(resource)
    if not resources:
        raise DocumentError(f"{name} holds no resources")
    return resources
