"""The offline layer profile on stories260K, calibrated on a short fixed text to stay fast."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from eval.quality_eval import QualityEvaluator
from sglang_morph.hf_model import SGLANG_LINEAR_GROUPS
from sglang_morph.profile import act_scales_from_profile, build_profile, main
from sglang_morph.profile_file import ProfileError, layer_order, load_profile

CALIBRATION = """Tom had a red kite. He ran in the park and the kite went up high. His sister Mia
clapped her hands. "Can I try?" she asked. Tom gave her the string and smiled.
<|endoftext|>
A little cat sat by the window. It was raining and the cat was sad. Then the sun came out and
a rainbow filled the sky. The cat jumped down and ran outside to play in the warm grass.
<|endoftext|>"""

FAST = {"token_counts": (1, 8), "latency_repeats": 2, "progress": False}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calibration.txt"
    path.write_text(CALIBRATION)
    return path


@pytest.fixture(scope="module")
def profile(calibration: Path) -> dict:
    return build_profile(None, "int4", 32, "rtn", calibration, **FAST)


def test_profile_is_deterministic_for_a_calibration_text(profile: dict, calibration: Path) -> None:
    again = build_profile(None, "int4", 32, "rtn", calibration, **FAST)
    assert again["layer_order"] == profile["layer_order"]
    assert again["greedy"] == profile["greedy"]
    assert [layer["quant_output_cosine"] for layer in again["layers"]] == [
        layer["quant_output_cosine"] for layer in profile["layers"]
    ]


def test_profile_fields(profile: dict, calibration: Path) -> None:
    layers = profile["num_layers"]
    assert layers == 5 and len(profile["layers"]) == layers
    assert sorted(layer_order(profile)) == list(range(layers))
    assert profile["calibration"]["sha256"] == hashlib.sha256(calibration.read_bytes()).hexdigest()
    assert 0 < profile["calibration"]["tokens"] < 200
    assert "act_scales" not in profile
    for entry in profile["layers"]:
        assert -1 <= entry["io_cosine"] < 1
        assert 0.9 < entry["quant_output_cosine"] < 1  # int4 perturbs, but only a little
        # stories260K layer: qkv 128x64, o 64x64, gate_up 344x64, down 64x172, float32.
        params = 128 * 64 + 64 * 64 + 344 * 64 + 64 * 172
        assert entry["bytes"]["fp"] == 4 * params
        assert entry["bytes"]["int4"] < entry["bytes"]["int8"] < entry["bytes"]["fp"] / 3
        for fmt in ("fp", "int8", "int4"):
            assert set(entry["latency_s"][fmt]) == {"1", "8"}
            assert all(t > 0 for t in entry["latency_s"][fmt].values())
    greedy = profile["greedy"]
    assert [g["step"] for g in greedy] == list(range(1, layers + 1))
    assert [g["layer"] for g in greedy] == profile["orders"]["lis"]
    # The default method builds both orders and ships the one chosen on validation text.
    assert profile["method"] == "best" and set(profile["orders"]) == {"lis", "greedy-kl"}
    assert layer_order(profile) == profile["orders"][profile["order_method"]]
    # Quantizing more layers moves the final hidden state further from full precision.
    cosines = [g["final_hidden_cosine"] for g in greedy]
    assert cosines[0] < 1 and cosines[-1] < cosines[0]


def test_greedy_kl_steps_keep_the_least_kl_candidate(profile: dict, calibration: Path) -> None:
    """Each step's recorded KLs, recomputed independently by the quality evaluator on the same
    text, and the chosen layer is the one with the least KL among the remaining candidates."""
    layers = profile["num_layers"]
    order = profile["orders"]["greedy-kl"]
    assert sorted(order) == list(range(layers))
    steps = profile["greedy_kl"]
    assert [s["layer"] for s in steps] == order and [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    evaluator = QualityEvaluator(text_path=calibration)
    for k, step in enumerate(steps):
        assert set(step["candidates"]) == {str(c) for c in range(layers) if c not in order[:k]}
        kls = {
            int(c): evaluator.evaluate({i: "int4" for i in [*order[:k], int(c)]})["kl"]
            for c in step["candidates"]
        }
        for c, kl in kls.items():
            assert step["candidates"][str(c)] == pytest.approx(kl, rel=1e-4)
        assert step["layer"] == min(kls, key=lambda c: (kls[c], c))
        assert step["final_kl"] == step["candidates"][str(step["layer"])]
    kls = [s["final_kl"] for s in steps]
    assert kls == sorted(kls) and kls[0] > 0


def test_best_keeps_the_order_better_on_validation_text(profile: dict) -> None:
    """The selection's curves are the validation part's (recomputed here), never the test
    part's, and the shipped order has the lower mean log-perplexity over k = 1..L-1."""
    selection = profile["selection"]
    validation = QualityEvaluator(part="validation")
    test = QualityEvaluator(part="test")
    every = QualityEvaluator(part="all")
    assert selection["text"]["tokens"] == validation.text.tokens
    assert validation.text.tokens + test.text.tokens == every.text.tokens
    assert len(validation.text.sequences) == 2 and len(test.text.sequences) == 3
    means = {}
    for name, order in profile["orders"].items():
        curve = selection["curves"][name]
        for k in (1, 2):
            assert curve["ppl"][k] == pytest.approx(
                validation.evaluate({i: "int4" for i in order[:k]})["ppl"], rel=1e-5
            )
        means[name] = sum(map(math.log, curve["ppl"][1:-1])) / (len(order) - 1)
        assert curve["mean_log_ppl"] == pytest.approx(means[name])
    assert profile["order_method"] == selection["chosen"] == min(means, key=means.get)


@pytest.mark.parametrize("method", ["lis", "greedy-kl"])
def test_the_method_asked_for_is_recorded_and_ships_its_order(
    method: str, calibration: Path, profile: dict
) -> None:
    one = build_profile(None, "int4", 32, "rtn", calibration, method=method, **FAST)
    assert one["method"] == one["order_method"] == method and "selection" not in one
    assert layer_order(one) == one["orders"][method]
    assert one["orders"] == profile["orders"]  # both orders are built whichever ships
    with pytest.raises(ValueError, match="unknown method 'kl'; accepted: lis, greedy-kl, best"):
        build_profile(None, "int4", 32, "rtn", calibration, method="kl", **FAST)


def test_awq_profile_carries_scales_per_sglang_linear(calibration: Path) -> None:
    profile = build_profile(None, "int4", 32, "awq", calibration, **FAST)
    scales = act_scales_from_profile(profile)
    assert set(scales) == set(range(5))
    widths = {"qkv_proj": 64, "o_proj": 64, "gate_up_proj": 64, "down_proj": 172}
    for groups in scales.values():
        assert set(groups) == set(SGLANG_LINEAR_GROUPS)
        for group, scale in groups.items():
            assert scale.shape == (widths[group],) and (scale > 0).all()
    # The AWQ input scale is stored with the quantized copy: 4 bytes per input channel.
    rtn = build_profile(None, "int4", 32, "rtn", calibration, **FAST)
    extra = 4 * sum(widths.values())
    assert profile["layers"][0]["bytes"]["int4"] == rtn["layers"][0]["bytes"]["int4"] + extra
    assert not torch.equal(scales[0]["down_proj"], torch.ones(172))


def test_cli_writes_a_loadable_profile(calibration: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    argv = ["--format", "int8", "--calibration", str(calibration), "--method", "greedy-kl"]
    main([*argv, "--out", str(out)])
    loaded = load_profile(out)
    assert loaded["format"] == "int8" and loaded["quant_method"] == "rtn"
    assert loaded["method"] == "greedy-kl" and layer_order(loaded) == loaded["orders"]["greedy-kl"]
    assert set(loaded["layers"][0]["latency_s"]["int8"]) == {"1", "8", "32", "128"}
    broken = dict(loaded, layer_order=[0, 0, 1, 2, 3])
    (tmp_path / "bad.json").write_text(json.dumps(broken))
    with pytest.raises(ProfileError, match="permutation"):
        load_profile(tmp_path / "bad.json")
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "missing.json")


@pytest.mark.slow
def test_sampled_calibration_follows_samples_and_seed() -> None:
    one = build_profile(None, "int4", 32, "rtn", samples=2, seed=3, method="lis", **FAST)
    other = build_profile(None, "int4", 32, "rtn", samples=2, seed=4, method="lis", **FAST)
    assert one["calibration"]["source"] == "sampled from the model: seed=3, 2 x 256 tokens"
    assert 2 <= one["calibration"]["tokens"] <= 2 * 256
    assert one["calibration"]["sha256"] != other["calibration"]["sha256"]


def test_unknown_method_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--method", "cosine", "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--method" in err and "greedy-kl" in err
