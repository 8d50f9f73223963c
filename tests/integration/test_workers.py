"""Workers in the running daemon: whatever the settings allow, keys get reconciled."""

from __future__ import annotations

from harness import Harness, make_settings

from reconciler.embedded import EmbeddedEtcd


async def test_a_rate_limit_below_one_per_second_still_reconciles(harness: Harness, etcd: EmbeddedEtcd) -> None:
    harness.settings = make_settings(etcd, harness.keys.prefix, harness.root, rate_limit_per_second=0.5)
    await harness.start()

    revision = await harness.put_desired(harness.resource("slow", "one every two seconds\n"))

    await harness.wait_status("slow", "Converged", revision=revision)
    assert (harness.root / "slow").read_text() == "one every two seconds\n"
