"""Fault injection for the fault tests (tests/test_faults.py); never set it in production.

``SGLANG_MORPH_FAULTS='{"prepare": 1, "tick": 3, "policy": 2}'`` makes the scheduler-side
runtime raise ``InjectedFault`` on the Nth call of each named step, once:

- ``prepare``: the background preparation of a layer swap (the swapper's worker thread);
- ``tick``: a tick that observes the scheduler (one per ``--morph-tick-interval``; counting
  every scheduler loop pass instead would make N depend on how fast an idle loop spins);
- ``policy``: the primary policy's decision. Under ``--morph-policy rl`` the heuristic decides
  that tick instead; under ``heuristic`` there is no fallback, so the tick fails and morphing
  freezes, as any failing tick does;
- ``hook`` (N ignored, give 1): the plugin registers one more hook, on a scheduler method that
  does not exist (``MISSING_HOOK_TARGET``). SGLang only logs that it cannot attach it; the
  scheduler's start-up check must then refuse to serve (the launcher's own check resolves the
  plugin's real targets only, so the fault reaches the scheduler).

The failures are real exceptions at the real places, so the tests see exactly what an actual
bug or resource failure there would cause. Unset, nothing is counted and nothing is raised.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from rl_controller.observation import LoadSnapshot
from rl_controller.policy import Policy

ENV_VAR = "SGLANG_MORPH_FAULTS"
STEPS = ("prepare", "tick", "policy", "hook")
MISSING_HOOK_TARGET = "sglang.srt.managers.scheduler.Scheduler.morph_injected_missing_method"


class InjectedFault(RuntimeError):
    """The failure ``SGLANG_MORPH_FAULTS`` asked for."""


class Faults:
    """Which call of each step fails; ``check(step)`` counts a call and raises on that one.

    The swapper's worker thread checks ``prepare`` and the scheduler thread the other steps, so
    no counter is shared between threads.
    """

    def __init__(self, plan: dict[str, int] | None = None) -> None:
        self.plan = dict(plan or {})
        self.calls: Counter[str] = Counter()

    @classmethod
    def from_env(cls) -> Faults:
        """The plan in ``SGLANG_MORPH_FAULTS``, or none; ValueError for a malformed one (the
        scheduler then refuses to start, rather than run a fault test without its fault)."""
        raw = os.environ.get(ENV_VAR)
        if not raw:
            return cls()
        plan = json.loads(raw)
        if not isinstance(plan, dict) or any(
            step not in STEPS or not isinstance(n, int) or n < 1 for step, n in plan.items()
        ):
            raise ValueError(
                f"{ENV_VAR}={raw}: expected a JSON object of steps ({', '.join(STEPS)}) to the "
                "call number (1 or more) that fails"
            )
        return cls(plan)

    def check(self, step: str) -> None:
        """Count one call of ``step``; raise InjectedFault if it is the planned one."""
        if step not in self.plan:
            return
        self.calls[step] += 1
        if self.calls[step] == self.plan[step]:
            raise InjectedFault(f"injected fault: {step} call {self.calls[step]}")

    def missing_hook(self) -> str | None:
        """The nonexistent hook target the plugin must add, when ``hook`` is planned."""
        return MISSING_HOOK_TARGET if "hook" in self.plan else None

    def wrap_policy(self, policy: Policy) -> Policy:
        """``policy``, failing on the planned decision when ``policy`` is planned to fail."""
        return _FailingPolicy(policy, self) if "policy" in self.plan else policy


class _FailingPolicy:
    """A policy that raises on the decision ``faults`` plans, and otherwise asks ``inner``."""

    def __init__(self, inner: Policy, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults
        self.name = inner.name

    def decide(self, snap: LoadSnapshot) -> int:
        self.faults.check("policy")
        return self.inner.decide(snap)
