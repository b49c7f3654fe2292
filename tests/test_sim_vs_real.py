"""The pieces of ``envs.sim_vs_real`` that decide what its figure means: which windows, what
counts as late, the error of a cell and of the whole comparison, and which engine replays did
not measure the policy they were asked for. (The engine side itself needs minutes of quiet
machine: it is a benchmark, run by hand; docs/controller.md has its command and figures.)"""

from __future__ import annotations

import pytest

from envs import sim_vs_real as svr
from envs.episodes import env_from_metadata
from eval.traces import select_window
from rl_controller.rl_policy import read_metadata
from sglang_morph.paths import DEFAULT_CHECKPOINT


def test_windows_are_the_busiest_in_time_order() -> None:
    env = env_from_metadata(read_metadata(DEFAULT_CHECKPOINT))
    counts = [len(select_window(env.trace, *w).requests) for w in env.windows]
    chosen = svr.choose_windows(env, 3, None)
    assert chosen == sorted(chosen) and len(set(chosen)) == 3
    assert min(counts[i] for i in chosen) >= max(
        c for i, c in enumerate(counts) if i not in chosen)
    assert svr.choose_windows(env, 3, [4, 1]) == [4, 1]


def test_unfinished_requests_count_as_late() -> None:
    replay = svr.summarise([0.05, 0.10, 0.30], requests=5, slo_s=0.2, swaps=2, mean_layers=1.5)
    assert (replay.finished, replay.late) == (3, 3)  # one over the SLO, two never finished


def test_cell_error_against_the_engine_mean_and_its_median() -> None:
    assert svr.relative_error(0.9, [0.8, 1.2]) == pytest.approx(-0.1)
    cells = [{"error": e} for e in (-0.5, 0.1, 0.2)]
    assert svr.median_abs_error(cells) == pytest.approx(0.2)


@pytest.mark.parametrize(("policy", "ran", "problem"), [
    ("rl", {"policy": "heuristic"}, "ran policy 'heuristic'"),
    ("rl", {"fallbacks": 3}, "3 ticks fell back"),
    ("heuristic", {"failed_requests": 1}, "1 requests failed"),
    ("heuristic", {"start_quantized_layers": 2}, "started with 2 int4 layers"),
    ("fp", {"policy": "off"}, "not 'manual'"),
    ("static-int4", {"policy": "off", "start_quantized_layers": 5}, None),
    ("rl", {}, None),
])
def test_engine_replays_that_did_not_measure_the_policy_are_named(
    policy: str, ran: dict, problem: str | None
) -> None:
    expected = {"fp": "manual", "heuristic": "heuristic", "rl": "rl"}.get(policy, "off")
    full = {"policy": expected, "fallbacks": 0, "failed_requests": 0,
            "start_quantized_layers": 0, **ran}
    found = svr.not_what_was_asked(policy, full)
    assert (found is None) if problem is None else (problem in found)


@pytest.mark.parametrize(("argv", "message"), [
    (["--policies", "fp,int8"], "--policies fp,int8: accepted: fp, static-int4"),
    (["--window-index", "1,x"], "--window-index 1,x: expected comma-separated"),
    (["--windows", "500"], "--windows 500: the checkpoint has"),
    (["--calibration", "/nonexistent/calibration.json"], "--calibration"),
])
def test_bad_options_exit_2_naming_the_option(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        svr.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_simulator_can_take_the_timing_of_the_machine_compared_on(tmp_path) -> None:
    """``--calibration`` replaces only the simulator's engine timing: a checkpoint's
    calibration describes the machine it was trained on, not the one its engine replays run
    on."""
    import argparse
    import json

    from envs.calibration import load_calibration
    from sglang_morph.paths import DEFAULT_CALIBRATION

    data = json.loads(DEFAULT_CALIBRATION.read_text())
    data["model"]["base_s"] /= 2  # a machine twice as fast at the fixed cost
    faster = tmp_path / "faster.json"
    faster.write_text(json.dumps(data))
    args = argparse.Namespace(checkpoint=str(svr.DEFAULT_CHECKPOINT), policies="fp",
                              window_index=None, windows=1, drain_s=60.0,
                              out=str(tmp_path / "o.json"), calibration=str(faster))
    meta, _, _, _, timing = svr.load_inputs(args)
    assert timing == load_calibration(faster)
    assert timing.base_s == pytest.approx(load_calibration(DEFAULT_CALIBRATION).base_s / 2)
    assert svr.load_inputs(argparse.Namespace(**{**vars(args), "calibration": None}))[4] is None
