"""One clock and one snapshot builder: the windows, bounded memory, and the same observation from
the runtime's path (SGLang's scheduler read by sglang_morph.scheduler_view) and the simulator's
for the same events."""

from __future__ import annotations

import numpy as np
import pytest

from envs.calibration import IterationModel
from envs.simulator import Simulator
from eval.traces import Trace, TraceRequest
from rl_controller.clock import (
    RATE_WINDOW_S,
    RESOLUTION_S,
    TRANSITION_WINDOW_S,
    LoadClock,
    WindowCount,
)
from rl_controller.observation import build_snapshot, observation_vector
from sglang_morph import scheduler_view
from tests.sglang_doubles import FakeBatch, FakeReq, FakeScheduler

MODEL = IterationModel(0.005, 1e-4, 1e-3, 5e-4, 0.01, source="test")


def test_window_count_slides() -> None:
    window = WindowCount(2.0)
    for t in (0.1, 0.5, 1.0, 1.5):
        window.record(t)
    assert window.count(1.5) == 4
    assert window.count(2.2) == 3  # 0.1 left the window (0.2, 2.2]
    assert window.count(2.6) == 2
    window.record(2.7, n=3)
    assert window.count(2.7) == 5
    assert window.count(10.0) == 0
    with pytest.raises(ValueError):
        WindowCount(0)


def test_memory_stays_bounded_under_any_arrival_rate() -> None:
    window = WindowCount(RATE_WINDOW_S)
    for i in range(200_000):  # 100,000 arrivals per second for two seconds
        window.record(i * 1e-5)
    assert window.count(2.0) == 200_000
    assert window.entries() <= 2.0 / RESOLUTION_S + 1
    for t in np.arange(0.0, 60.0, 0.01):  # a minute of steady arrivals: old ones are dropped
        window.record(2.0 + t)
    assert window.entries() <= RATE_WINDOW_S / 0.01 + 1


def test_each_signal_has_its_own_window_and_the_clock_starts_at_a_transition() -> None:
    clock = LoadClock(start_s=100.0)
    assert clock.seconds_since_transition(103.0) == 3.0 and clock.recent_transitions(103.0) == 0
    clock.arrival(104.0)
    clock.transition(104.0, layers=2)
    now = 104.0 + RATE_WINDOW_S + 1.0  # past the arrival window, inside the transition window
    assert clock.arrival_rate(now) == 0.0 and clock.recent_transitions(now) == 2
    assert clock.recent_transitions(104.0 + TRANSITION_WINDOW_S) == 0
    assert clock.seconds_since_transition(now) == now - 104.0
    clock.transition(now, layers=0)  # nothing changed: no transition
    assert clock.seconds_since_transition(now) == now - 104.0


def trace() -> Trace:
    requests = tuple(
        TraceRequest(0.25 * i, 120 + (i * 37) % 100, 60 + (i * 13) % 80) for i in range(40)
    )
    return Trace("synthetic", requests, {"span_s": 10.0})


def mirror(sim: Simulator) -> FakeScheduler:
    """A scheduler holding what the simulator holds: the same queue, the same running requests
    with their KV slots, the same capacity."""
    s = FakeScheduler(sim.capacity)
    for r in sim._waiting:
        s.waiting_queue.append(FakeReq(r.prompt, r.trace.output_tokens, r.generated,
                                       recv_time=r.trace.arrival_s))
    for r in sim._running:
        req = FakeReq(r.trace.input_tokens, r.trace.output_tokens, r.generated)
        s.running_batch.reqs.append(s.admit(req, r.kv))
    if sim._prefilling is not None:
        p = sim._prefilling
        s.chunked_req = s.admit(FakeReq(p.trace.input_tokens, p.trace.output_tokens,
                                        p.generated), p.kv)
        s.last_batch = FakeBatch([s.chunked_req], extend=True)
    return s


def test_runtime_and_simulator_observe_the_same_events_alike() -> None:
    """Arrivals over 7 s, two layers quantized at 0.5 s (6.5 s before the observation: inside
    the 10-s transition window, outside the 5-s arrival window), a queue and running decodes."""
    sim = Simulator(MODEL)
    window = trace()
    sim.reset(window)
    runtime_clock = LoadClock(start_s=0.0)
    for tick in range(140):
        target = 2 if tick >= 10 else 0
        swapped = abs(target - sim.quantized_layers)
        swap_at = sim.now + MODEL.swap_s_per_layer * swapped
        sim.advance(0.05, target)
        for _ in range(swapped):  # the runtime commits, and counts, one layer at a time
            runtime_clock.transition(swap_at)
    for r in window.requests:
        if r.arrival_s <= sim.now:
            runtime_clock.arrival(r.arrival_s)

    expected = sim.snapshot()
    scheduler = mirror(sim)
    raw = scheduler_view.raw_load(
        scheduler, kv_capacity_tokens=sim.capacity, kv_committed_tokens=sim.capacity,
        quantized_layers=sim.quantized_layers, num_layers=sim.config.num_layers,
        tokens_per_layer=sim.config.tokens_per_layer, ttft_slo_s=sim.config.ttft_slo_s,
        tpot_slo_s=sim.config.tpot_slo_s, decode_iteration_s=sim.snapshot().decode_iteration_s,
        kv_budget_tokens=sim.budget_tokens(sim.quantized_layers),
    )  # the decode median is each side's own timing (measured or modelled), passed through
    got = build_snapshot(raw, runtime_clock, sim.now)

    assert expected.queue_len > 0 and expected.running_reqs > 0  # the case is not trivial
    assert expected.recent_transitions == 2 and expected.seconds_since_transition > RATE_WINDOW_S
    assert got == expected
    assert np.array_equal(observation_vector(got), observation_vector(expected))
