"""What every controller policy is, and the safety clips applied to whatever a policy asks for.

A policy maps a ``LoadSnapshot`` to a target number of quantized layers and, optionally, a KV
limit; the runtime quantizes layers in the profile's importance order (least important first)
until that many are int4, and caps KV at the chosen fraction of what the budget allows at that
depth. Policies may be wrong (an untrained network, a bug); ``clip_action`` and
``clip_kv_fraction`` are the one place that keeps their choices inside what the memory state
allows, used by the runtime and the environment alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from rl_controller.observation import LoadSnapshot

DELTA_ACTIONS: tuple[int, ...] = (-1, 0, 1)
"""The RL layer head's actions: restore one layer, hold, quantize one more. Relative, so that
"hold" is one action in every state (with absolute targets, holding means a state-dependent
choice, and PPO settles on a constant target instead of learning when to move)."""


KV_FRACTIONS: tuple[float, ...] = (0.5, 0.75, 1.0)
"""KV limits a policy may choose, as fractions of what the budget allows at the current depth.
A smaller limit admits fewer concurrent decodes: the batch stays small and each decode iteration
short, which protects TPOT when a heavy batch would break it."""


@dataclass(frozen=True)
class Action:
    """A policy's full choice: ``layers`` quantized (the target) and the KV limit as a fraction
    of the budget-allowed capacity. A policy that returns a bare int chooses fraction 1.0."""

    layers: int
    kv_fraction: float = 1.0


@dataclass(frozen=True)
class RLActions:
    """What the RL policy's two heads mean: a ``MultiDiscrete`` of an index into ``deltas``
    (layer change, relative to the current depth) and an index into ``kv_fractions`` (absolute:
    a limit is a level to be at, not a direction, and the full budget is one action in every
    state). Checkpoints record it and are run with the one they were trained with.

    ``deltas`` restore at most one layer per tick (restores are what the stabilizer rations)
    and quantize up to ``max(deltas)``: with one, a burst takes L ticks to reach L layers,
    where the heuristic jumps to the depth the whole queue needs in one tick.
    """

    deltas: tuple[int, ...] = DELTA_ACTIONS
    kv_fractions: tuple[float, ...] = KV_FRACTIONS

    def __post_init__(self) -> None:
        top = max(self.deltas, default=0)
        if top < 1 or self.deltas != tuple(range(-1, top + 1)):
            raise ValueError(f"layer deltas {list(self.deltas)}: accepted are -1, 0, 1, ..., n "
                             "for some n >= 1 (restore one, hold, quantize up to n)")

    @classmethod
    def up_to(cls, max_step: int) -> RLActions:
        """Deltas -1..``max_step``: restore one, hold, or quantize 1..``max_step`` layers."""
        return cls(tuple(range(-1, max_step + 1)))

    @property
    def max_step(self) -> int:
        return self.deltas[-1]

    @property
    def nvec(self) -> tuple[int, ...]:
        return (len(self.deltas), len(self.kv_fractions))

    @property
    def space(self) -> str:
        """The action space as checkpoints record it, e.g. ``MultiDiscrete([3, 3])``."""
        return f"MultiDiscrete({list(self.nvec)})"

    def action(self, indices: Sequence[int], quantized_layers: int) -> Action:
        """The ``Action`` an RL action (indices into the two heads) means at
        ``quantized_layers``: the one mapping the environment, the RL policy and behaviour
        cloning share. The layer target may fall outside ``[0, num_layers]``;
        ``clip_action`` (or the caller) bounds it."""
        delta, fraction = (int(i) for i in indices)
        return Action(quantized_layers + self.deltas[delta], self.kv_fractions[fraction])

    def indices(self, action: Action, quantized_layers: int) -> tuple[int, int]:
        """The RL action nearest ``action`` (what behaviour cloning imitates): as far toward
        its target as one tick's deltas go, and the closest KV fraction."""
        step = min(max(action.layers - quantized_layers, self.deltas[0]), self.max_step)
        nearest = min(range(len(self.kv_fractions)),
                      key=lambda i: abs(self.kv_fractions[i] - action.kv_fraction))
        return self.deltas.index(step), nearest


RL_ACTIONS = RLActions()
"""The default heads: deltas -1/0/+1 and ``KV_FRACTIONS`` (``MultiDiscrete([3, 3])``)."""


def target_layers(answer: int | Action) -> int:
    """The layer target of a policy's answer (for tools that move layers only)."""
    return answer.layers if isinstance(answer, Action) else int(answer)


@runtime_checkable
class Policy(Protocol):
    """A controller decision rule, called once per tick at the scheduler's safe point."""

    name: str

    def decide(self, snap: LoadSnapshot) -> int | Action:
        """Target number of quantized layers (0..num_layers), least important layers first, or
        an ``Action`` that also sets the KV limit."""
        ...


def clip_action(target: int, snap: LoadSnapshot) -> tuple[int, bool]:
    """``target`` made valid and safe, and whether it had to be changed.

    Valid: inside ``[0, num_layers]``. Safe: restoring a layer gives its ``tokens_per_layer`` KV
    tokens back to the weights, which is only possible when the tokens still in use fit in the
    smaller capacity (``kv_used_tokens <= capacity after restore``); otherwise as few layers are
    restored as that allows. Quantizing is always safe (it only adds capacity).
    """
    action = min(max(int(target), 0), snap.num_layers)
    if action < snap.quantized_layers and snap.tokens_per_layer > 0:
        spare = snap.kv_capacity_tokens - snap.kv_used_tokens
        restorable = max(0, spare // snap.tokens_per_layer)
        action = max(action, snap.quantized_layers - restorable)
    return action, action != target


def clip_kv_fraction(fraction: float, snap: LoadSnapshot) -> tuple[float, bool]:
    """``fraction`` made valid and safe, and whether it had to be changed.

    Valid: inside ``[min(KV_FRACTIONS), 1]``. Safe: the limit never cuts below the tokens in use
    (they would have to wait for requests to finish before the shrink completes, and admission
    would stall meanwhile), so the fraction is raised to cover ``kv_used_tokens``.
    """
    low = min(KV_FRACTIONS)
    valid = min(max(float(fraction), low), 1.0)
    budget = snap.kv_budget_tokens or snap.kv_capacity_tokens
    if budget > 0:
        valid = max(valid, min(1.0, snap.kv_used_tokens / budget))
    return valid, valid != fraction


class ConstantPolicy:
    """Always the same number of quantized layers: the static baselines (all fp, all int4)."""

    def __init__(self, target: int | Literal["all"]) -> None:
        self.target = target
        self.name = "always-L" if target == "all" else f"always-{target}"

    def decide(self, snap: LoadSnapshot) -> int:
        """The fixed target (``"all"`` = every layer of the snapshot's model)."""
        return snap.num_layers if self.target == "all" else int(self.target)
