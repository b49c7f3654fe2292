"""The shared observation: shape, range, robustness to bad inputs, and the rate meter."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from rl_controller.observation import (
    FEATURES,
    OBS_SIZE,
    ArrivalRateMeter,
    LoadSnapshot,
    observation_vector,
)


def snapshot(**overrides) -> LoadSnapshot:
    base = LoadSnapshot(
        queue_len=3, queued_prompt_tokens=400, head_prefill_tokens=120, running_reqs=5,
        kv_capacity_tokens=756, kv_used_tokens=500, kv_free_tokens=256, kv_evictable_tokens=0,
        arrival_rate=4.0, oldest_wait_s=0.05, ttft_slo_s=0.08, quantized_layers=2, num_layers=5,
        tokens_per_layer=122, recent_transitions=2, seconds_since_transition=3.0,
    )
    return dataclasses.replace(base, **overrides)


def test_shape_dtype_range() -> None:
    vec = observation_vector(snapshot())
    assert vec.shape == (OBS_SIZE,) == (len(FEATURES),)
    assert vec.dtype == np.float32
    assert np.all(np.isfinite(vec)) and vec.min() >= 0.0 and vec.max() <= 1.0


@pytest.mark.parametrize(
    "overrides",
    [
        {"arrival_rate": math.nan, "oldest_wait_s": math.inf},
        {"seconds_since_transition": math.inf, "ttft_slo_s": 0.0},
        {"kv_capacity_tokens": 0, "queue_len": 10**9},
        {"oldest_wait_s": -1.0, "kv_free_tokens": -5},
    ],
)
def test_bad_inputs_stay_finite_and_in_range(overrides: dict) -> None:
    vec = observation_vector(snapshot(**overrides))
    assert np.all(np.isfinite(vec)) and vec.min() >= 0.0 and vec.max() <= 1.0


def test_features_respond_to_load() -> None:
    calm = observation_vector(snapshot(queue_len=0, head_prefill_tokens=0, oldest_wait_s=0.0))
    busy = observation_vector(snapshot(queue_len=40, head_prefill_tokens=300, oldest_wait_s=0.5))
    assert busy[0] > calm[0]  # queue length
    assert busy[3] == 0.0 and calm[3] == 1.0  # head fits in free + evictable
    assert busy[9] > calm[9]  # oldest wait relative to the SLO


def test_rate_meter_window() -> None:
    meter = ArrivalRateMeter(window_s=2.0)
    for t in (0.1, 0.5, 1.0, 1.5):
        meter.record(t)
    assert meter.rate(1.5) == pytest.approx(2.0)  # 4 events / 2 s
    assert meter.count(2.2) == 3  # 0.1 left the window (0.2, 2.2]
    assert meter.count(2.6) == 2
    meter.record(2.7, n=3)
    assert meter.count(2.7) == 5
    assert meter.count(10.0) == 0
    with pytest.raises(ValueError):
        ArrivalRateMeter(window_s=0)
