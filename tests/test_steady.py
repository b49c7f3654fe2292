"""The steady-load benchmark's bookkeeping: its arrivals are the Poisson stream it claims, the
transitions it counts per minute are the counter's, and its verdict names what missed. (The
serving itself is the benchmark, run by hand: docs/controller.md has its command and figures.)"""

from __future__ import annotations

import numpy as np

from eval.steady import per_minute, problems
from eval.traces import LengthMapping, load_trace, map_lengths, poisson_load


def test_poisson_load_keeps_its_rate_and_the_traces_shapes() -> None:
    trace = map_lengths(load_trace("azure-code"), LengthMapping())
    load = poisson_load(trace, rate=4.0, seconds=600.0, seed=3)
    gaps = np.diff([r.arrival_s for r in load])
    assert abs(len(load) / 600.0 - 4.0) < 0.4  # about 2,400 arrivals, sd ~49
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.1  # exponential gaps: CV 1
    shapes = {(r.input_tokens, r.output_tokens) for r in trace.requests}
    assert all((r.input_tokens, r.output_tokens) in shapes for r in load)
    assert load == poisson_load(trace, rate=4.0, seconds=600.0, seed=3)  # same for every policy


def test_transitions_per_minute_from_the_counter() -> None:
    timeline = [{"t": 1.0, "transitions": 0}, {"t": 30.0, "transitions": 3},
                {"t": 59.0, "transitions": 4}, {"t": 61.0, "transitions": None},
                {"t": 119.0, "transitions": 4}, {"t": 150.0, "transitions": 9}]
    assert per_minute(timeline, 3) == [4, 0, 5]


def test_verdict_names_each_miss() -> None:
    ok = {"policy": "rl", "ran": {"policy": "rl", "fallbacks": 0}, "failed_requests": 0,
          "transitions_per_minute": [2, 0, 1]}
    assert problems(ok, 2) == []
    bad = {**ok, "ran": {"policy": "heuristic", "fallbacks": 7}, "failed_requests": 1,
           "transitions_per_minute": [0, 3]}
    found = " | ".join(problems(bad, 2))
    for needle in ("3 transitions in one minute", "ran policy 'heuristic'", "7 ticks fell back",
                   "1 requests failed"):
        assert needle in found
