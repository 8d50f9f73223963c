"""Kinds and names match `[a-z0-9][a-z0-9._-]{0,62}`, so a key segment can never carry a `/` or a `..`."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from plans import Resource, ResourceKey, validate_name

VALID = ["a", "0", "motd", "web-01", "my.app_v2", "a" * 63]
INVALID = ["", "/", "a/b", "..", ".", ".hidden", "-a", "_a", "Motd", "ABC", "a" * 64, "a b", "a\n", "café"]


@pytest.mark.parametrize("name", VALID)
def test_valid_names_are_accepted_as_kind_and_name(name: str) -> None:
    assert validate_name(name, what="name") == name
    key = ResourceKey(kind=name, name=name)
    assert (key.kind, key.name) == (name, name)
    resource = Resource(kind=name, name=name, spec={})
    assert resource.key == key


@pytest.mark.parametrize("name", INVALID)
def test_invalid_names_are_rejected_naming_the_field(name: str) -> None:
    with pytest.raises(ValueError, match=r"^name .* does not match"):
        validate_name(name, what="name")
    with pytest.raises(ValidationError, match="name"):
        ResourceKey(kind="file", name=name)
    with pytest.raises(ValidationError, match="kind"):
        ResourceKey(kind=name, name="motd")
    with pytest.raises(ValidationError, match="name"):
        Resource(kind="file", name=name, spec={})
    with pytest.raises(ValidationError, match="kind"):
        Resource(kind=name, name="motd", spec={})


def test_a_name_is_at_most_63_characters() -> None:
    ResourceKey(kind="file", name="a" * 63)
    with pytest.raises(ValidationError):
        ResourceKey(kind="file", name="a" * 64)


def test_parse_reads_kind_slash_name_and_round_trips_through_str() -> None:
    key = ResourceKey.parse("file/motd")
    assert key == ResourceKey(kind="file", name="motd")
    assert str(key) == "file/motd"
    assert ResourceKey.parse(str(key)) == key


@pytest.mark.parametrize("text", ["motd", "file/a/b", "file/..", "/motd", "file/", "File/motd"])
def test_parse_rejects_anything_but_one_valid_kind_and_name(text: str) -> None:
    with pytest.raises(ValueError):
        ResourceKey.parse(text)
