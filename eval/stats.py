"""Repetition statistics: means and 95% confidence intervals over reps, ratios per rep pair,
and the client's send lag that decides whether a rep measured the load it was meant to.

One rep of a 2-core CPU replay is one draw from a noisy machine, so a figure without its spread
over reps says little; an interval from Student's t over the per-rep values is honest about how
few reps there are. Ratios against fp are taken per rep pair (rep r of a system against rep r
of fp, which ran next to it) before they are summarised, so drift between reps cancels.
Numpy-free on purpose: the numbers are few and the rules are easy to check by hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from eval.replay import RequestRecord

T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.306, 2.2622, 2.2281,
        2.201, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.093, 2.086,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)  # fmt: skip
"""Student t 0.975 quantiles for 1..30 degrees of freedom (two-sided 95%)."""
_Z975 = 1.959963984540054

MAX_SEND_LAG_P99_S = 0.050
"""A rep whose client sent its requests later than this (p99 of actual minus scheduled send
time) replayed another load than the trace's: it is flagged invalid, its numbers kept."""

STAT_FIELDS = (
    "slo_violation_rate",
    "ttft_p50_s",
    "ttft_p95_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "tpot_p95_s",
    "throughput_tok_s",
    "goodput_req_s",
    "quality_ppl",
    "quality_kl",
)
"""Per-rep figures summarised with a mean and a 95% interval."""

RATIO_FIELDS = ("violation_reduction_pct", "p95_ttft_speedup", "quality_cost_vs_static_int4")


def t975(df: int) -> float:
    """The two-sided 95% Student t quantile for ``df`` >= 1 degrees of freedom (a table up to
    30, then the Cornish-Fisher expansion, within 1e-4 of the exact value)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df * df)


def mean_ci95(values: Sequence[float | None]) -> tuple[float | None, list[float] | None]:
    """(mean, [lo, hi]) of the known values; the interval is None with fewer than two, since
    one rep says nothing about the spread."""
    known = [float(v) for v in values if v is not None]
    if not known:
        return None, None
    mean = sum(known) / len(known)
    if len(known) < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in known) / (len(known) - 1))
    half = t975(len(known) - 1) * sd / math.sqrt(len(known))
    return mean, [mean - half, mean + half]


def summarize_reps(rows: Sequence[Mapping], fields: Sequence[str] = STAT_FIELDS) -> dict:
    """``{"mean": {field: m}, "ci95": {field: [lo, hi] | None}, "n": reps}`` over per-rep
    rows (rows flagged ``valid: false`` are left out: they replayed another load)."""
    valid = [row for row in rows if row.get("valid", True)]
    mean: dict[str, float | None] = {}
    ci: dict[str, list[float] | None] = {}
    for field in fields:
        mean[field], ci[field] = mean_ci95([row.get(field) for row in valid])
    return {"n": len(valid), "mean": mean, "ci95": ci}


def ratios(ref: Mapping, row: Mapping, static_kl: float | None) -> dict[str, float | None]:
    """One system's figures against fp's: SLO-violation reduction (%), P95 TTFT speed-up (x),
    and its KL to fp as a fraction of static-int4's; None where a figure is missing or zero."""
    fp_rate, rate = ref.get("slo_violation_rate"), row.get("slo_violation_rate")
    fp_p95, p95 = ref.get("ttft_p95_s"), row.get("ttft_p95_s")
    kl = row.get("quality_kl")
    return {
        "violation_reduction_pct": (
            100.0 * (fp_rate - rate) / fp_rate if fp_rate and rate is not None else None
        ),
        "p95_ttft_speedup": fp_p95 / p95 if fp_p95 and p95 else None,
        "quality_cost_vs_static_int4": kl / static_kl if static_kl and kl is not None else None,
    }


def paired_ratios(
    ref_reps: Sequence[Mapping], reps: Sequence[Mapping], static_reps: Sequence[Mapping]
) -> dict:
    """Ratios against fp per rep pair (matched by ``rep``; a pair with an invalid side is left
    out), then their mean and 95% interval: ``{"per_rep": [...], "n", "mean", "ci95"}``."""
    by_rep = {row["rep"]: row for row in ref_reps if row.get("valid", True)}
    static = {row["rep"]: row.get("quality_kl") for row in static_reps}
    per_rep = [
        {"rep": row["rep"], **ratios(by_rep[row["rep"]], row, static.get(row["rep"]))}
        for row in reps
        if row.get("valid", True) and row["rep"] in by_rep
    ]
    return {"per_rep": per_rep, **summarize_reps(per_rep, RATIO_FIELDS)}


def send_lag(records: Sequence[RequestRecord]) -> dict:
    """The client's lag (actual minus scheduled send time) of one rep: p99 and max in seconds,
    and whether the rep is valid (p99 at most MAX_SEND_LAG_P99_S) with the reason if not."""
    lags = sorted(r.sent_s - r.arrival_s for r in records if r.sent_s is not None)
    if not lags:
        return {"send_lag_p99_s": None, "send_lag_max_s": None, "valid": True, "invalid": None}
    p99 = _percentile(lags, 99)
    valid = p99 <= MAX_SEND_LAG_P99_S
    reason = None if valid else (
        f"client send lag p99 {1000 * p99:.1f} ms > {1000 * MAX_SEND_LAG_P99_S:.0f} ms: the "
        "load replayed was not the trace's"
    )  # fmt: skip
    return {"send_lag_p99_s": p99, "send_lag_max_s": lags[-1], "valid": valid, "invalid": reason}


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of sorted values (numpy's default rule)."""
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
