"""Reading desired resources from YAML or JSON files for `setpoint apply` (and later `plan -f`).

A file holds one or many documents; a document is one resource mapping or a
list of them. The whole file is validated before anything is written, and an
error names the file and the document (1-based) that is wrong.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from plans import Resource
from plans.errors import describe_validation_error


class DocumentError(ValueError):
    pass


def load_resources(path: Path) -> list[Resource]:
    """Every resource in `path`, or DocumentError for the first problem found."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DocumentError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise DocumentError(f"{path} is not UTF-8 text") from None
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        raise DocumentError(f"{path} is not valid YAML or JSON: {e}") from None
    resources: list[Resource] = []
    seen: dict[str, int] = {}
    index = 0
    for document in documents:
        if document is None:
            continue
        items = document if isinstance(document, list) else [document]
        for item in items:
            index += 1
            where = f"{path} document {index}"
            if not isinstance(item, dict):
                raise DocumentError(f"{where}: expected a mapping with kind, name and spec")
            try:
                resource = Resource.model_validate(item)
            except ValidationError as e:
                raise DocumentError(f"{where}: {describe_validation_error(e, whole='document')}") from None
            key = str(resource.key)
            if key in seen:
                raise DocumentError(f"{where}: {key} is already defined by document {seen[key]}")
            seen[key] = index
            resources.append(resource)
    if not resources:
        raise DocumentError(f"{path} holds no resources")
    return resources
