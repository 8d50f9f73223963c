"""Leader election on an etcd lease, with a fencing token: one daemon per prefix acts, the others stand by.

Each daemon takes one lease of `election.lease_seconds` when it starts and
registers under `members/<id>` with it. A daemon that is ready to lead (its
cache is warm: `campaign`) tries to create `leader` with its lease, only if
the key is absent. The create revision of the key it made is its fence
(`store.Fence`): every write of the runtime goes through the store's fenced
view, which etcd refuses once `leader` is gone or someone else's. So a
leader that was paused past its lease (SIGSTOP, a long GC, a partition)
and wakes up writes nothing, whatever it believes.

One loop (`run`) does everything, every `retry_seconds`: it renews the
lease with one keepalive round trip, and then either checks, as the leader,
that `leader` is still the key it created, or, as a standby, tries to take
it. A standby also watches `leader` between tries, so a leader that resigns
(a clean stop revokes its lease) is replaced at once, not at the next try.

A term ends, and the daemon stops acting, as soon as any of these is seen:

- no renewal succeeded within `renew_seconds` of the time the last good one
  was *sent* (the lease cannot have expired in etcd before the time it was
  sent plus its TTL, and `renew_seconds` < `lease_seconds`, so a leader
  steps down before anyone else can lead). `fence()` checks this deadline
  each time it is asked, without waiting for the loop: a process that was
  frozen and wakes up finds itself out at its first write;
- the keepalive says the lease is gone;
- `leader` was deleted or now has another create revision.

After a term the lease that held it is revoked (at once, or as soon as etcd
answers), so a new term always has a new fence and a write left over from
the old term can never pass; a new lease is granted and `members/<id>` put
again. The daemon stands by with a fresh runtime and calls `campaign` again.
`resign` (a clean stop) revokes the lease, deleting `leader`: a standby
takes over within moments.

The leases of ended terms are revoked only when the daemon campaigns again,
after its old runtime drained: revoked earlier, a standby would take over
while a step of the old term still runs.

A `leader` or `members/<id>` key written on this host under this daemon's
member id by a process that is gone was left by its previous run (a restart
with a fixed `member_id`): its lease is revoked and the key taken at once
instead of waited out. With the embedded etcd (`takeover`), the state
directory is locked by this daemon, so a `leader` key of this host found at
the first try was left by its previous run (etcd restores leases when it
restarts). A member key of a live daemon is never taken: a second daemon
given the same `member_id` does not register, campaigns for nothing, and
says why at every try. The default member id (host, pid and a random part)
is unique.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog

from reconciler.keys import KeySpace
from reconciler.metrics import Metrics
from reconciler.settings import ElectionSettings
from reconciler.store import Created, EtcdStore, Fence, KeyValue, StoreAccessError, StoreError, StoreUnavailableError

log = structlog.get_logger("setpoint.election")

T = TypeVar("T")

REVOKE_TIMEOUT_SECONDS = 2.0  # a clean stop waits no longer than this for etcd to take the lease back


def uptime() -> float:
    """Seconds on a clock that never goes back and, unlike the monotonic clock, keeps counting while the machine
    is suspended: a leader whose host slept through its lease must see its deadline gone when it wakes."""
    if hasattr(time, "CLOCK_BOOTTIME"):
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.monotonic()


def default_member_id() -> str:
    """The host name, the process id and a few random characters: unique per daemon, even for two containers on
    one host that share its name (host networking) and are both pid 1."""
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())[:100].strip("-.")
    return f"{host or 'host'}-{os.getpid()}-{secrets.token_hex(3)}"


class Term:
    """One spell of leadership: its fence, and `ended`, set (with `why`) the moment it is over."""

    def __init__(self, fence: Fence) -> None:
        self.fence = fence
        self.ended = asyncio.Event()
        self.why = ""


@dataclass(frozen=True, slots=True)
class Campaign:
    """What one try to lead came to: the term this daemon won, or None and who leads (None: nobody, etcd did
    not answer)."""

    term: Term | None
    leader: str | None


class Election:
    def __init__(
        self,
        *,
        store: EtcdStore,
        keys: KeySpace,
        settings: ElectionSettings,
        member: dict[str, Any],
        metrics: Metrics | None = None,
        takeover: bool = False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """`store` is unfenced; `member` is what `members/<id>` and `leader` say about this daemon (its id is
        added); `takeover`: a `leader` key found at the first try was left by this daemon's previous run;
        `clock` defaults to `uptime`."""
        self.member_id = settings.member_id or default_member_id()
        self._store = store
        self._settings = settings
        self._key = keys.leader()
        self._member_key = keys.member(self.member_id)
        member = {"host": socket.gethostname(), "pid": os.getpid(), **member, "id": self.member_id}
        self._value = json.dumps(member).encode()
        self._host = member["host"]
        self._metrics = metrics
        self._gauge = metrics.leader.labels(prefix=keys.prefix) if metrics is not None else None
        self._takeover = takeover
        self._clock = clock or uptime
        self._lease: int | None = None
        self._renewed = 0.0  # when the last renewal (or grant) that succeeded was sent
        self._stale: list[int] = []  # leases of ended terms, revoked as soon as etcd answers
        self._term: Term | None = None
        self._leading = asyncio.Event()  # set while a term is on
        self._eligible = asyncio.Event()  # set by `campaign`: this daemon may lead
        self._wake = asyncio.Event()
        self._outcomes: list[asyncio.Future[Campaign]] = []  # `campaign` calls waiting for the next try
        self._seen: tuple[str | None, int] = (None, 0)  # who leads, as last read, and the revision of that read
        self._vacancy: asyncio.Task[None] | None = None  # a standby's watch on `leader`, kept across rounds
        self.leader: str | None = None
        if self._gauge is not None:
            self._gauge.set(0)

    # -- what the daemon asks ---------------------------------------------------------------------------------

    def fence(self) -> Fence | None:
        """The fence of the term on now; None when this daemon does not lead. Ends the term first when its
        renew deadline has passed (so a process that was frozen finds out at its first write)."""
        term = self._term
        if term is None:
            return None
        if self._clock() - self._renewed >= self._settings.renew_seconds:
            self._end("not_renewed", self._not_renewed())
            return None
        return term.fence

    async def campaign(self) -> Campaign:
        """Let this daemon lead from now on, and wait for its next try: the term it won, or who leads."""
        if self._term is not None:  # already leading (a standby's watch saw the leader go): nothing to wait for
            return Campaign(term=self._term, leader=self.member_id)
        outcome: asyncio.Future[Campaign] = asyncio.get_running_loop().create_future()
        self._outcomes.append(outcome)
        self._eligible.set()
        self._wake.set()
        return await outcome

    async def next_term(self) -> Term:
        """Wait until this daemon leads; the term it won."""
        while True:
            await self._leading.wait()
            term = self._term
            if term is not None and not term.ended.is_set():
                return term
            await asyncio.sleep(0)  # it ended in between: wait for the next one

    async def resign(self) -> None:
        """End any term and revoke the lease (deleting `leader` and `members/<id>`): for a clean stop, after
        the runtime has drained. Gives up after REVOKE_TIMEOUT_SECONDS; the lease then expires on its own."""
        self._eligible.clear()
        if self._term is not None:
            self._end(None, "this daemon is stopping")
        leases = [*self._stale, *([self._lease] if self._lease is not None else [])]
        self._lease, self._stale = None, []
        for lease in leases:
            try:
                async with asyncio.timeout(REVOKE_TIMEOUT_SECONDS):
                    await self._store.revoke_lease(lease)
            except (TimeoutError, StoreUnavailableError, StoreError) as e:
                log.warning("election.revoke_failed", lease=f"{lease:x}", error=str(e)[:300] or type(e).__name__)
            else:
                log.info("election.resigned", member=self.member_id, lease=f"{lease:x}")

    # -- the loop ---------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Renew, campaign and check, every `retry_seconds`, until cancelled; never ends otherwise."""
        try:
            await self._rounds()
        finally:
            await self._stop_watching()

    async def _rounds(self) -> None:
        while True:
            started = self._clock()
            self._wake.clear()
            outcome: Campaign | None = None
            try:
                outcome = await self._round(started)
            except StoreAccessError as e:
                # This daemon's etcd user may not write `leader` or `members/`: it could never lead, and standing by
                # for ever would look healthy. Like a user that may not read desired/, it stops the daemon (exit 1).
                log.error("election.refused", error=str(e)[:500], member=self.member_id)
                raise
            except (TimeoutError, StoreUnavailableError, StoreError) as e:
                log.warning("election.unavailable", error=str(e)[:300] or type(e).__name__, leading=self.leading)
                if self._eligible.is_set() and self._term is None:
                    outcome = Campaign(term=None, leader=None)  # whoever leads, it is not this daemon
            except Exception as e:  # a bug here must not stop the daemon: the deadline still ends a term
                log.exception("election.error", error=repr(e)[:300], leading=self.leading)
                if self._eligible.is_set() and self._term is None:
                    outcome = Campaign(term=None, leader=None)
            self.fence()  # ends the term if its deadline passed while etcd did not answer
            if outcome is not None:
                self._answer(outcome)
            await self._pause(started)

    @property
    def leading(self) -> bool:
        return self._term is not None

    async def _round(self, started: float) -> Campaign | None:
        """One renewal and one check or try; the outcome when this daemon tried to lead."""
        if self._lease is None:
            await self._register(started)
        else:
            ttl = await self._bounded(self._store.keepalive(self._lease))
            if ttl <= 0:
                self._lease = None  # gone in etcd: nothing to revoke
                if self._term is not None:
                    self._end("lease_gone", "etcd says this daemon's lease is gone (it expired)")
                else:
                    log.warning("election.lease_expired", member=self.member_id)
                await self._register(started)
            else:
                self._renewed = started
        term = self._term
        if term is not None:
            kv = await self._bounded(self._store.get(self._key))
            # A write may have ended the term (its deadline passed) while this read was out: then it is over.
            if term is self._term and (kv is None or kv.create_revision != term.fence.create_revision):
                self._end("key_changed", f"{self._key} was deleted or replaced by another daemon")
            return None
        if self._eligible.is_set():
            return await self._try(started)
        return None

    async def _register(self, started: float) -> None:
        """Take a new lease and create `members/<id>` with it. A member key of a live daemon is never taken: two
        daemons given one `member_id` would take the leader key from each other; the second waits, saying why."""
        lease = await self._store.grant_lease(self._settings.lease_seconds)
        try:
            created = await self._store.create(self._member_key, self._value, lease=lease.id)
            holder = created.kv
            if not created.created and holder is not None and holder.lease != lease.id:
                if holder.lease in self._stale:  # this daemon's own, from the term that ended
                    await self._store.put_leased(self._member_key, self._value, lease=lease.id)
                elif not self._left_by_us(holder, previous_run=True):
                    raise StoreError(
                        f"election.member_id {self.member_id!r} is taken by another running daemon "
                        f"(host {_host_of(holder)}, pid {_field(holder, 'pid')}): give each daemon its own"
                    )
                else:
                    await self._store.revoke_lease(holder.lease)  # this daemon's previous run, which is gone
                    await self._store.put_leased(self._member_key, self._value, lease=lease.id)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._store.revoke_lease(lease.id)
            raise
        self._lease, self._renewed = lease.id, started
        log.info("election.registered", member=self.member_id, lease=f"{lease.id:x}", ttl=lease.ttl)

    async def _revoke_stale(self) -> None:
        """Revoke the leases of ended terms (deleting an old `leader` of ours at once). Only once this daemon may
        lead again, after its old runtime drained: before, a standby would take over while a step still runs."""
        while self._stale:
            stale = self._stale[0]
            try:
                await self._store.revoke_lease(stale)
            except StoreUnavailableError:
                raise  # tried again at the next round
            except StoreError as e:  # refused: it expires on its own
                log.warning("election.revoke_failed", lease=f"{stale:x}", error=str(e)[:300])
            self._stale.pop(0)

    async def _try(self, started: float) -> Campaign:
        """Create `leader` if it is absent; on a key left by an earlier run of this daemon, revoke its lease and
        try again at once."""
        assert self._lease is not None
        await self._revoke_stale()
        created = await self._store.create(self._key, self._value, lease=self._lease)
        holder = created.kv
        if not created.created and holder is not None and holder.lease == self._lease:
            created = Created(created=True, kv=holder, revision=created.revision)  # a try whose answer was lost
        elif not created.created and holder is not None and self._left_by_us(holder):
            log.warning("election.taking_over", left_by=_member_of(holder), lease=f"{holder.lease:x}")
            await self._store.revoke_lease(holder.lease)
            created = await self._store.create(self._key, self._value, lease=self._lease)
            holder = created.kv
        self._takeover = False  # only the first try may find a key left by this daemon's previous run
        if created.created and holder is not None:
            term = Term(Fence(self._key, holder.create_revision))
            self._term, self.leader = term, self.member_id
            self._leading.set()
            if self._gauge is not None:
                self._gauge.set(1)
            log.info("election.won", member=self.member_id, fence=holder.create_revision)
            return Campaign(term=term, leader=self.member_id)
        leader = _member_of(holder) if holder is not None else None
        if leader != self.leader:
            log.info("election.standby", leader=leader, member=self.member_id)
        self.leader = leader
        self._seen = (leader, created.revision)
        return Campaign(term=None, leader=leader)

    def _left_by_us(self, holder: KeyValue, *, previous_run: bool = False) -> bool:
        """A key (`leader`, or with `previous_run` `members/<id>`) left by this daemon's previous run, which may be
        taken at once: written on this host under this member id by a process that is gone, or (`takeover`, the
        embedded etcd, whose state directory this daemon holds) any key of this host. A live process, another
        host, or this very process (a duplicate id in one process, or pid 1 in two containers) never is: two
        daemons given one `member_id` would otherwise take the key from each other."""
        if holder.lease == 0 or _host_of(holder) != self._host:
            return False
        if self._takeover and not previous_run:
            return True
        pid = _field(holder, "pid")
        return _member_of(holder) == self.member_id and isinstance(pid, int) and pid != os.getpid() and _gone(pid)

    def _end(self, reason: str | None, why: str) -> None:
        """End the term on now: at once, before anything else can write. `reason` labels the metric (None: a
        clean stop, not a loss)."""
        term = self._term
        if term is None:
            return
        self._term = None
        self._leading.clear()
        self._eligible.clear()  # the daemon campaigns again once it stands by with a fresh runtime
        if self._lease is not None:
            self._stale.append(self._lease)  # a new term gets a new lease and so a new fence
            self._lease = None
        term.why = why
        term.ended.set()
        if self._gauge is not None:
            self._gauge.set(0)
        if reason is not None:
            if self._metrics is not None:
                self._metrics.leadership_lost.labels(reason=reason).inc()
            log.warning("election.lost", reason=why, member=self.member_id, fence=term.fence.create_revision)
        self._wake.set()  # revoke the old lease at once

    def _answer(self, outcome: Campaign) -> None:
        outcomes, self._outcomes = self._outcomes, []
        for future in outcomes:
            if not future.done():
                future.set_result(outcome)

    async def _bounded(self, call: Coroutine[Any, Any, T]) -> T:
        """`call`, given no longer than the renew deadline while leading (TimeoutError past it)."""
        if self._term is None:
            return await call
        async with asyncio.timeout(max(self._renewed + self._settings.renew_seconds - self._clock(), 0.0)):
            return await call

    async def _pause(self, started: float) -> None:
        """Until the next round: `retry_seconds` after this one started, sooner when woken, when a leader's
        deadline comes, or when a standby sees `leader` deleted."""
        until = started + self._settings.retry_seconds
        if self._term is not None:
            until = min(until, self._renewed + self._settings.renew_seconds)
        wake = asyncio.ensure_future(self._wake.wait())
        waits: list[asyncio.Future[Any]] = [wake]
        if self._term is None and self._eligible.is_set() and self._seen[0] is not None and self._lease is not None:
            # One watch on `leader` across rounds, not one per round: a new stream every retry_seconds would be
            # as many requests and log lines, for ever, on every standby.
            if self._vacancy is None or self._vacancy.done():
                self._vacancy = asyncio.create_task(self._vacated(self._seen[1]), name="election-vacancy")
            waits.append(self._vacancy)
        else:
            await self._stop_watching()
        try:
            await asyncio.wait(waits, timeout=max(until - self._clock(), 0.0), return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()
            await asyncio.gather(wake, return_exceptions=True)

    async def _stop_watching(self) -> None:
        vacancy, self._vacancy = self._vacancy, None
        if vacancy is not None:
            vacancy.cancel()
            await asyncio.gather(vacancy, return_exceptions=True)

    async def _vacated(self, revision: int) -> None:
        """Return when `leader` is deleted after `revision`, or `retry_seconds` after the watch failed (the next
        round then tries, and watches again)."""
        start = self._key.encode()
        with contextlib.suppress(StoreUnavailableError, StoreError):
            stream = self._store.watch(start, start + b"\x00", start_revision=revision + 1)
            async with contextlib.aclosing(stream):
                async for batch in stream:
                    if any(event.type == "delete" for event in batch.events):
                        return
        await asyncio.sleep(self._settings.retry_seconds)

    def _not_renewed(self) -> str:
        return f"no renewal succeeded within election.renew_seconds ({self._settings.renew_seconds:g} s)"


def _member_of(kv: KeyValue) -> str | None:
    """The member id a `leader` value names, or None when it names none."""
    member = _field(kv, "id")
    return member if isinstance(member, str) else None


def _host_of(kv: KeyValue) -> str | None:
    """The host a `leader` value names, or None when it names none."""
    host = _field(kv, "host")
    return host if isinstance(host, str) else None


MAX_VALUE_BYTES = 64 * 1024  # a member's value is a few hundred bytes; anything larger is not one


def _field(kv: KeyValue, name: str) -> Any:
    """The field `name` of a `leader` or `members/` value (a string or an int), or None: the value is written by
    whoever may write those keys, so anything malformed (too large, too deep, not an object) counts as absent."""
    if len(kv.value) > MAX_VALUE_BYTES:
        return None
    try:
        value = json.loads(kv.value)
    except (ValueError, RecursionError):
        return None
    field = value.get(name) if isinstance(value, dict) else None
    return field if isinstance(field, (str, int)) and not isinstance(field, bool) else None


def _gone(pid: int) -> bool:
    """True when no process `pid` runs on this host (as this process sees it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False


def member_value(*, version: str, http: str) -> dict[str, Any]:
    """What `members/<id>` and `leader` say about this daemon, its id aside."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "version": version,
        "http": http,
        "started_at": datetime.now(UTC).isoformat(),
    }
