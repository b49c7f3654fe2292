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
from rl_controller.policy import Policy, clip_action


@dataclass(frozen=True)
class Decision:
    """What the controller decided at one tick and how.

    ``target``: quantized layers after ``clip_action``; ``clipped``: the policy asked for
    something unsafe or out of range; ``fell_back``: the primary policy failed and the fallback
    decided, for ``reason``; ``seconds``: time taken (observation, policy, fallback and clip).
    """

    target: int
    clipped: bool
    fell_back: bool
    reason: str | None
    seconds: float


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
        backup = self.fallback.decide(snap) if self.fallback is not None else None
        reason = None
        try:
            target = _whole_number(self.policy.decide(snap))
        except Exception as err:  # noqa: BLE001 - any policy failure: the fallback decides
            if backup is None:
                raise
            target, reason = backup, f"{type(err).__name__}: {err}"
        target, clipped = clip_action(target, snap)
        return Decision(target, clipped, reason is not None, reason, time.perf_counter() - start)


def _whole_number(value: object) -> int:
    """``value`` as an int; ValueError for NaN, infinities and non-numbers."""
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise ValueError(f"non-finite policy output {value!r}")
    return int(number)
