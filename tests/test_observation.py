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
    OBS_VERSION,
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
        {"decode_iteration_s": math.inf, "tpot_slo_s": 0.05, "kv_budget_tokens": -3},
        {"decode_iteration_s": math.nan, "tpot_slo_s": math.nan},
        {"decode_iteration_s": 0.1, "tpot_slo_s": -1.0, "kv_budget_tokens": 10},
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


DECODE, LIMIT = 15, 16  # the KV-limit features (OBS_VERSION 2)


def test_decode_iteration_is_judged_against_the_tpot_target() -> None:
    at_target = snapshot(decode_iteration_s=0.04, tpot_slo_s=0.04)
    assert observation_vector(at_target)[DECODE] == pytest.approx(0.5)
    assert observation_vector(snapshot(decode_iteration_s=0.02, tpot_slo_s=0.04))[
        DECODE] == pytest.approx(0.25)
    assert observation_vector(snapshot(decode_iteration_s=0.5, tpot_slo_s=0.04))[DECODE] == 1.0
    no_target = snapshot(decode_iteration_s=0.5)  # tpot_slo_s defaults to inf: no target
    assert observation_vector(no_target)[DECODE] == 0.0


def test_kv_limit_is_the_capacity_relative_to_the_budget() -> None:
    assert observation_vector(snapshot(kv_budget_tokens=1512))[LIMIT] == pytest.approx(0.5)
    assert observation_vector(snapshot(kv_budget_tokens=756))[LIMIT] == 1.0
    assert observation_vector(snapshot(kv_budget_tokens=700))[LIMIT] == 1.0  # clipped
    assert observation_vector(snapshot(kv_budget_tokens=0))[LIMIT] == 1.0  # unknown budget


def test_the_version_counts_the_kv_limit_features() -> None:
    assert OBS_VERSION == 2 and OBS_SIZE == 17
    assert "tpot" in FEATURES[DECODE] and "kv_budget" in FEATURES[LIMIT]


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
