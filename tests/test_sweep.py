"""eval.sweep: sweep.json and figures from summaries, input errors before any run, and (slow) a
tiny window at two time scales against real servers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval import sweep

REPO = Path(__file__).resolve().parent.parent


def _summary(time_scale: float, fp_rate: float, morph_rate: float, reps: int = 2) -> dict:
    def row(rate: float, p95: float) -> dict:
        ci = [rate - 0.05, rate + 0.05] if reps > 1 else None
        return {
            "slo_violation_rate": rate,
            "ttft_p95_s": p95,
            "mean": {"slo_violation_rate": rate, "ttft_p95_s": p95},
            "ci95": {"slo_violation_rate": ci, "ttft_p95_s": None},
            "per_rep": [{"rep": r} for r in range(reps)],
        }

    return {
        "trace": {"window": [569.0, 574.0], "window_how": "--window 569:574", "requests": 40,
                  "duration_s": 5.0 / time_scale},
        "budget": {"bytes": 2_099_968, "how": "default"},
        "slo": {"ttft_s": 0.1, "tpot_s": 0.04, "how": "fixed"},
        "profile": "lis",
        "reps": reps,
        "systems": {"fp": row(fp_rate, 2.0), "morph-heuristic": row(morph_rate, 0.5)},
        "vs_fp": {"morph-heuristic": {"n": reps, "mean": {}, "ci95": {}, "per_rep": []}},
        "invalid_reps": [],
        "failures": [],
    }  # fmt: skip


def _point(ts: float, ss: float) -> dict:
    return {"name": f"ts{ts}", "time_scale": ts, "slo_scale": ss, "budget": None,
            "run_dir": "/x", "exit_status": 0}  # fmt: skip


def test_sweep_json_and_figures(tmp_path: Path) -> None:
    points = [
        sweep.sweep_point(_summary(1.0, 0.2, 0.1), _point(1.0, 1.0)),
        sweep.sweep_point(_summary(2.0, 0.6, 0.2), _point(2.0, 1.0)),
        sweep.sweep_point(_summary(1.0, 0.1, 0.05), _point(1.0, 2.0)),
    ]
    assert points[1]["offered_load_req_s"] == pytest.approx(16.0)  # 40 requests in 2.5 s
    assert points[0]["budget_bytes"] == 2_099_968 and points[0]["window"] == [569.0, 574.0]
    fp = points[0]["systems"]["fp"]
    assert "per_rep" not in fp and fp["ci95"]["slo_violation_rate"] == pytest.approx([0.15, 0.25])
    written = sweep.write_sweep(tmp_path, {"time_scales": [1.0, 2.0]}, points)
    names = {p.name for p in written}
    assert names == {
        "violations_vs_load.png",
        "ttft_p95_vs_load.png",
        "violations_vs_slo_scale.png",
    }
    assert all(p.stat().st_size > 1000 for p in written)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["time_scale"] for p in saved["points"]] == [1.0, 2.0, 1.0]
    assert saved["points"][2]["systems"]["morph-heuristic"]["slo_violation_rate"] == 0.05
    assert saved["options"] == {"time_scales": [1.0, 2.0]}


def test_one_point_has_no_curve_to_draw(tmp_path: Path) -> None:
    points = [sweep.sweep_point(_summary(1.0, 0.2, 0.1, reps=1), _point(1.0, 1.0))]
    failed = {**_point(2.0, 1.0), "exit_status": 1}  # a point without a summary
    assert sweep.write_sweep(tmp_path, {}, [*points, failed]) == []
    assert len(json.loads((tmp_path / "sweep.json").read_text())["points"]) == 2
    assert not list(tmp_path.glob("*.png"))


def test_point_command_lines(tmp_path: Path) -> None:
    argv = sweep.point_argv(["--systems", "fp"], tmp_path / "p", 0.5, 2.0, "2MB", (10.0, 30.0))
    assert argv == ["--systems", "fp", "--time-scale", "0.5", "--slo-scale", "2", "--out",
                    str(tmp_path / "p"), "--budget", "2MB", "--window", "10.0:30.0"]  # fmt: skip
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "plan.json").write_text("{}")
    assert sweep.point_argv(["--systems", "fp"], tmp_path / "p", 0.5, 2.0, None, None) == [
        "--resume",
        str(tmp_path / "p"),
    ]


def test_only_complete_points_count_as_finished(tmp_path: Path) -> None:
    assert not sweep.finished(tmp_path)  # no summary yet
    complete = {"interrupted": False, "slo": {"ttft_s": 0.1}, "failures": []}
    for summary, done in [
        (complete, True),
        ({**complete, "interrupted": True}, False),
        ({**complete, "slo": None}, False),  # the SLOs could not be measured
        ({**complete, "failures": [{"system": "fp", "rep": 0, "reason": "x"}]}, False),
    ]:
        (tmp_path / "summary.json").write_text(json.dumps(summary))
        assert sweep.finished(tmp_path) is done, summary


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--time-scales", "1,0"], "--time-scales '1,0': expected comma-separated numbers > 0"),
        (["--slo-scales", "x"], "--slo-scales 'x'"),
        (["--budgets", "lots"], "--budgets"),
        (["--windows", "segments:0"], "random:N:LEN[:SEED] or segments:LEN"),
        (["--windows", "random:2:99999"], "exceeds the trace's"),
        (["--time-scale", "2"], "--time-scale: set by the sweep per point"),
        (["--out=/tmp/x", "--window", "1:2"], "--window: set by the sweep per point"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_:
        sweep.main([*argv, "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()  # nothing ran


@pytest.mark.slow
def test_two_time_scales_against_real_servers(tmp_path: Path) -> None:
    """A 3-second window at two time scales, fp only: two real eval.run points, one sweep.json
    and the load figures."""
    out = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "eval.sweep", "--time-scales", "1,2", "--windows", "0:3",
        "--out", str(out), "--systems", "fp", "--request-timeout", "60",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "sweep.json").read_text())
    first, second = saved["points"]
    assert (first["time_scale"], second["time_scale"]) == (1.0, 2.0)
    assert first["requests"] == second["requests"] > 0
    assert second["offered_load_req_s"] == pytest.approx(2 * first["offered_load_req_s"])
    for point in saved["points"]:
        assert point["exit_status"] == 0 and point["slo"]["how"].startswith("fixed")
        fp = point["systems"]["fp"]
        assert fp["completed"] == point["requests"] and "ci95" in fp and "mean" in fp
    assert (out / "violations_vs_load.png").stat().st_size > 1000
    assert (out / "ttft_p95_vs_load.png").stat().st_size > 1000
