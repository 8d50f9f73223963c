"""The cache turns any etcd value into an entry, never an exception, and never moves a key backwards."""

from __future__ import annotations

import json

import pytest

from plans import ResourceKey
from reconciler.cache import Cache, parse_desired
from reconciler.keys import KeySpace
from reconciler.store import KeyValue

KEYS = KeySpace("/sp")
FILE_A = ResourceKey(kind="file", name="a")


def kv(key: str, value: bytes, rev: int) -> KeyValue:
    return KeyValue(key=key.encode(), value=value, mod_revision=rev)


def good(name: str = "a", content: str = "x") -> bytes:
    return json.dumps({"kind": "file", "name": name, "spec": {"path": f"/r/{name}", "content": content}}).encode()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid UTF-8"),
        (b"{", "not valid JSON"),
        (b"null", "must be a JSON object"),
        (b'"just a string"', "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "nested too deeply"),
        (b'{"kind": "file", "name": "a"}', "'spec' is required"),
        (b'{"kind": "file", "name": "a", "spec": [], "labels": {}}', "spec"),
        (b'{"kind": "file", "name": "a", "spec": {}, "labels": {"x": 1}}', "labels.x"),
        (b'{"kind": "file", "name": "a", "spec": {}, "extra": true}', "'extra' is not allowed"),
        (b'{"kind": "file", "name": "b", "spec": {}}', "names file/b but is stored under file/a"),
        (b'{"kind": "File", "name": "a", "spec": {}}', "kind"),
        (b'{"kind": "file", "name": "../etc", "spec": {}}', "name"),
    ],
)
def test_hostile_desired_values_become_invalid_entries(raw: bytes, reason: str) -> None:
    entry = parse_desired(FILE_A, kv("/sp/desired/file/a", raw, 7))

    assert entry.resource is None
    assert entry.error, "an invalid value needs a reason"
    assert reason in entry.error
    assert len(entry.error) <= 300
    assert entry.mod_revision == 7


def test_valid_desired_value_parses() -> None:
    entry = parse_desired(FILE_A, kv("/sp/desired/file/a", good(), 3))

    assert entry.valid
    assert entry.resource is not None and entry.resource.spec["content"] == "x"


def test_keys_outside_the_layout_are_reported_not_cached() -> None:
    cache = Cache(KEYS)

    change = cache.apply_put(kv("/sp/desired/file/a/extra", good(), 2))
    bad_name = cache.apply_put(kv("/sp/desired/file/UPPER", good(), 3))
    bad_plan = cache.apply_put(kv("/sp/approvals/NOT-A-PLAN", b"{}", 4))
    ignored = cache.apply_put(kv("/sp/plans/123", b"{}", 5))

    assert change is not None and change.resource is None and change.reason
    assert bad_name is not None and bad_name.resource is None and bad_name.rejected_key == "/sp/desired/file/UPPER"
    assert bad_plan is not None and bad_plan.rejected_key == "/sp/approvals/NOT-A-PLAN"
    assert ignored is None
    assert cache.desired == {} and cache.approvals == {}


def test_a_decision_is_cached_by_plan_id_and_an_unreadable_one_keeps_its_reason() -> None:
    cache = Cache(KEYS)

    change = cache.apply_put(kv("/sp/approvals/123-abc", b'{"decision": "maybe"}', 4))

    assert change is not None and change.plan_id == "123-abc" and change.resource is None
    entry = cache.approvals["123-abc"]
    assert entry.approval is None and entry.error is not None and "decision" in entry.error
    assert cache.apply_delete(b"/sp/approvals/123-abc", 5) is not None
    assert cache.approvals == {}


def test_an_event_older_than_the_cached_value_is_dropped() -> None:
    cache = Cache(KEYS)
    cache.apply_put(kv("/sp/desired/file/a", good(content="new"), 10))

    assert cache.apply_put(kv("/sp/desired/file/a", good(content="old"), 9)) is None
    assert cache.apply_put(kv("/sp/desired/file/a", good(content="same"), 10)) is None
    assert cache.apply_delete(b"/sp/desired/file/a", 8) is None

    entry = cache.desired[FILE_A]
    assert entry.resource is not None and entry.resource.spec["content"] == "new"


def test_deleting_a_valid_desired_value_leaves_a_tombstone_with_the_last_value() -> None:
    cache = Cache(KEYS)
    cache.apply_put(kv("/sp/desired/file/a", good(content="last"), 5))

    change = cache.apply_delete(b"/sp/desired/file/a", 6)

    assert change is not None and change.resource == FILE_A
    tomb = cache.desired[FILE_A]
    assert tomb.deleted and tomb.mod_revision == 6
    assert tomb.resource is not None and tomb.resource.spec["content"] == "last"
    cache.forget_tombstone(FILE_A, 5)
    assert FILE_A in cache.desired, "a tombstone is only forgotten for its own revision"
    cache.forget_tombstone(FILE_A, 6)
    assert FILE_A not in cache.desired


def test_deleting_an_invalid_desired_value_forgets_it() -> None:
    cache = Cache(KEYS)
    cache.apply_put(kv("/sp/desired/file/a", b"junk", 5))

    cache.apply_delete(b"/sp/desired/file/a", 6)

    assert FILE_A not in cache.desired


def test_recreating_a_deleted_resource_replaces_its_tombstone() -> None:
    cache = Cache(KEYS)
    cache.apply_put(kv("/sp/desired/file/a", good(content="1"), 5))
    cache.apply_delete(b"/sp/desired/file/a", 6)

    cache.apply_put(kv("/sp/desired/file/a", good(content="2"), 7))

    entry = cache.desired[FILE_A]
    assert not entry.deleted and entry.resource is not None and entry.resource.spec["content"] == "2"


def test_replace_synthesises_deletes_for_vanished_keys_and_puts_for_changed_ones() -> None:
    cache = Cache(KEYS)
    for name, rev in (("a", 2), ("b", 3), ("c", 4)):
        cache.apply_put(kv(f"/sp/desired/file/{name}", good(name), rev))
    cache.apply_put(kv("/sp/actual/file/b", b"{}", 5))

    changes = cache.replace(
        [kv("/sp/desired/file/a", good("a"), 2), kv("/sp/desired/file/c", good("c", "v2"), 9)], revision=10
    )

    changed = {c.resource for c in changes}
    b, c = ResourceKey(kind="file", name="b"), ResourceKey(kind="file", name="c")
    assert changed == {b, c}
    assert cache.desired[b].deleted and cache.desired[b].mod_revision == 10
    assert cache.desired[c].resource is not None and cache.desired[c].resource.spec["content"] == "v2"
    assert b not in cache.actual
    assert cache.revision == 10


def test_surrogate_pairs_are_valid_and_lone_surrogates_are_not() -> None:
    pair = json.dumps({"kind": "file", "name": "a", "spec": {"path": "/r/a", "content": "\U0001f600"}}).encode()
    lone = pair.replace(b"\\ud83d\\ude00", b"\\ud83d")

    assert b"\\ud83d\\ude00" in pair, "json.dumps escapes the emoji as a surrogate pair"
    assert parse_desired(FILE_A, kv("/sp/desired/file/a", pair, 2)).valid
    entry = parse_desired(FILE_A, kv("/sp/desired/file/a", lone, 3))
    assert entry.error is not None and "surrogate" in entry.error
