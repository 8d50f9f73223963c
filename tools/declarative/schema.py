"""A tool's `parameters`, a small JSON schema, turned into a pydantic model that forbids extra fields.

Supported, and nothing else: at the top `type: object`, `properties`,
`required`, `description` and `additionalProperties: false` (always in force,
stated or not); for a property `type` (string, integer, number, boolean),
`description`, `enum`, `default`, and by type `pattern`, `minLength`,
`maxLength` (strings) or `minimum`, `maximum`, `exclusiveMinimum`,
`exclusiveMaximum` (numbers). Any other keyword is an error that names it:
a constraint an operator wrote must never be silently dropped.

A property not in `required` must have a `default`, so a placeholder always
has a value. Patterns are searched, as JSON Schema says (anchor them with
`^...$`), by pydantic's regular-expression engine, which runs in linear
time: look-around and back-references are refused when the file is loaded.
Defaults and enum values are checked against the property when loaded too.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model, field_validator
from pydantic_core import SchemaError

from plans.errors import describe_validation_error
from tools.declarative.errors import Loc, Problem
from tools.declarative.templates import PARAM_NAME, as_text

_TYPES: dict[str, type] = {"string": str, "integer": int, "number": float, "boolean": bool}
_TOP = {"type", "properties", "required", "additionalProperties", "description"}
_COMMON = {"type", "description", "enum", "default"}
_BY_TYPE = {
    "string": {"pattern", "minLength", "maxLength"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "boolean": set(),
}
_FIELD_ARGS = {
    "pattern": "pattern", "minLength": "min_length", "maxLength": "max_length", "minimum": "ge", "maximum": "le",
    "exclusiveMinimum": "gt", "exclusiveMaximum": "lt",
}  # fmt: skip
_RESERVED = frozenset(name for name in dir(BaseModel) if not name.startswith("_"))


def parameter_model(
    name: str, schema: object, *, loc: Loc, option_safe: Collection[str] = ()
) -> tuple[type[BaseModel], frozenset[str]]:
    """The model for `schema` and its parameter names. Values of the parameters in `option_safe` (each one
    starts an argument of a command) may not start with `-`, where a program would read them as an option."""
    if not isinstance(schema, dict):
        raise Problem(loc, "must be a JSON schema object: {type: object, properties: {...}}")
    unknown = sorted(set(schema) - _TOP)
    if unknown:
        supported = ", ".join(sorted(_TOP))
        raise Problem((*loc, unknown[0]), f"keyword {unknown[0]!r} is not supported (supported: {supported})")
    if schema.get("type", "object") != "object":
        raise Problem((*loc, "type"), "must be object")
    if schema.get("additionalProperties", False) is not False:
        raise Problem((*loc, "additionalProperties"), "must be false: a tool takes only the parameters it declares")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise Problem((*loc, "properties"), "must be a mapping of parameter names to their schemas")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise Problem((*loc, "required"), "must be a list of parameter names")
    for index, item in enumerate(required):
        if item not in properties:
            raise Problem((*loc, "required", index), f"{item!r} is not a declared property")
    fields: dict[str, Any] = {}
    for param, prop in properties.items():
        where = (*loc, "properties", param)
        if not isinstance(param, str) or PARAM_NAME.fullmatch(param) is None:
            raise Problem(where, f"parameter name {param!r} must match {PARAM_NAME.pattern}")
        if param in _RESERVED:
            raise Problem(where, f"parameter name {param!r} is reserved (it names a method of every parameter model)")
        fields[param] = _field(param, prop, loc=where, required=param in required)
    validators: dict[str, Callable[..., Any]] = {}
    safe = sorted(set(option_safe) & set(fields))
    if safe:
        validators["no_option_values"] = field_validator(*safe)(_not_an_option)
    config = ConfigDict(extra="forbid", frozen=True, title=f"{name} parameters")
    try:
        model = create_model(
            f"Params_{name.replace('.', '_').replace('-', '_')}", __config__=config, __validators__=validators,
            __doc__=schema.get("description") or None, **fields,
        )  # fmt: skip
    except SchemaError as e:  # a pattern the engine cannot run
        raise Problem(loc, f"cannot be used: {str(e).splitlines()[-1].strip()}") from None
    assert isinstance(model, type) and issubclass(model, BaseModel)
    return model, frozenset(fields)


def _not_an_option(cls: type[BaseModel], value: object) -> object:
    if isinstance(value, str | int | float) and as_text(value).startswith("-"):
        raise ValueError("starts a command's argument, so it may not start with '-' (the program would read an option)")
    return value


def _field(param: str, prop: object, *, loc: Loc, required: bool) -> tuple[Any, Any]:
    if not isinstance(prop, dict):
        raise Problem(loc, "must be a schema such as {type: string}")
    kind = prop.get("type")
    if kind not in _TYPES:
        raise Problem((*loc, "type"), f"must be one of {', '.join(_TYPES)}, not {kind!r}")
    allowed = _COMMON | _BY_TYPE[kind]
    for keyword in prop:
        if keyword not in allowed:
            supported = ", ".join(sorted(allowed))
            raise Problem((*loc, keyword), f"keyword {keyword!r} is not supported for a {kind} ({supported} are)")
    description = prop.get("description")
    if description is not None and not isinstance(description, str):
        raise Problem((*loc, "description"), "must be a string")
    constraints: dict[str, Any] = {}
    for keyword, argument in _FIELD_ARGS.items():
        if keyword not in prop:
            continue
        value = prop[keyword]
        wants = str if keyword == "pattern" else int if keyword in ("minLength", "maxLength") else int | float
        if isinstance(value, bool) or not isinstance(value, wants):
            raise Problem((*loc, keyword), f"must be {'a string' if wants is str else 'a number'}")
        constraints[argument] = value
    annotation: Any = _TYPES[kind]
    if "enum" in prop:
        values = prop["enum"]
        if not isinstance(values, list) or not values:
            raise Problem((*loc, "enum"), "must be a non-empty list")
        for index, value in enumerate(values):
            _check_value(_TYPES[kind], constraints, value, loc=(*loc, "enum", index), what="enum value")
        annotation = Literal[tuple(values)]
    info = Field(description=description, **constraints)
    try:
        adapter: TypeAdapter[Any] = TypeAdapter(Annotated[annotation, info])
    except SchemaError as e:
        raise Problem(loc, f"cannot be used: {str(e).splitlines()[-1].strip()}") from None
    if "default" in prop:
        _check_value(annotation, constraints, prop["default"], loc=(*loc, "default"), what="default", adapter=adapter)
        return annotation, Field(default=prop["default"], description=description, **constraints)
    if not required:
        raise Problem(loc, f"parameter {param!r} is not required, so it needs a default")
    return annotation, info


def _check_value(
    kind: Any, constraints: dict[str, Any], value: object, *, loc: Loc, what: str,
    adapter: TypeAdapter[Any] | None = None,
) -> None:  # fmt: skip
    try:
        (adapter or TypeAdapter(Annotated[kind, Field(**constraints)])).validate_python(value, strict=True)
    except ValidationError as e:
        reason = describe_validation_error(e, what=None, whole="").lstrip(": ")
        raise Problem(loc, f"{what} {value!r} {reason}") from None
    except SchemaError as e:
        raise Problem(loc, f"cannot be used: {str(e).splitlines()[-1].strip()}") from None
