"""The restore stabilizer: restores wait for a whole window of restore recommendations, the
window grows when restores are undone and shrinks when they hold, restores wait for the arrival
rate to fall (or a probe), and a simulated steady load stops the chattering it causes without
one. Its rule refuses values it cannot run, naming the option, and is read back from a
checkpoint's metadata."""

from __future__ import annotations

import pytest

from envs.episodes import env_from_metadata
from rl_controller.heuristic import HeuristicPolicy
from rl_controller.rl_policy import read_metadata
from rl_controller.stabilizer import RestoreStabilizer
from sglang_morph.config import (
    RESTORE_LOAD_DROP,
    RESTORE_LOAD_TAU_S,
    RESTORE_MAX_WINDOW_S,
    RESTORE_WINDOW_S,
    RestoreRule,
)
from sglang_morph.paths import DEFAULT_CHECKPOINT
from tests.test_heuristic import TICK_S, replay, trace_of


def test_quantizing_is_never_delayed() -> None:
    s = RestoreStabilizer(RestoreRule(10.0, 10.0, load_drop=0.0))
    assert s.apply(3, 0, 0.0) == 3
    assert s.apply(5, 3, 0.1) == 5
    assert s.held == 0


def test_a_restore_waits_until_the_window_holds_only_restore_recommendations() -> None:
    s = RestoreStabilizer(RestoreRule(1.0, 1.0, load_drop=0.0))
    assert s.apply(2, 0, 0.0) == 2
    assert [s.apply(1, 2, t) for t in (0.2, 0.5, 0.9)] == [2, 2, 2]
    assert s.apply(1, 2, 1.0) == 1  # the quantize recommendation left the window
    assert s.held == 3


def test_a_hold_recommendation_restarts_the_wait() -> None:
    s = RestoreStabilizer(RestoreRule(1.0, 1.0, load_drop=0.0))
    s.apply(2, 2, 0.0)
    s.apply(1, 2, 0.6)
    s.apply(2, 2, 0.8)  # the policy holds once
    assert s.apply(1, 2, 1.5) == 2  # 0.8 is still inside the window
    assert s.apply(1, 2, 1.8) == 1


def test_zero_window_restores_at_once() -> None:
    s = RestoreStabilizer(RestoreRule(0.0, 0.0, load_drop=0.0))
    s.apply(3, 0, 0.0)
    assert s.apply(0, 3, 0.0) == 0 and s.held == 0


def test_the_window_doubles_on_a_regretted_restore_and_halves_on_one_that_held() -> None:
    s = RestoreStabilizer(RestoreRule(1.0, 8.0, load_drop=0.0))
    s.apply(1, 1, 0.0)
    assert s.apply(0, 1, 1.0) == 0  # restored
    s.apply(1, 0, 2.0)  # quantized again within max_window: the restore was a waste
    assert s.window_s == 2.0
    assert s.apply(0, 1, 4.0) == 0  # the wait is now 2 s
    s.apply(1, 0, 5.0)
    assert s.window_s == 4.0
    s.apply(0, 1, 9.0)
    s.apply(0, 0, 17.5)  # nothing quantized for max_window after the restore: it held
    assert s.window_s == 2.0
    for t in range(18, 40):
        s.apply(1, 0, float(t)) if t % 3 == 0 else s.apply(0, 1, float(t))
    assert s.window_s <= 8.0  # never past the bound


def test_memory_stays_bounded() -> None:
    s = RestoreStabilizer(RestoreRule(1.0, 1.0, load_drop=0.0))
    for i in range(10_000):
        s.apply(i % 5, 5, i * 0.001)
    assert s.entries() <= 5  # one per distinct target that could still be the maximum


def test_a_load_gate_without_the_load_is_refused() -> None:
    """Left without the arrival rate, the gate would see no peak and open on every tick."""
    with pytest.raises(ValueError, match="needs the arrival rate"):
        RestoreStabilizer(RestoreRule(1.0, 10.0, load_drop=0.25)).apply(0, 1, 0.0)
    assert RestoreStabilizer(RestoreRule(1.0, 10.0, load_drop=0.0)).apply(3, 0, 0.0) == 3


def test_under_an_unchanged_load_only_one_probe_restore_per_max_window_goes_through() -> None:
    s = RestoreStabilizer(RestoreRule(1.0, 10.0, load_drop=0.25, load_tau_s=5.0))
    assert s.apply(3, 0, 0.0, arrival_rate=4.0) == 3
    # The policy asks to restore every 0.1 s for 19.9 s (the server keeps 3 layers quantized).
    applied = {t / 10: s.apply(0, 3, t / 10, arrival_rate=4.0) for t in range(1, 200)}
    restores = [t for t, k in applied.items() if k < 3]
    assert restores == [10.0]  # one probe at max_window after the quantization, no more
    assert s.rate == pytest.approx(4.0) and s.peak == pytest.approx(4.0)


def test_restores_follow_the_window_once_the_smoothed_rate_has_fallen() -> None:
    s = RestoreStabilizer(RestoreRule(1.0, 100.0, load_drop=0.25, load_tau_s=4.0))
    s.apply(2, 0, 0.0, arrival_rate=8.0)
    assert s.apply(1, 2, 1.0, arrival_rate=2.0) == 2  # smoothed 8 -> 6.7: not yet 25% down
    # 2 s later the smoothed rate is about 4.8, more than 25% below its peak of 8
    assert s.apply(1, 2, 3.0, arrival_rate=2.0) == 1
    assert s.rate is not None and s.rate < 0.75 * s.peak


def test_a_quantization_restarts_the_peak() -> None:
    s = RestoreStabilizer(RestoreRule(0.0, 100.0, load_drop=0.25, load_tau_s=1.0))
    s.apply(1, 0, 0.0, arrival_rate=10.0)
    s.apply(1, 1, 10.0, arrival_rate=2.0)  # the first burst is over: rate about 2
    s.apply(2, 1, 10.1, arrival_rate=2.0)  # quantized at the low rate: the peak starts there
    assert s.peak == pytest.approx(2.0, rel=0.01)
    assert s.apply(1, 2, 20.0, arrival_rate=2.0) == 2  # the load did not fall since


def test_without_a_load_drop_the_rate_is_ignored() -> None:
    s = RestoreStabilizer(RestoreRule(0.0, 100.0, load_drop=0.0))
    s.apply(1, 0, 0.0, arrival_rate=4.0)
    assert s.apply(0, 1, 0.1, arrival_rate=4.0) == 0


def test_the_default_rule_is_the_options_defaults() -> None:
    assert RestoreRule() == RestoreRule(RESTORE_WINDOW_S, RESTORE_MAX_WINDOW_S,
                                        RESTORE_LOAD_DROP, RESTORE_LOAD_TAU_S)


@pytest.mark.parametrize(("fields", "message"), [
    ({"window_s": -1.0}, "--[morph-]restore-window must be 0 or more seconds, got -1"),
    ({"window_s": float("nan")}, "--[morph-]restore-window must be 0 or more seconds, got nan"),
    ({"window_s": float("inf")}, "--[morph-]restore-window must be 0 or more seconds, got inf"),
    ({"max_window_s": 5.0},
     "--[morph-]restore-max-window must be at least the restore window (10 s), got 5"),
    ({"max_window_s": float("inf")},
     "--[morph-]restore-max-window must be at least the restore window (10 s), got inf"),
    ({"load_drop": -0.1}, "--[morph-]restore-load-drop must be a fraction in [0, 1), got -0.1"),
    ({"load_drop": 1.5}, "--[morph-]restore-load-drop must be a fraction in [0, 1), got 1.5"),
    ({"load_drop": 1.0}, "--[morph-]restore-load-drop must be a fraction in [0, 1), got 1"),
    ({"load_drop": float("nan")},
     "--[morph-]restore-load-drop must be a fraction in [0, 1), got nan"),
    ({"load_tau_s": 0.0}, "load_tau_s must be a positive number of seconds, got 0"),
])
def test_a_bad_rule_is_refused_naming_the_option_and_what_it_accepts(
        fields: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError) as err:
        RestoreRule(**fields)
    assert str(err.value) == message


def test_the_rule_a_checkpoint_records_is_read_back() -> None:
    meta = {"restore_window_s": 5.0, "restore_max_window_s": 60.0, "restore_load_drop": 0.1}
    assert RestoreRule.from_metadata(meta) == RestoreRule(5.0, 60.0, load_drop=0.1)


def test_the_shipped_policy_was_trained_under_the_servers_default_rule() -> None:
    """A server started with the defaults serves it under the rule it learned under."""
    assert RestoreRule.from_metadata(read_metadata(DEFAULT_CHECKPOINT)) == RestoreRule()


def test_a_checkpoint_older_than_the_rule_was_trained_without_it() -> None:
    assert RestoreRule.from_metadata({}) == RestoreRule(0.0, 0.0, load_drop=0.0)
    # Trained with a fixed window, before it could grow: the max window is that window.
    assert RestoreRule.from_metadata({"restore_window_s": 10.0}) == RestoreRule(
        10.0, 10.0, load_drop=0.0)


def _steady(window_s: float, max_window_s: float, rate: float = 4.0,
            load_drop: float = 0.0) -> list[int]:
    """Layer swaps per minute of the heuristic on the simulator under 5 min of Poisson
    arrivals, in the shipped checkpoint's environment."""
    env = env_from_metadata(read_metadata(DEFAULT_CHECKPOINT), steady_rate=rate,
                            restore=RestoreRule(window_s, max_window_s, load_drop=load_drop))
    env.reset(options={"window": 0})
    policy, done = HeuristicPolicy(), False
    while not done:
        done = env.step(policy.decide(env.snapshot))[3]
    return env.stats.swaps_by_minute


def test_steady_load_stops_chattering_with_the_default_windows() -> None:
    without = _steady(0.0, 0.0)
    default = _steady(10.0, 120.0)
    assert sum(without) >= 40  # the unguarded heuristic swaps back and forth every minute
    assert sum(default) <= sum(without) / 4
    assert max(default[1:]) <= 4  # after the first minute's ramp


@pytest.mark.parametrize("rate", [3.0, 4.0, 5.0])
def test_waiting_for_the_load_to_fall_keeps_steady_minutes_within_two_swaps(rate: float) -> None:
    windows_only = _steady(RESTORE_WINDOW_S, RESTORE_MAX_WINDOW_S, rate)
    gated = _steady(RESTORE_WINDOW_S, RESTORE_MAX_WINDOW_S, rate, RESTORE_LOAD_DROP)
    assert max(gated[1:]) <= 2, gated  # after the first minute's ramp
    assert sum(gated[1:]) < sum(windows_only[1:]), (gated, windows_only)


def test_after_a_lone_burst_layers_come_back_one_base_window_apart() -> None:
    trace = trace_of([(0.0, 20.0, 1.0), (20.0, 30.0, 40.0), (30.0, 120.0, 0.5)],
                     prompt=250, output=20)
    layers = replay(trace, HeuristicPolicy(), RestoreRule())
    assert max(layers) == 5 and layers[-1] == 0  # quantized for the burst, all given back
    restores = [i * TICK_S for i in range(1, len(layers)) if layers[i] < layers[i - 1]]
    gaps = [b - a for a, b in zip(restores, restores[1:], strict=False)]
    assert len(restores) == 5  # one layer at a time, never undone by a quantization
    assert all(RESTORE_WINDOW_S <= gap < 2 * RESTORE_WINDOW_S for gap in gaps), gaps
