"""Quality evaluation on the TinyStories sample: full-precision anchor, KL growth, the plot."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eval.quality import QualityEvaluator, evaluate_formats, plot_quality
from sglang_morph.data import resolve_model
from sglang_morph.hf_model import load_model
from sglang_morph.profile import build_profile


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the model is tiny, so a second thread only adds synchronisation,
    and on a loaded machine OpenMP's spin-waits make it several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def evaluator() -> QualityEvaluator:
    return QualityEvaluator()


@torch.no_grad()
def test_k0_is_full_precision(evaluator: QualityEvaluator) -> None:
    model = load_model(resolve_model(None))  # untouched transformers model
    nll, count = 0.0, 0
    for seq in evaluator.text.sequences:
        logits = model(seq[None]).logits[0, :-1]
        nll += F.cross_entropy(logits, seq[1:], reduction="sum").item()
        count += len(seq) - 1
    fp_ppl = math.exp(nll / count)
    assert abs(fp_ppl - 3.548) < 0.005  # the data README's transformers float32 figure
    result = evaluator.evaluate({})
    assert result["ppl"] == pytest.approx(fp_ppl, rel=1e-6)  # float32 summation order only
    assert abs(result["kl"]) < 1e-7
    assert len(evaluator.text.sequences) == 5 and max(map(len, evaluator.text.sequences)) <= 512


def test_kl_grows_with_quantized_layers(evaluator: QualityEvaluator) -> None:
    layers = evaluator.num_layers
    one = evaluator.evaluate({0: "int4"})
    every = evaluator.evaluate({i: "int4" for i in range(layers)})
    assert 0 < one["kl"] < every["kl"]
    assert evaluator.evaluate({})["ppl"] < one["ppl"] < every["ppl"]
    # int8 everywhere stays near full precision, far below int4 everywhere.
    int8 = evaluator.evaluate({i: "int8" for i in range(layers)})
    assert int8["kl"] < every["kl"] / 20
    # The swap is undone after each evaluation: a repeat gives the same figures.
    assert evaluator.evaluate({0: "int4"}) == one


def test_evaluate_formats_accepts_mixed_assignments() -> None:
    mixed = evaluate_formats(resolve_model(None), {0: "int8", 3: "int4", 4: "fp"})
    assert set(mixed) == {"ppl", "kl"}
    assert mixed["kl"] > 0 and 3.5 < mixed["ppl"] < 3.8
    with pytest.raises(ValueError, match="no such layer"):
        evaluate_formats(resolve_model(None), {7: "int4"})


def test_plot_is_written(tmp_path: Path) -> None:
    curve = {"ppl": [3.5, 3.6, 3.7], "kl": [0.0, 0.01, 0.02]}
    report = {
        "model": "m",
        "format": "int4",
        "group_size": 32,
        "quant_method": "rtn",
        "orders": {
            "lis": {"order": [0, 1], **curve},
            "last_to_first": {"order": [1, 0], **curve},
            "random": {"seeds": [0], **curve, "all_orders": curve},
        },
    }
    path = tmp_path / "q.png"
    plot_quality(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_awq_uses_the_profile_scales(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("Tom had a red kite. He ran in the park and the kite went up high.")
    profile = build_profile(
        None, "int4", 32, "awq", calibration, token_counts=(1,), latency_repeats=1, progress=False
    )

    def no_sampling(*args: object, **kwargs: object) -> None:
        raise AssertionError("the profile's AWQ scales should have been used")

    monkeypatch.setattr("eval.quality.sample_text", no_sampling)
    every = {i: "int4" for i in range(profile["num_layers"])}
    awq = evaluate_formats(resolve_model(None), every, quant_method="awq", profile=profile)
    rtn = evaluate_formats(resolve_model(None), every)
    assert awq["ppl"] != rtn["ppl"] and 0 < awq["kl"] < 2 * rtn["kl"]
