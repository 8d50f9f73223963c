"""Verify after execute: a plan is called successful only when the resource is seen to be as desired.

A tool's word that it succeeded is not enough: a tool can report success and
have done nothing (a write to a path a mount hides, a restart of a service
that dies a second later). After the last step of a plan, the runner
observes the resource afresh and asks its agent to plan again from that
observation. An empty plan means actual matches desired, and only then is
the resource `Converged`. Anything else fails the plan with "plan ran but
the resource did not converge: ..." and what the agent still finds
different. Agents that observe their own resources plan by rules from an
observation (a model is asked only about issues, in `heal`), so this costs
no model call.

A kind setpoint does not observe itself (a language-model kind, whose
`actual/` is written by an outside observer) cannot be verified at once: the
plan's record says so, and the next observation written to `actual/` is
reconciled like any change, so drift that remains is found then.
"""

from __future__ import annotations

from dataclasses import dataclass

from agents import AgentRegistry
from plans import Observed, SetpointError, Snapshot
from reconciler.cache import Cache, DesiredEntry

NOT_CONVERGED = "plan ran but the resource did not converge"


@dataclass(frozen=True, slots=True)
class Verification:
    converged: bool
    text: str  # what was found, for the plan record and the status


class Verifier:
    def __init__(self, *, agents: AgentRegistry, cache: Cache) -> None:
        self._agents = agents
        self._cache = cache

    async def check(self, entry: DesiredEntry, observed: Observed | None, *, observing: bool, error: str = "") -> (
        Verification
    ):
        """Whether `entry` is at its desired state as `observed` after a plan ran. `observing`: setpoint observes
        this kind itself; `error`: why the observation after the plan failed, when it did."""
        if not observing:
            return Verification(True, f"not verified: setpoint does not observe kind {entry.key.kind!r} itself; "
                                      "the next observation written to actual/ is checked")  # fmt: skip
        if observed is None:
            return Verification(False, f"{NOT_CONVERGED}: it could not be observed afterwards ({error or 'no state'})")
        agent = self._agents.for_kind(entry.key.kind)
        assert agent is not None and entry.resource is not None
        snapshot = Snapshot(
            desired=entry.resource, revision=entry.mod_revision, actual=observed,
            issues=tuple(issue.issue for issue in self._cache.open_issues(entry.key)),
        )  # fmt: skip
        try:
            plan = await agent.reconcile(snapshot)
        except SetpointError as e:
            return Verification(False, f"{NOT_CONVERGED}: {e}")
        except Exception as e:  # an agent's bug must not turn a finished plan into a crash of the worker
            return Verification(False, f"{NOT_CONVERGED}: checking it raised {type(e).__name__}: {str(e)[:300]}")
        if plan.is_empty:
            return Verification(True, "verified: actual matches desired")
        still = ", ".join(step.tool for step in plan.steps)
        return Verification(False, f"{NOT_CONVERGED}: {plan.reasoning} (it would still need {still})")
