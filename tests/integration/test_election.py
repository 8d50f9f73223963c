"""The election against a real etcd, with short leases: who leads, how a term ends, and what comes after.

Leases of 2 s, a renew deadline of 1.5 s and a try every 0.5 s keep these fast. Figures (how long a takeover
took) are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from harness import eventually, sample_value

from reconciler.election import Campaign, Election, uptime
from reconciler.embedded import EmbeddedEtcd
from reconciler.keys import KeySpace
from reconciler.metrics import Metrics
from reconciler.settings import ElectionSettings
from reconciler.store import EtcdStore, LeadershipLostError, Put

SHORT = {"lease_seconds": 2, "renew_seconds": 1.5, "retry_seconds": 0.5}


@dataclass
class Member:
    election: Election
    metrics: Metrics
    task: asyncio.Task[None]
    now: list[float] = field(default_factory=lambda: [0.0])  # an offset added to the election's clock

    def stop(self) -> None:
        """Stop renewing and trying, without a word to etcd: as a process that died or froze."""
        self.task.cancel()

    def lost(self, reason: str) -> float | None:
        return sample_value(self.metrics.registry, f'setpoint_leadership_lost_total{{reason="{reason}"}}')


class Cluster:
    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self.keys = KeySpace(f"/elect-{uuid.uuid4().hex[:8]}")
        self.leader_key = f"{self.keys.prefix}/leader"
        self.members: list[Member] = []

    def start(self, member_id: str, *, takeover: bool = False) -> Member:
        metrics = Metrics()
        now = [0.0]
        election = Election(
            store=self.store, keys=self.keys, settings=ElectionSettings(member_id=member_id, **SHORT),
            member={"http": "127.0.0.1:0"}, metrics=metrics, takeover=takeover,
            clock=lambda: uptime() + now[0],
        )  # fmt: skip
        member = Member(election, metrics, asyncio.create_task(election.run()), now)
        self.members.append(member)
        return member

    async def leader(self) -> tuple[str, int, int] | None:
        """Who `leader` names, its create revision and its lease; None when there is no such key."""
        kv = await self.store.get(self.leader_key)
        return (json.loads(kv.value)["id"], kv.create_revision, kv.lease) if kv is not None else None

    async def close(self) -> None:
        for member in self.members:
            member.task.cancel()
        await asyncio.gather(*(m.task for m in self.members), return_exceptions=True)
        for member in self.members:
            await member.election.resign()


@pytest.fixture
async def cluster(etcd: EmbeddedEtcd) -> AsyncIterator[Cluster]:
    async with EtcdStore([etcd.endpoint]) as store:
        c = Cluster(store)
        try:
            yield c
        finally:
            await c.close()


async def test_of_two_daemons_one_leads_the_other_stands_by_and_both_are_members(cluster: Cluster) -> None:
    a, b = cluster.start("a"), cluster.start("b")
    outcomes: list[Campaign] = list(await asyncio.gather(a.election.campaign(), b.election.campaign()))
    won = [o for o in outcomes if o.term is not None]
    assert len(won) == 1, outcomes
    winner, loser = (a, b) if outcomes[0].term is not None else (b, a)
    standby = outcomes[1] if winner is a else outcomes[0]
    assert standby.leader == winner.election.member_id

    leader = await cluster.leader()
    assert leader is not None and leader[0] == winner.election.member_id
    fence = winner.election.fence()
    assert fence is not None and (fence.key, fence.create_revision) == (cluster.leader_key, leader[1])
    assert loser.election.fence() is None
    assert winner.election.leading and not loser.election.leading
    prefix = f'{{prefix="{cluster.keys.prefix}"}}'
    assert sample_value(winner.metrics.registry, f"setpoint_leader{prefix}") == 1
    assert sample_value(loser.metrics.registry, f"setpoint_leader{prefix}") == 0

    members, _ = await cluster.store.get_prefix(f"{cluster.keys.prefix}/members/")
    assert sorted(json.loads(kv.value)["id"] for kv in members) == ["a", "b"]
    assert all(kv.lease != 0 for kv in members), "members are registered with their lease"
    assert leader[2] == next(kv.lease for kv in members if json.loads(kv.value)["id"] == leader[0])

    # Renewals go on: well past the lease, the same term holds.
    await asyncio.sleep(3 * SHORT["lease_seconds"])
    assert winner.election.fence() == fence and await cluster.leader() == leader


async def test_a_leader_that_resigns_is_replaced_at_once(cluster: Cluster) -> None:
    a = cluster.start("a")
    assert (await a.election.campaign()).term is not None
    b = cluster.start("b")
    assert (await b.election.campaign()).leader == "a"
    first = await cluster.leader()

    a.stop()
    resigned = time.monotonic()
    await a.election.resign()
    term = await asyncio.wait_for(b.election.next_term(), timeout=10)
    print(f"\nresign to takeover: {time.monotonic() - resigned:.2f} s (retry_seconds {SHORT['retry_seconds']})")
    now = await cluster.leader()
    assert first is not None and now is not None and now[0] == "b"
    assert term.fence.create_revision == now[1] > first[1]
    assert await cluster.store.get(f"{cluster.keys.prefix}/members/a") is None, "the lease took the member key"


async def test_a_leader_that_dies_silently_is_replaced_once_its_lease_expires(cluster: Cluster) -> None:
    a = cluster.start("a")
    assert (await a.election.campaign()).term is not None
    b = cluster.start("b")
    assert (await b.election.campaign()).term is None

    a.stop()  # no resign: the lease runs out in etcd
    died = time.monotonic()
    await asyncio.wait_for(b.election.next_term(), timeout=15)
    print(f"\nsilent death to takeover: {time.monotonic() - died:.2f} s (lease {SHORT['lease_seconds']} s)")
    assert (await cluster.leader() or ("",))[0] == "b"


async def test_the_renew_deadline_ends_the_term_before_etcd_would(cluster: Cluster) -> None:
    a = cluster.start("a")
    won = await a.election.campaign()
    assert won.term is not None
    fenced = cluster.store.fenced(a.election.fence)
    await fenced.put(f"{cluster.keys.prefix}/x", b"while leading")

    a.stop()  # frozen: no renewal from now on
    await asyncio.gather(a.task, return_exceptions=True)
    a.now[0] = SHORT["renew_seconds"]  # and the renew deadline has passed
    with pytest.raises(LeadershipLostError, match="does not lead"):
        await fenced.put(f"{cluster.keys.prefix}/x", b"after the deadline")
    assert won.term.ended.is_set() and "renew_seconds (1.5 s)" in won.term.why
    assert a.election.fence() is None and a.lost("not_renewed") == 1
    # It stepped down on its own: etcd still holds its lease and its leader key.
    leader = await cluster.leader()
    assert leader is not None and leader[0] == "a"
    assert (await cluster.store.get(f"{cluster.keys.prefix}/x")).value == b"while leading"  # type: ignore[union-attr]


async def test_a_lease_gone_ends_the_term_and_the_next_one_has_a_new_fence(cluster: Cluster) -> None:
    a = cluster.start("a")
    first = await a.election.campaign()
    assert first.term is not None
    fenced = cluster.store.fenced(a.election.fence)
    leader = await cluster.leader()
    assert leader is not None

    await cluster.store.revoke_lease(leader[2])  # as if it had expired
    await asyncio.wait_for(first.term.ended.wait(), timeout=5)
    assert "lease is gone" in first.term.why and a.lost("lease_gone") == 1
    with pytest.raises(LeadershipLostError):
        await fenced.put(f"{cluster.keys.prefix}/x", b"lost")

    async def registered_again() -> bool:
        return await cluster.store.get(f"{cluster.keys.prefix}/members/a") is not None

    await eventually(registered_again, what="the member key put again with a new lease")
    second = await a.election.campaign()  # the daemon stands by again, then campaigns
    assert second.term is not None and second.term.fence.create_revision > first.term.fence.create_revision
    await fenced.put(f"{cluster.keys.prefix}/x", b"leading again")  # the view follows the election's fence


async def test_a_leader_key_deleted_or_replaced_ends_the_term(cluster: Cluster) -> None:
    a = cluster.start("a")
    won = await a.election.campaign()
    assert won.term is not None
    old_lease = (await cluster.leader() or ("", 0, 0))[2]
    await cluster.store.txn(then=[Put(cluster.leader_key, json.dumps({"id": "intruder"}).encode())])
    # An overwrite keeps the create revision: the fence holds, and the term with it.
    await asyncio.sleep(2 * SHORT["retry_seconds"])
    assert a.election.fence() == won.term.fence
    await cluster.store.delete(cluster.leader_key)
    await cluster.store.put(cluster.leader_key, json.dumps({"id": "intruder"}).encode())
    await asyncio.wait_for(won.term.ended.wait(), timeout=5)
    assert a.lost("key_changed") == 1 and "deleted or replaced" in won.term.why

    async def old_lease_revoked() -> bool:
        return old_lease not in {kv.lease for kv in (await cluster.store.get_prefix(cluster.keys.prefix + "/"))[0]}

    assert (await a.election.campaign()).leader == "intruder"  # it stands by again, and only then revokes
    await eventually(old_lease_revoked, what="the lease of the ended term revoked")


async def test_a_leader_key_left_by_a_previous_run_is_taken_over_with_the_embedded_etcd(cluster: Cluster) -> None:
    previous = await cluster.store.grant_lease(60)
    old_run = {"id": "old-run", "host": socket.gethostname()}
    await cluster.store.put_leased(cluster.leader_key, json.dumps(old_run).encode(), lease=previous.id)
    waiting = cluster.start("waits")
    assert (await waiting.election.campaign()).leader == "old-run"  # an external etcd: it may be another host's

    takes = cluster.start("takes", takeover=True)
    outcome = await takes.election.campaign()
    assert outcome.term is not None
    assert (await cluster.leader() or ("",))[0] == "takes"
    assert not await cluster.store.revoke_lease(previous.id), "the old run's lease was revoked"


async def test_a_leader_key_under_this_member_id_from_another_host_is_waited_out(cluster: Cluster) -> None:
    # Two hosts given one member_id (a ConfigMap shared by both replicas) must not take the key from each other:
    # only a key this host left is this daemon's own.
    elsewhere = await cluster.store.grant_lease(60)
    value = {"id": "shared", "host": "another-host.example", "pid": 1}
    await cluster.store.put_leased(cluster.leader_key, json.dumps(value).encode(), lease=elsewhere.id)
    here = cluster.start("shared")
    outcome = await here.election.campaign()
    assert outcome.term is None and outcome.leader == "shared"
    assert (await cluster.leader() or ("", 0, 0))[2] == elsewhere.id, "the other host's leader key was taken"

    here.task.cancel()
    await asyncio.gather(here.task, return_exceptions=True)
    await here.election.resign()
    await cluster.store.revoke_lease(elsewhere.id)
    value["host"] = socket.gethostname()  # the same id on this host, by a process that is gone: a previous run
    value["pid"] = dead_pid()
    previous = await cluster.store.grant_lease(60)
    await cluster.store.put_leased(cluster.leader_key, json.dumps(value).encode(), lease=previous.id)
    again = cluster.start("shared")
    assert (await again.election.campaign()).term is not None


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


async def test_two_live_daemons_given_one_member_id_never_take_the_key_from_each_other(cluster: Cluster) -> None:
    first = cluster.start("twin")
    won = await first.election.campaign()
    assert won.term is not None
    second = cluster.start("twin")  # the same id, host and pid: a duplicate, not a previous run
    for _ in range(4):
        assert (await second.election.campaign()).term is None
    assert first.election.fence() == won.term.fence and not won.term.ended.is_set()
    member = await cluster.store.get(f"{cluster.keys.prefix}/members/twin")
    assert member is not None and member.lease == (await cluster.leader() or ("", 0, 0))[2], "the member key was taken"


async def test_a_malformed_leader_value_is_someone_else_and_stops_nothing(cluster: Cluster) -> None:
    held = await cluster.store.grant_lease(60)
    await cluster.store.put_leased(cluster.leader_key, b"[" * 100_000, lease=held.id)
    a = cluster.start("a")
    assert (await a.election.campaign()).term is None
    assert not a.task.done()
    await cluster.store.revoke_lease(held.id)
    assert (await a.election.campaign()).term is not None


async def test_a_term_that_ends_while_the_leader_key_is_read_stops_nothing(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = cluster.start("a")
    won = await a.election.campaign()
    assert won.term is not None
    get = cluster.store.get

    async def stalled_get(key: str) -> Any:
        if key == cluster.leader_key and not won.term.ended.is_set():  # type: ignore[union-attr]
            a.now[0] += 10  # the loop stalled past the renew deadline while the read was out
            assert a.election.fence() is None  # a worker's write finds the term over first
        return await get(key)

    monkeypatch.setattr(cluster.store, "get", stalled_get)
    await asyncio.wait_for(won.term.ended.wait(), timeout=5)
    await asyncio.sleep(3 * SHORT["retry_seconds"])
    assert not a.task.done(), a.task.exception() if a.task.done() else None
    assert a.lost("not_renewed") == 1


async def test_a_standby_keeps_one_watch_on_the_leader_key_across_rounds(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = cluster.start("a")
    assert (await a.election.campaign()).term is not None
    opened = [0]
    watch = cluster.store.watch

    def counting_watch(*args: Any, **kwargs: Any) -> Any:
        opened[0] += 1
        return watch(*args, **kwargs)

    monkeypatch.setattr(cluster.store, "watch", counting_watch)
    b = cluster.start("b")
    assert (await b.election.campaign()).leader == "a"
    await asyncio.sleep(8 * SHORT["retry_seconds"])  # eight rounds standing by
    assert opened == [1], f"{opened[0]} watch streams for one leader"
    resigned = time.monotonic()
    await a.election.resign()
    await asyncio.wait_for(b.election.next_term(), timeout=3 * SHORT["lease_seconds"])
    print(f"\nresign to takeover through the watch: {time.monotonic() - resigned:.2f} s")
    assert (await b.election.campaign()).term is not None  # campaigning while leading answers at once
