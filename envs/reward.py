"""The controller's objective: TTFT and TPOT SLO violations, quality lost to int4 layers, and
swap churn.

reward per tick = -(slo * newly_late + tpot * newly_tpot_late
                    + quality * quality_table[k] * generated_tokens
                    + transition * swapped_layers)

``newly_late`` counts requests whose TTFT passed the SLO (each once, when it becomes certain);
``newly_tpot_late`` requests that finished with a mean time per output token over the TPOT SLO
(known only when they finish, so counted then); ``quality_table[k]`` is
the quality loss of a token generated with the k least important layers in int4 (perplexity
delta by default), so quality cost is paid per token actually served degraded, not per second
of being quantized: quantizing an idle server costs nothing but the transitions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from envs.backend import AdvanceResult

DEFAULT_QUALITY_TABLE: tuple[float, ...] = (0.0, 0.06, 0.14, 0.25, 0.38, 0.54)
"""Perplexity increase on TinyStories of stories260K with its k least important layers in int4
(round-to-nearest, group 32): k = 1 and k = 5 from the shared data README's perplexities (the
best single layer, every layer), k = 2..4 a convex interpolation between them, since
single-layer losses combine super-additively. A stand-in until a profiled table is given
(``--quality`` / ``load_quality_table``)."""


@dataclass(frozen=True)
class RewardWeights:
    """Prices of the costs, in units of one TTFT SLO violation.

    The quality weight sets how many degraded tokens one late request is worth: with the
    measured int4 table (``docs/figures/quality-int4.json``) the default makes quantizing pay
    off under a burst, not at steady load; lower weights trained policies with fewer violations
    than the heuristic but a higher quality cost (docs/controller.md has the sweep). A swap
    costs a small fraction of a violation: enough to discourage churn, small next to one late
    request. A request that breaks its TPOT SLO costs as much as one that breaks its TTFT SLO
    (both are a request the client saw served too slowly); a KV limit that protects TPOT then
    pays off only if it costs fewer TTFT violations than it saves TPOT ones.
    """

    slo: float = 1.0
    quality: float = 0.05
    transition: float = 0.05
    tpot: float = 1.0


def load_quality_table(path: str | Path) -> tuple[float, ...]:
    """Quality deltas by k from a JSON list, an object's ``quality_by_k`` list, or the output of
    ``python -m eval.quality`` (perplexity increase along the ``lis`` order, the order the
    runtime quantizes in when given the profile).

    Raises ValueError unless it starts at 0 (no layer quantized, no loss), is finite and
    non-negative.
    """
    raw = json.loads(Path(path).read_text())
    if isinstance(raw, dict) and "orders" in raw:  # eval.quality's output: the lis order's ppl
        ppl = raw["orders"].get("lis", {}).get("ppl")
        if not isinstance(ppl, list) or not ppl:
            raise ValueError(f"{path}: eval.quality output without orders.lis.ppl")
        return validate_quality_table([p - ppl[0] for p in ppl], str(path))
    table = raw.get("quality_by_k") if isinstance(raw, dict) else raw
    if not isinstance(table, list):
        raise ValueError(f"{path}: expected a JSON list or an object with a 'quality_by_k' list")
    return validate_quality_table(table, str(path))


def validate_quality_table(table: list | tuple, where: str = "quality table") -> tuple[float, ...]:
    """``table`` as floats, checked: length >= 2, entry 0 is 0, all finite and >= 0."""
    values = tuple(float(v) for v in table)
    if len(values) < 2 or values[0] != 0.0:
        raise ValueError(f"{where}: needs entries for k = 0..L with entry 0 equal to 0: {values}")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"{where}: entries must be finite and non-negative: {values}")
    return values


@dataclass(frozen=True)
class RewardTerms:
    """One tick's costs, before weighting (the env sums these per episode for reports)."""

    late: int
    tpot_late: int
    quality: float
    swapped: int

    def reward(self, w: RewardWeights) -> float:
        """The scalar reward of the tick under weights ``w``."""
        return -(w.slo * self.late + w.tpot * self.tpot_late + w.quality * self.quality
                 + w.transition * self.swapped)


def tick_terms(result: AdvanceResult, layers: int, table: tuple[float, ...]) -> RewardTerms:
    """Costs of a tick (what a backend's ``advance`` reported) served with ``layers`` quantized
    layers."""
    return RewardTerms(result.newly_late, result.newly_tpot_late,
                       table[layers] * result.generated_tokens, result.swapped_layers)
