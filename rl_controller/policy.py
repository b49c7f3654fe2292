"""What every controller policy is, and the safety clip applied to whatever a policy asks for.

A policy maps a ``LoadSnapshot`` to a target number of quantized layers; the runtime quantizes
layers in the profile's importance order (least important first) until that many are int4.
Policies may be wrong (an untrained network, a bug); ``clip_action`` is the one place that keeps
their targets inside what the memory state allows, used by the runtime and the environment alike.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

from rl_controller.observation import LoadSnapshot

DELTA_ACTIONS: tuple[int, ...] = (-1, 0, 1)
"""The RL action set: restore one layer, hold, quantize one more. Relative, so that "hold" is
one action in every state (with absolute targets, holding means a state-dependent choice, and
PPO settles on a constant target instead of learning when to move)."""


@runtime_checkable
class Policy(Protocol):
    """A controller decision rule, called once per tick at the scheduler's safe point."""

    name: str

    def decide(self, snap: LoadSnapshot) -> int:
        """Target number of quantized layers (0..num_layers), least important layers first."""
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


class ConstantPolicy:
    """Always the same number of quantized layers: the static baselines (all fp, all int4)."""

    def __init__(self, target: int | Literal["all"]) -> None:
        self.target = target
        self.name = "always-L" if target == "all" else f"always-{target}"

    def decide(self, snap: LoadSnapshot) -> int:
        """The fixed target (``"all"`` = every layer of the snapshot's model)."""
        return snap.num_layers if self.target == "all" else int(self.target)
