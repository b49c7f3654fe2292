"""Quality evaluation on the TinyStories sample: full-precision anchor, KL growth, the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eval.quality import main, plot_quality
from eval.quality_eval import QualityEvaluator, evaluate_formats
from sglang_morph.data import resolve_model
from sglang_morph.hf_model import TokenText, load_model, load_tokenizer, tokenize_stories
from sglang_morph.profile import build_profile

pytestmark = pytest.mark.usefixtures("one_thread")


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
            "greedy-kl": {"order": [1, 0], **curve},
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

    monkeypatch.setattr("eval.quality_eval.sample_text", no_sampling)
    every = {i: "int4" for i in range(profile["num_layers"])}
    awq = evaluate_formats(resolve_model(None), every, quant_method="awq", profile=profile)
    rtn = evaluate_formats(resolve_model(None), every)
    assert awq["ppl"] != rtn["ppl"] and 0 < awq["kl"] < 2 * rtn["kl"]
    # Round-to-nearest ignores a profile's AWQ scales, so one profile serves both methods.
    assert evaluate_formats(resolve_model(None), every, profile=profile) == rtn


SHORT_TEXT = """Lily saw a big red ball in the park. She ran to it and kicked it high.
<|endoftext|>
Tom had a little dog. The dog liked to run and jump. They played all day.
<|endoftext|>"""


def test_cli_report_shape(tmp_path: Path) -> None:
    """The report JSON the issue specifies, on a short text so the 2^L subsets stay fast."""
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("Tom had a red kite. He ran in the park and the kite went up high.")
    profile = build_profile(
        None, "int4", 32, "rtn", calibration, token_counts=(1,), latency_repeats=1, progress=False
    )
    (tmp_path / "p.json").write_text(json.dumps(profile))
    text = tmp_path / "text.txt"
    text.write_text(SHORT_TEXT)
    out = tmp_path / "q.json"
    profile_path = str(tmp_path / "p.json")
    argv = ["--profile", profile_path, "--text", str(text), "--seeds", "2", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    layers = profile["num_layers"]
    orders = report["orders"]
    assert set(orders) == {"lis", "greedy-kl", "last_to_first", "random"}
    assert orders["lis"]["order"] == profile["orders"]["lis"]
    assert orders["greedy-kl"]["order"] == profile["orders"]["greedy-kl"]
    assert report["profile"]["order_method"] == profile["order_method"]
    assert report["profile"]["layer_order"] == profile["layer_order"]
    assert orders["last_to_first"]["order"] == list(range(layers - 1, -1, -1))
    assert len(orders["random"]["orders"]) == 2
    for curve in (*orders.values(), orders["random"]["all_orders"]):
        assert len(curve["ppl"]) == len(curve["kl"]) == layers + 1
    assert report["text"]["sequences"] == 2 and report["format"] == "int4"
    # k = 0 and k = L are the same model in every order; in between KL is positive.
    for key in ("ppl", "kl"):
        assert len({round(c[key][0], 9) for c in orders.values()}) == 1
        assert len({round(c[key][-1], 9) for c in orders.values()}) == 1
    assert orders["lis"]["kl"][0] == pytest.approx(0, abs=1e-7)
    assert all(kl > 0 for kl in orders["lis"]["kl"][1:])
    # Each curve is its order's: the greedy-kl curve at k = 1 is its first layer alone.
    evaluator = QualityEvaluator(text_path=text)
    first = evaluator.evaluate({profile["orders"]["greedy-kl"][0]: "int4"})
    assert orders["greedy-kl"]["ppl"][1] == pytest.approx(first["ppl"])
    # The exact mean over all orders at k = 1 is the mean of the single-layer figures.
    singles = [evaluator.evaluate({i: "int4"})["kl"] for i in range(layers)]
    assert orders["random"]["all_orders"]["kl"][1] == pytest.approx(sum(singles) / layers)


def test_compare_methods_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(SHORT_TEXT)
    sampled: list[int] = []

    def short_sample(model: torch.nn.Module) -> TokenText:
        """A short calibration text in place of the 16 x 256 sampled tokens."""
        sampled.append(1)
        return tokenize_stories(text, load_tokenizer(resolve_model(None)))

    monkeypatch.setattr("eval.quality_eval.sample_text", short_sample)
    out = tmp_path / "methods.json"
    assert main(["--compare-methods", "--text", str(text), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {(r["format"], r["quant_method"], r["group_size"]): r for r in report["all_layers"]}
    # int8 once per method (per channel); int4 per method and group size.
    expected = {(f, m, None) for f in ("int8",) for m in ("rtn", "awq")}
    expected |= {("int4", m, g) for m in ("rtn", "awq") for g in (32, 64, 128)}
    assert set(rows) == expected
    assert len(sampled) == 3  # one calibration sample per AWQ evaluator, shared by formats
    fp = report["fp"]["ppl"]
    for row in rows.values():
        assert row["kl"] > 0
        assert row["ppl_change"] == pytest.approx(row["ppl"] / fp - 1)
    # Coarser int4 groups lose more; int8 loses far less than any int4.
    rtn = [rows[("int4", "rtn", g)]["kl"] for g in (32, 64, 128)]
    assert rtn[0] < rtn[2] and rows[("int8", "rtn", None)]["kl"] < min(rtn) / 10


def test_profile_without_both_orders_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A profile made before methods existed cannot show both orders."""
    profile = {"format": "int4", "num_layers": 5, "layers": [], "layer_order": [0, 4, 2, 1, 3]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps({**profile, "orders": {"lis": [0, 4, 2, 1, 3]}}))
    assert main(["--profile", str(path), "--out", str(tmp_path / "q.json")]) == 2
    err = capsys.readouterr().err
    assert "has no greedy-kl order" in err and "python -m sglang_morph.profile" in err
    assert len(err.strip().splitlines()) == 1, err


def test_the_evaluation_sample_splits_by_position() -> None:
    """Validation (the first two stories) and test (the rest) partition the sample."""
    every = QualityEvaluator().text.sequences
    validation = QualityEvaluator(part="validation").text
    test = QualityEvaluator(part="test").text
    assert "validation part" in validation.source and "test part" in test.source
    assert [s.tolist() for s in validation.sequences + test.sequences] == [
        s.tolist() for s in every
    ]
    with pytest.raises(ValueError, match="unknown text part 'train'; accepted: all, validation"):
        QualityEvaluator(part="train")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--profile", "/no/such.json"], "cannot read layer profile"),
        (["--text", "/no/such.txt"], "--text /no/such.txt: no such file"),
        (["--model-path", "/no/such-model"], "--model-path"),
        (["--format", "int3"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Options the user must change: status 2 and one line naming the option, before any model
    is loaded or profile computed."""
    argv = [*argv, "--out", str(tmp_path / "q.json")]
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own checks
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and message in err
    assert len(err.strip().splitlines()) == 1, err
