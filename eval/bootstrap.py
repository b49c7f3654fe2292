"""Within-run intervals: how much one replay's figures depend on the requests it happened to hold.

The main job runs one rep (it must stay short), and an interval over reps needs at least two.
Resampling the run's requests with replacement, with the same draw for every system (all of
them served the same requests, matched by rep and request index), gives a 95% percentile
interval for each system's violation rate and P95 TTFT and for each ratio against fp. Drift of
the machine between runs is not in it: only reps (``--reps``) measure that, and on this 2-core
machine it is the larger of the two, so the report names which interval it prints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from eval.metrics import Slo, violates
from eval.replay import RequestRecord

DRAWS = 1000
"""Resamples per interval; the percentile bounds move by well under a point between seeds."""

Key = tuple[int, int]
"""(rep, request index): one request of one rep, the same in every system."""


def _columns(records: Mapping[Key, RequestRecord], keys: Sequence[Key], slo: Slo
             ) -> tuple[np.ndarray, np.ndarray]:
    """Violated (0/1) and TTFT (NaN where the request failed) in the order of ``keys``."""
    violated = np.array([violates(records[k], slo) for k in keys], dtype=float)
    ttft = np.array([records[k].ttft_s if records[k].ok else np.nan for k in keys], dtype=float)
    return violated, ttft


def _bounds(samples: np.ndarray) -> list[float] | None:
    finite = samples[np.isfinite(samples)]
    if finite.size < len(samples) // 2:  # most draws undefined (no fp violations, say)
        return None
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return [float(lo), float(hi)]


def _draws(violated: np.ndarray, ttft: np.ndarray, index: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """Violation rate and P95 TTFT of every resample (rows of ``index``)."""
    ttfts = ttft[index]
    p95 = np.full(len(index), np.nan)
    some = ~np.all(np.isnan(ttfts), axis=1)
    p95[some] = np.nanpercentile(ttfts[some], 95, axis=1)
    return violated[index].mean(axis=1), p95


def request_intervals(
    records: Mapping[str, Sequence[tuple[int, RequestRecord]]],
    slo: Slo,
    reference: str = "fp",
    draws: int = DRAWS,
    seed: int = 0,
) -> tuple[dict[str, dict], dict[str, dict]]:
    """``(per_system, vs_reference)``: per system ``{"slo_violation_rate": [lo, hi],
    "ttft_p95_s": [lo, hi]}`` over its requests ((rep, record) pairs), and per other system
    ``{"violation_reduction_pct": [lo, hi], "p95_ttft_speedup": [lo, hi]}`` over the
    requests it shares with ``reference``; a bound is None where most draws leave it undefined."""
    by_key = {name: {(rep, r.index): r for rep, r in rows} for name, rows in records.items()}
    cache: dict[tuple[str, tuple[Key, ...]], tuple[np.ndarray, np.ndarray]] = {}

    def resampled(name: str, keys: tuple[Key, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Violation rate and P95 TTFT of ``name`` under every draw over ``keys``: the same
        draw for every system with these keys, and computed once per system (a system's own
        interval and its ratio to the reference use one pass when, as usual, it served
        exactly the reference's requests)."""
        if (name, keys) not in cache:
            index = np.random.default_rng(seed).integers(0, len(keys), size=(draws, len(keys)))
            cache[name, keys] = _draws(*_columns(by_key[name], keys, slo), index)
        return cache[name, keys]

    per_system: dict[str, dict] = {}
    for name, rows in by_key.items():
        if rows:
            rate, p95 = resampled(name, tuple(sorted(rows)))
            per_system[name] = {"slo_violation_rate": _bounds(rate), "ttft_p95_s": _bounds(p95)}
    vs: dict[str, dict] = {}
    ref = by_key.get(reference)
    for name, rows in by_key.items():
        if name == reference or not ref:
            continue
        keys = tuple(sorted(set(rows) & set(ref)))
        if not keys:
            continue
        ref_rate, ref_p95 = resampled(reference, keys)
        rate, p95 = resampled(name, keys)
        with np.errstate(divide="ignore", invalid="ignore"):
            reduction = np.where(ref_rate > 0, 100.0 * (ref_rate - rate) / ref_rate, np.nan)
            speedup = np.where(p95 > 0, ref_p95 / p95, np.nan)
        vs[name] = {"violation_reduction_pct": _bounds(reduction),
                    "p95_ttft_speedup": _bounds(speedup)}
    return per_system, vs
