"""Latency, SLO and quality metrics computed from per-request records and a state timeline.

Kept free of I/O and servers so the numbers a report prints can be checked against hand-made
records in tests: percentiles, SLO violations, goodput and the token-weighted quality of a run
whose model changed while it served.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from eval.replay import RequestRecord

FormatKey = tuple[tuple[int, str], ...]
"""The quantized layers in force, as sorted (layer id, format) pairs; () is full precision."""


@dataclass(frozen=True)
class Slo:
    """Service-level objective: a request meets it when it completes, its TTFT is at most
    ``ttft_s`` and its mean time per output token is at most ``tpot_s``."""

    ttft_s: float
    tpot_s: float
    how: str


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile with linear interpolation (numpy's default), None when empty."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def violates(record: RequestRecord, slo: Slo) -> bool:
    """Failed requests violate; so does a TTFT or TPOT above the SLO (a one-token output has no
    TPOT and is judged on TTFT alone)."""
    if not record.ok:
        return True
    if record.ttft_s is not None and record.ttft_s > slo.ttft_s:
        return True
    return record.tpot_s is not None and record.tpot_s > slo.tpot_s


def wall_time_s(records: Sequence[RequestRecord]) -> float:
    """From the replay start to the last response (or last send, for requests that failed):
    the denominator of throughput and goodput, so a server that drains a queue late pays."""
    ends = [(r.sent_s or r.arrival_s) + (r.e2e_s if r.e2e_s is not None else 0.0) for r in records]
    return max(ends, default=0.0)


def summarize(records: Sequence[RequestRecord], slo: Slo, wall_s: float | None = None) -> dict:
    """The per-system latency fields of summary.json; rates per second are over ``wall_s``
    (default: the records' own wall time; records pooled over reps pass the reps' summed wall
    time, since each rep replays the window from its own zero)."""
    ok = [r for r in records if r.ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpots = [r.tpot_s for r in ok if r.tpot_s is not None]
    violations = sum(violates(r, slo) for r in records)
    wall = wall_time_s(records) if wall_s is None else wall_s
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "slo_violation_rate": violations / len(records) if records else None,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "ttft_p99_s": percentile(ttfts, 99),
        "tpot_p50_s": percentile(tpots, 50),
        "tpot_p95_s": percentile(tpots, 95),
        "throughput_tok_s": sum(r.output_tokens for r in ok) / wall if wall > 0 else None,
        "goodput_req_s": (len(records) - violations) / wall if wall > 0 else None,
        "wall_s": wall,
        "prefix_cache_hit_rate": prefix_cache_hit_rate(ok),
    }


def prefix_cache_hit_rate(records: Sequence[RequestRecord]) -> float | None:
    """Share of prompt tokens SGLang served from its prefix cache, over the records whose server
    reported a count (None when none did: records saved before the count was kept)."""
    known = [r for r in records if r.cached_tokens is not None]
    prompt = sum(r.prompt_tokens for r in known)
    return sum(r.cached_tokens or 0 for r in known) / prompt if prompt > 0 else None


def format_key(formats: Mapping[str, str] | Mapping[int, str]) -> FormatKey:
    """A hashable key of a layer-id -> format map, dropping full-precision layers."""
    return tuple(sorted((int(k), v) for k, v in formats.items() if v != "fp"))


def token_weights(
    records: Iterable[RequestRecord], timeline: Sequence[Mapping]
) -> dict[FormatKey, float]:
    """How many generated tokens each layer-format configuration produced.

    A request's tokens are spread evenly between its first token and its end (the stream's
    mean pace), and each is attributed to the latest timeline sample at or before it (the
    first sample for tokens before any). Empty when there is no timeline.
    """
    if not timeline:
        return {}
    times = np.array([row["t"] for row in timeline], dtype=float)
    counts = np.zeros(len(timeline))
    for r in records:
        if not r.ok or r.output_tokens <= 0 or r.sent_s is None:
            continue
        first = r.sent_s + (r.ttft_s or 0.0)
        last = r.sent_s + (r.e2e_s if r.e2e_s is not None else r.ttft_s or 0.0)
        token_times = np.linspace(first, last, r.output_tokens)
        rows = np.clip(np.searchsorted(times, token_times, side="right") - 1, 0, None)
        counts += np.bincount(rows, minlength=len(timeline))
    weights: dict[FormatKey, float] = {}
    for row, count in zip(timeline, counts, strict=True):
        if count:
            key = format_key(row.get("formats") or {})
            weights[key] = weights.get(key, 0.0) + float(count)
    return weights


def weighted_quality(
    weights: Mapping[FormatKey, float], quality: Mapping[FormatKey, Mapping[str, float]]
) -> tuple[float | None, float | None]:
    """Token-weighted (perplexity, KL) of a run from per-configuration values.

    Perplexity combines as exp of the weighted mean log-perplexity (the perplexity of the whole
    token stream when each token has its configuration's mean NLL); KL, already a per-token
    mean, combines linearly. None when any needed configuration lacks a value.
    """
    total = sum(weights.values())
    if total <= 0 or any(key not in quality for key in weights):
        return None, None
    log_ppl = sum(w * math.log(quality[k]["ppl"]) for k, w in weights.items()) / total
    kl = sum(w * quality[k]["kl"] for k, w in weights.items()) / total
    return math.exp(log_ppl), kl


def mean_quantized_layers(weights: Mapping[FormatKey, float]) -> float | None:
    """Token-weighted mean number of quantized layers (how much the run leaned on quantization)."""
    total = sum(weights.values())
    return sum(len(k) * w for k, w in weights.items()) / total if total > 0 else None
