"""The controller: one decision per tick from a snapshot, made safe, with the heuristic as the
RL policy's stand-in when the network cannot answer.

It holds no runtime and counts nothing: the caller (the live runtime, an offline tool) keeps its
own counters from the ``Decision`` it gets, so the same controller runs unchanged in the server,
the simulator and the evaluation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from rl_controller.observation import LoadSnapshot
from rl_controller.policy import Action, Policy, clip_action, clip_kv_fraction


@dataclass(frozen=True)
class Decision:
    """What the controller decided at one tick and how.

    ``target``: quantized layers after ``clip_action``; ``kv_fraction``: the KV limit as a
    fraction of the budget-allowed capacity, after ``clip_kv_fraction``; ``clipped``: the policy
    asked for something unsafe or out of range; ``fell_back``: the primary policy failed and the
    fallback decided, for ``reason``; ``seconds``: time taken (observation, policy, fallback and
    clip).
    """

    target: int
    clipped: bool
    fell_back: bool
    reason: str | None
    seconds: float
    kv_fraction: float = 1.0


class Controller:
    """Runs ``policy`` every tick; when it raises or answers with something that is not a
    finite number, ``fallback`` (if given) decides that tick instead.

    The fallback is consulted every tick, even while the policy answers, so that its own clocks
    (dwell, calm time) are current the moment it takes over; for the heuristic that costs
    microseconds.
    """

    def __init__(
        self, policy: Policy, fallback: Policy | None = None, checkpoint: str | None = None
    ) -> None:
        """``checkpoint``: the file ``policy`` was loaded from, for reports (None: a rule)."""
        self.policy = policy
        self.fallback = fallback
        self.checkpoint = checkpoint

    @property
    def name(self) -> str:
        return self.policy.name

    def decide(self, snap: LoadSnapshot) -> Decision:
        """The clipped target for ``snap``. Raises only when the policy fails and there is no
        fallback."""
        start = time.perf_counter()
        backup = _action(self.fallback.decide(snap)) if self.fallback is not None else None
        reason = None
        try:
            action = _action(self.policy.decide(snap))
        except Exception as err:  # noqa: BLE001 - any policy failure: the fallback decides
            if backup is None:
                raise
            action, reason = backup, f"{type(err).__name__}: {err}"
        target, clipped = clip_action(action.layers, snap)
        fraction, kv_clipped = clip_kv_fraction(action.kv_fraction, snap)
        return Decision(
            target, clipped or kv_clipped, reason is not None, reason,
            time.perf_counter() - start, fraction,
        )  # fmt: skip


def _action(value: object) -> Action:
    """A policy's answer as an ``Action`` of finite numbers; ValueError for NaN, infinities and
    non-numbers (a bare number is a layer target with the full KV limit)."""
    layers, fraction = (
        (value.layers, value.kv_fraction) if isinstance(value, Action) else (value, 1.0)
    )
    numbers = (float(layers), float(fraction))  # type: ignore[arg-type]
    if not all(math.isfinite(n) for n in numbers):
        raise ValueError(f"non-finite policy output {value!r}")
    return Action(int(numbers[0]), numbers[1])
