"""``eval.dominance``: the learned controller's acceptance check over several ``eval.run``
summaries: pooling, the verdict's conditions each able to fail, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval import dominance
from eval.dominance import figures, paired_differences, verdict


def _rep(rep: int, rate: float, kl: float | None, *, requests: int = 100, valid: bool = True,
         fallbacks: int = 0, loaded: object = "/ck.zip") -> dict:
    return {"rep": rep, "requests": requests, "slo_violation_rate": rate, "quality_kl": kl,
            "valid": valid, "fallbacks": fallbacks, "policy_loaded": loaded}


def _summary(heuristic: list[dict], rl: list[dict], transitions: tuple[int, int]) -> dict:
    return {"systems": {
        "fp": {"per_rep": [_rep(r["rep"], 0.5, 0.0) for r in heuristic], "transitions": 0},
        "morph-heuristic": {"per_rep": heuristic, "transitions": transitions[0]},
        "morph-rl": {"per_rep": rl, "transitions": transitions[1]},
    }}


def _write(tmp_path: Path, name: str, summary: dict) -> str:
    (tmp_path / name).mkdir()
    (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    return str(tmp_path / name)


WINDOW_A = _summary([_rep(0, 0.20, 0.05), _rep(1, 0.30, 0.05)],
                    [_rep(0, 0.10, 0.04), _rep(1, 0.20, 0.05)], (10, 12))
WINDOW_B = _summary([_rep(0, 0.10, 0.02, requests=300), _rep(1, 0.9, 0.02, valid=False)],
                    [_rep(0, 0.10, 0.02, requests=300), _rep(1, 0.0, 0.02)], (4, 3))


def test_figures_pool_late_requests_and_weight_kl_by_requests_over_valid_reps() -> None:
    pooled = [("a", WINDOW_A), ("b", WINDOW_B)]
    heuristic = figures(pooled, "morph-heuristic")
    assert (heuristic.requests, heuristic.late, heuristic.reps) == (500, 80, 3)  # invalid left out
    assert heuristic.kl_weighted == pytest.approx((0.05 * 200 + 0.02 * 300) / 500)
    assert heuristic.transitions == 14
    rl = figures(pooled, "morph-rl")
    assert (rl.requests, rl.late, rl.reps) == (600, 60, 4)
    assert rl.violation_mean == pytest.approx((0.1 + 0.2 + 0.1 + 0.0) / 4)
    assert rl.violation_ci95 is not None and rl.violation_ci95[0] < rl.violation_mean
    # Pairs need both sides valid: window b's rep 1 has an invalid heuristic rep.
    assert paired_differences(pooled, "morph-rl", "morph-heuristic") == pytest.approx(
        [-0.1, -0.1, 0.0])


def test_verdict_dominates_only_when_every_condition_holds() -> None:
    pooled = [("a", WINDOW_A), ("b", WINDOW_B)]
    ok, failed = verdict(figures(pooled, "morph-rl"), figures(pooled, "morph-heuristic"))
    assert ok and failed == []  # 10% against 16% late, KL lower, 15 against 14 transitions
    # Each condition on its own.
    worse = _summary([_rep(0, 0.10, 0.05)], [_rep(0, 0.12, 0.01)], (10, 10))
    chatter = _summary([_rep(0, 0.20, 0.05)], [_rep(0, 0.10, 0.01)], (10, 16))
    close = _summary([_rep(0, 0.20, 0.05)], [_rep(0, 0.19, 0.049)], (10, 10))
    fell_back = _summary([_rep(0, 0.20, 0.05)], [_rep(0, 0.10, 0.01, fallbacks=3)], (10, 10))
    not_loaded = _summary([_rep(0, 0.20, 0.05)], [_rep(0, 0.10, 0.01, loaded=None)], (10, 10))
    costlier = _summary([_rep(0, 0.20, 0.05)], [_rep(0, 0.10, 0.06)], (10, 10))
    for summary, reason in ((worse, "more SLO violations"), (chatter, "16 transitions"),
                            (close, "neither violations nor KL is 10% lower"),
                            (fell_back, "3 fallbacks"), (not_loaded, "policy loaded"),
                            (costlier, "more quality cost")):
        ok, failed = verdict(figures([("w", summary)], "morph-rl"),
                             figures([("w", summary)], "morph-heuristic"))
        assert not ok and any(reason in f for f in failed), (reason, failed)


def test_command_prints_the_verdict_and_writes_json(tmp_path: Path, capsys) -> None:
    dirs = [_write(tmp_path, "a", WINDOW_A), _write(tmp_path, "b", WINDOW_B)]
    dominance.main([*dirs, "--out", str(tmp_path / "verdict.json")])
    printed = capsys.readouterr().out
    assert "dominates" in printed and "pooled" in printed
    written = json.loads((tmp_path / "verdict.json").read_text())
    assert written["dominates"] is True and set(written["windows"]) == {*dirs, "pooled"}
    assert written["reductions"]["violations"] == pytest.approx(1 - 0.1 / 0.16)


def test_command_refuses_what_it_cannot_read_with_one_line(tmp_path: Path, capsys) -> None:
    no_rl = _summary([_rep(0, 0.2, 0.05)], [], (1, 0))
    del no_rl["systems"]["morph-rl"]
    (tmp_path / "not-run").mkdir()
    (tmp_path / "not-run" / "summary.json").write_text("[1, 2]")
    cases = ((str(tmp_path / "absent"), "No such file"),
             (_write(tmp_path, "no-rl", no_rl), "has no system 'morph-rl'"),
             (str(tmp_path / "not-run"), "is not an eval.run summary"))
    for directory, needle in cases:
        with pytest.raises(SystemExit) as exit_info:
            dominance.main([directory])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1
