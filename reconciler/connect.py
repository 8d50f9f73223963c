"""How the daemon and the CLI reach etcd: one place turns the `etcd` settings into a client.

The endpoints come from the caller (the daemon's embedded etcd, or the CLI's
endpoint file, stand in when `etcd.endpoints` is empty).
"""

from __future__ import annotations

from collections.abc import Sequence

from reconciler.settings import EtcdSettings
from reconciler.store import EtcdStore


def open_store(etcd: EtcdSettings, endpoints: Sequence[str], *, timeout: float, retry_attempts: int) -> EtcdStore:
    """A client for `endpoints` configured by `etcd`; `timeout` bounds one request, retries included."""
    return EtcdStore(endpoints, timeout=timeout, retry_attempts=retry_attempts)
