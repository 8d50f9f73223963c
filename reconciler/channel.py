"""How the etcd client reaches the members of a cluster: a gRPC channel per member, each call on one that is up.

etcd3aio joins every endpoint into one `ipv4:a,b,c` target that gRPC balances
round-robin. That target takes IPv4 addresses only (etcd3aio rewrites the exact
text `localhost`), so a member named by host (`etcd-0.etcd:2379`) or by IPv6
address cannot be reached; and names resolved once at start would go stale,
since in Kubernetes a restarted etcd pod keeps its name but gets a new address.

So each endpoint gets a channel of its own, with the target `dns:///host:port`:
gRPC resolves the name, resolves it again whenever the connection breaks (at
most once a second here), reconnects on its own backoff, and checks a TLS
certificate against that member's own name. A name with several addresses
(a headless Service given as the only endpoint) is balanced round-robin inside
its channel. Every channel connects at start and stays connected (keepalive
pings), so a spare member is ready before it is needed.

`MemberChannels` stands in for the one channel etcd3aio builds its stubs on.
Each call goes to the next member, round-robin, whose channel is READY, or to
the next member in turn when none is. A member that dies is skipped from the
moment its connection closes, or, when its host vanished without closing it,
once a keepalive ping goes unanswered (within 7 s); a call it was serving fails
UNAVAILABLE and etcd3aio tries it again, now on another member.

Every call carries `hasleader: true` (clientv3's `WithRequireLeader`). A member
cut off from its quorum then refuses a request at once with UNAVAILABLE "no
leader", which is retried on another member, instead of holding it for etcd's
5 s request timeout (after which a put even fails UNKNOWN, as a refusal); and it
cancels a stream (watch, lease keepalive) once it has had no leader for a few
election timeouts, instead of leaving it silent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from etcd3aio.connections import ConnectionManager

REQUIRE_LEADER = ("hasleader", "true")
# gRPC resolves a name again when a connection breaks, but by default not within
# 30 s of the last resolution: a member restarted at a new address would be
# unreachable for that long.
DNS_RESOLVE_AGAIN_AFTER_MS = 1_000
# A member whose host vanished without closing its connections (or a frozen one)
# is noticed only by keepalive pings: a ping goes out once a connection has been
# silent for KEEPALIVE_MS, and the connection is dropped when the answer takes
# longer than PING_TIMEOUT_MS. Until then the member stays READY, in the rotation,
# and holds every call sent to it. 5 s + 2 s keeps that well below the default
# request timeout (10 s), so such a call is tried again on another member in time;
# etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time).
# etcd3aio's keepalive_timeout_ms is not enough: gRPC (1.85 measured) waits for
# the answer up to `grpc.http2.ping_timeout_ms`, 60 s by default.
KEEPALIVE_MS = 5_000
PING_TIMEOUT_MS = 2_000


_READY = frozenset({grpc.ChannelConnectivity.READY})
_PENDING = frozenset({grpc.ChannelConnectivity.CONNECTING, grpc.ChannelConnectivity.IDLE})


@dataclass(frozen=True, slots=True)
class Member:
    """One endpoint as configured (`host:port`) and the gRPC channel to it."""

    endpoint: str
    channel: Any  # grpc.aio.Channel


def with_leader(metadata: Any) -> tuple[tuple[str, str], ...]:
    """`metadata` (None, pairs, or grpc.aio.Metadata) with `hasleader: true` added."""
    return (REQUIRE_LEADER, *(metadata or ()))


class MemberChannels:
    """The part of `grpc.aio.Channel` etcd3aio's stubs use (the four multicallable factories and `close`),
    spreading calls over one channel per member; see the module docstring."""

    def __init__(self, members: Sequence[Member]) -> None:
        if not members:
            raise ValueError("at least one etcd endpoint is needed")
        self.members = tuple(members)
        self._next = 0
        for member in self.members:
            member.channel.get_state(try_to_connect=True)

    def pick(self) -> Member:
        """The member for the next call: the next READY one after the last picked; when none is, the next one
        still connecting (a call there waits for the outcome, where one on a failed channel fails at once);
        else simply the next one."""
        n = len(self.members)
        # try_to_connect wakes a channel that went idle, so it is back in the rotation soon.
        states = [m.channel.get_state(try_to_connect=True) for m in self.members]
        for wanted in (_READY, _PENDING):
            for k in range(n):
                i = (self._next + k) % n
                if states[i] in wanted:
                    self._next = i + 1
                    return self.members[i]
        member = self.members[self._next % n]
        self._next += 1
        return member

    async def settle(self, timeout: float) -> None:
        """Return once a member is READY, or none is still connecting, or after `timeout` seconds: the first
        calls after start would otherwise go to whichever member comes first, up or not."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            states = {m.channel.get_state(try_to_connect=True) for m in self.members}
            if states & _READY or not states & _PENDING:
                return
            await asyncio.sleep(0.01)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> _Multicallable:
        return _Multicallable(self, [m.channel.unary_unary(method, *args, **kwargs) for m in self.members])

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> _Multicallable:
        return _Multicallable(self, [m.channel.unary_stream(method, *args, **kwargs) for m in self.members])

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> _Multicallable:
        return _Multicallable(self, [m.channel.stream_unary(method, *args, **kwargs) for m in self.members])

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> _Multicallable:
        return _Multicallable(self, [m.channel.stream_stream(method, *args, **kwargs) for m in self.members])

    async def close(self, grace: float | None = None) -> None:
        await asyncio.gather(*(m.channel.close(grace) for m in self.members))


class _Multicallable:
    """One RPC method on every member; a call goes to the member `MemberChannels.pick` chooses."""

    def __init__(self, channels: MemberChannels, per_member: list[Any]) -> None:
        self._channels = channels
        self._per_member = dict(zip(channels.members, per_member, strict=True))

    def __call__(self, *args: Any, metadata: Any = None, **kwargs: Any) -> Any:
        member = self._channels.pick()
        return self._per_member[member](*args, metadata=with_leader(metadata), **kwargs)


class MemberConnections(ConnectionManager):
    """etcd3aio's channel factory, made to build `MemberChannels` instead of an `ipv4:` target.

    `grpc_options` (etcd3aio's round-robin and keepalive, and what the caller
    adds) apply to every member's channel. The TLS arguments are etcd3aio's:
    `tls_server_name` overrides the name a certificate is checked against, which
    is otherwise the member's own host."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        super().__init__(endpoints, keepalive_time_ms=KEEPALIVE_MS, keepalive_timeout_ms=PING_TIMEOUT_MS)
        self.endpoints = list(endpoints)
        self.grpc_options += [
            ("grpc.dns_min_time_between_resolutions_ms", DNS_RESOLVE_AGAIN_AFTER_MS),
            ("grpc.http2.ping_timeout_ms", PING_TIMEOUT_MS),
        ]
        self.channels: MemberChannels | None = None

    def get_channel(
        self,
        ca_cert: bytes | None = None,
        cert_key: bytes | None = None,
        cert_chain: bytes | None = None,
        tls_server_name: str | None = None,
    ) -> Any:
        if ca_cert is None and (cert_key is not None or cert_chain is not None):
            raise ValueError("a client certificate and key need the CA certificate too")
        options = list(self.grpc_options)
        if ca_cert is None:
            members = [Member(e, grpc.aio.insecure_channel(f"dns:///{e}", options=options)) for e in self.endpoints]
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=ca_cert, private_key=cert_key, certificate_chain=cert_chain
            )
            if tls_server_name is not None:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            members = [
                Member(e, grpc.aio.secure_channel(f"dns:///{e}", credentials, options=options)) for e in self.endpoints
            ]
        self.channels = MemberChannels(members)
        return self.channels
