"""eval.stats on hand-made numbers: intervals, per-rep-pair ratios, the send-lag validity rule."""

from __future__ import annotations

import math

import pytest

from eval import stats
from eval.replay import RequestRecord


def test_t_quantiles_match_the_tables() -> None:
    assert stats.t975(1) == pytest.approx(12.7062)
    assert stats.t975(2) == pytest.approx(4.3027)
    assert stats.t975(30) == pytest.approx(2.0423)
    assert stats.t975(40) == pytest.approx(2.021075, abs=1e-4)  # past the table: the expansion
    assert stats.t975(10_000) == pytest.approx(1.96, abs=1e-3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        stats.t975(0)


def test_mean_and_interval_by_hand() -> None:
    mean, ci = stats.mean_ci95([1.0, 2.0, 3.0])  # sd 1, n 3: half = 4.3027 / sqrt(3)
    half = 4.3027 / math.sqrt(3)
    assert mean == pytest.approx(2.0)
    assert ci == pytest.approx([2.0 - half, 2.0 + half])
    assert stats.mean_ci95([0.5, 0.5]) == (0.5, [0.5, 0.5])  # no spread, no width
    assert stats.mean_ci95([0.3]) == (0.3, None)  # one rep: no interval
    assert stats.mean_ci95([None, 4.0, None]) == (4.0, None)  # missing values are skipped
    assert stats.mean_ci95([]) == (None, None)


def test_summarize_reps_leaves_invalid_reps_out() -> None:
    rows = [
        {"rep": 0, "slo_violation_rate": 0.2, "ttft_p95_s": 1.0, "valid": True},
        {"rep": 1, "slo_violation_rate": 0.4, "ttft_p95_s": 3.0, "valid": True},
        {"rep": 2, "slo_violation_rate": 0.9, "ttft_p95_s": 9.0, "valid": False},
    ]
    out = stats.summarize_reps(rows, ("slo_violation_rate", "ttft_p95_s"))
    assert out["n"] == 2
    assert out["mean"] == pytest.approx({"slo_violation_rate": 0.3, "ttft_p95_s": 2.0})
    half = 12.7062 * math.sqrt(2.0) / math.sqrt(2)  # sd of (1, 3) is sqrt(2)
    assert out["ci95"]["ttft_p95_s"] == pytest.approx([2.0 - half, 2.0 + half])


def test_ratios_are_taken_per_rep_pair_then_summarised() -> None:
    fp = [
        {"rep": 0, "slo_violation_rate": 0.4, "ttft_p95_s": 2.0, "quality_kl": 0.0},
        {"rep": 1, "slo_violation_rate": 0.5, "ttft_p95_s": 4.0, "quality_kl": 0.0},
    ]
    static = [{"rep": 0, "quality_kl": 0.08}, {"rep": 1, "quality_kl": 0.10}]
    morph = [
        {"rep": 0, "slo_violation_rate": 0.1, "ttft_p95_s": 0.5, "quality_kl": 0.04},
        {"rep": 1, "slo_violation_rate": 0.25, "ttft_p95_s": 2.0, "quality_kl": 0.03},
    ]
    out = stats.paired_ratios(fp, morph, static)
    per_rep = out["per_rep"]
    assert [r["violation_reduction_pct"] for r in per_rep] == pytest.approx([75.0, 50.0])
    assert [r["p95_ttft_speedup"] for r in per_rep] == pytest.approx([4.0, 2.0])
    assert [r["quality_cost_vs_static_int4"] for r in per_rep] == pytest.approx([0.5, 0.3])
    assert out["n"] == 2 and out["mean"]["p95_ttft_speedup"] == pytest.approx(3.0)
    half = 12.7062 * math.sqrt(2.0) / math.sqrt(2)  # speed-ups 4 and 2: sd sqrt(2)
    assert out["ci95"]["p95_ttft_speedup"] == pytest.approx([3.0 - half, 3.0 + half])
    # The pooled ratio of means (0.45 -> 0.175: 61.1%) is not the mean of per-pair ratios.
    assert out["mean"]["violation_reduction_pct"] == pytest.approx(62.5)

    # A pair with an invalid side, or without a partner, is left out.
    morph[1]["valid"] = False
    only = stats.paired_ratios(fp, morph + [{"rep": 7, "slo_violation_rate": 0.1}], static)
    assert [r["rep"] for r in only["per_rep"]] == [0] and only["ci95"]["p95_ttft_speedup"] is None


def test_ratios_with_missing_or_zero_figures_are_none() -> None:
    r = stats.ratios(
        {"slo_violation_rate": 0.0, "ttft_p95_s": None}, {"slo_violation_rate": 0.1}, None
    )
    assert r == {
        "violation_reduction_pct": None,
        "p95_ttft_speedup": None,
        "quality_cost_vs_static_int4": None,
    }


def _lagging(lags_s: list[float]) -> list[RequestRecord]:
    return [RequestRecord(i, 1.0 * i, 1.0 * i + lag, 8, 4) for i, lag in enumerate(lags_s)]


def test_send_lag_flags_a_rep_past_50_ms_at_p99() -> None:
    on_time = stats.send_lag(_lagging([0.001 * i for i in range(100)]))  # 0..99 ms
    assert on_time["send_lag_max_s"] == pytest.approx(0.099)
    assert on_time["send_lag_p99_s"] == pytest.approx(0.09801)  # numpy's linear rule
    assert on_time["valid"] is False and "98.0 ms > 50 ms" in on_time["invalid"]

    fine = stats.send_lag(_lagging([0.002] * 98 + [0.2, 0.3]))  # two late sends of 100
    assert fine["send_lag_max_s"] == pytest.approx(0.3)
    assert fine["send_lag_p99_s"] == pytest.approx(0.201)
    assert fine["valid"] is False

    quiet = stats.send_lag(_lagging([0.004] * 99 + [0.9]))
    assert quiet["send_lag_p99_s"] == pytest.approx(0.004 + 0.01 * (0.9 - 0.004))
    assert quiet["valid"] is True and quiet["invalid"] is None

    unsent = [RequestRecord(0, 0.0, None, 8, 4)]
    assert stats.send_lag(unsent) == {
        "send_lag_p99_s": None,
        "send_lag_max_s": None,
        "valid": True,
        "invalid": None,
    }
