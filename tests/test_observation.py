"""The shared observation: shape, range, robustness to bad inputs, and the snapshot builder's
KV accounting."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from rl_controller.clock import LoadClock
from rl_controller.observation import (
    FEATURES,
    OBS_SIZE,
    LoadSnapshot,
    RawLoad,
    build_snapshot,
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


def raw(**overrides) -> RawLoad:
    base = RawLoad(
        queue_len=2, queued_prompt_tokens=300, head_demand_tokens=180, running_reqs=3,
        kv_capacity_tokens=512, kv_held_tokens=200, kv_free_slots=280, kv_evictable_tokens=32,
        kv_promised_tokens=90, oldest_arrival_s=9.5, ttft_slo_s=0.08, quantized_layers=1,
        num_layers=5, tokens_per_layer=122,
    )
    return dataclasses.replace(base, **overrides)


def test_promised_decodes_count_as_used_up_to_the_free_slots() -> None:
    clock = LoadClock(start_s=4.0)
    snap = build_snapshot(raw(), clock, now=10.0)
    assert (snap.kv_used_tokens, snap.kv_free_tokens) == (290, 190)
    assert snap.oldest_wait_s == pytest.approx(0.5) and snap.seconds_since_transition == 6.0
    short = build_snapshot(raw(kv_promised_tokens=400), clock, now=10.0)
    assert (short.kv_used_tokens, short.kv_free_tokens) == (480, 0)
    idle = build_snapshot(raw(queue_len=0, oldest_arrival_s=None), clock, now=10.0)
    assert idle.oldest_wait_s == 0.0
