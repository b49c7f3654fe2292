"""Metrics on hand-made records whose answers are worked out by hand."""

from __future__ import annotations

import math

import pytest

from eval.metrics import (
    Slo,
    mean_quantized_layers,
    percentile,
    summarize,
    token_weights,
    violates,
    weighted_quality,
)
from eval.replay import RequestRecord

SLO = Slo(ttft_s=0.3, tpot_s=0.15, how="test")


def _rec(
    index: int,
    sent: float,
    ttft: float | None,
    e2e: float | None,
    out: int,
    error: str | None = None,
) -> RequestRecord:
    tpot = (e2e - ttft) / (out - 1) if ttft is not None and e2e is not None and out > 1 else None
    return RequestRecord(index, sent, sent, 10, out, out, ttft, tpot, e2e, error)


RECORDS = [
    _rec(0, 0.0, 0.1, 1.0, 10),  # tpot 0.1: meets both
    _rec(1, 1.0, 0.5, 2.0, 4),  # TTFT 0.5 > 0.3: violates
    _rec(2, 2.0, None, None, 0, error="timeout"),  # failed: violates
    _rec(3, 3.0, 0.2, 3.0, 1),  # one token, no TPOT: judged on TTFT, meets
]


def test_percentile_interpolates_linearly() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 95) == pytest.approx(3.85)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_violation_rules() -> None:
    assert [violates(r, SLO) for r in RECORDS] == [False, True, True, False]
    slow_decode = _rec(4, 0.0, 0.1, 2.0, 3)  # tpot 0.95
    assert violates(slow_decode, SLO)


def test_summarize_known_answers() -> None:
    s = summarize(RECORDS, SLO)
    assert (s["requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert s["slo_violation_rate"] == 0.5
    assert s["wall_s"] == 6.0  # last response: sent 3.0 + e2e 3.0
    assert s["throughput_tok_s"] == pytest.approx((10 + 4 + 1) / 6.0)
    assert s["goodput_req_s"] == pytest.approx(2 / 6.0)
    assert s["ttft_p50_s"] == pytest.approx(0.2)
    assert s["ttft_p99_s"] == pytest.approx(0.2 + 0.98 * 0.3)
    assert s["tpot_p50_s"] == pytest.approx(0.3)  # tpots 0.1 and 0.5


def test_summarize_empty_and_all_failed() -> None:
    assert summarize([], SLO)["slo_violation_rate"] is None
    s = summarize([_rec(0, 0.0, None, None, 0, error="HTTP 500")], SLO)
    assert s["slo_violation_rate"] == 1.0 and s["ttft_p95_s"] is None


def test_token_weights_follow_the_timeline() -> None:
    timeline = [
        {"t": 0.0, "formats": {}},
        {"t": 1.0, "formats": {"0": "int4"}},
        {"t": 2.0, "formats": {"0": "int4", "3": "int4"}},
    ]
    # tokens at 0.5, 1.0, 1.5 -> fp, 1 layer, 1 layer
    record = _rec(0, 0.0, 0.5, 1.5, 3)
    failed = _rec(1, 0.0, None, None, 0, error="timeout")
    weights = token_weights([record, failed], timeline)
    assert weights == {(): 1.0, ((0, "int4"),): 2.0}
    late = _rec(2, 2.5, 0.5, 0.5, 1)  # one token at 3.0: the last sample holds
    assert token_weights([late], timeline) == {((0, "int4"), (3, "int4")): 1.0}
    assert token_weights([record], []) == {}


def test_weighted_quality_geometric_ppl_linear_kl() -> None:
    fp, one = (), ((0, "int4"),)
    quality = {fp: {"ppl": 2.0, "kl": 0.0}, one: {"ppl": 4.0, "kl": 0.3}}
    ppl, kl = weighted_quality({fp: 1.0, one: 2.0}, quality)
    assert ppl == pytest.approx(math.exp((math.log(2) + 2 * math.log(4)) / 3))
    assert kl == pytest.approx(0.2)
    assert weighted_quality({((1, "int8"),): 1.0}, quality) == (None, None)
    assert mean_quantized_layers({fp: 1.0, one: 3.0}) == pytest.approx(0.75)
    assert mean_quantized_layers({}) is None
