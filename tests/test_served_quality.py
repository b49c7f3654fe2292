"""Served quality on hand-made records (no server): the attribution of tokens to configurations,
the seeded sample, and the fp NLL / KL of served tokens against an untouched transformers model."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eval.metrics import token_weights
from eval.plan import Plan
from eval.quality_eval import QualityEvaluator, shared_evaluator
from eval.replay import RequestRecord
from eval.run_dir import SystemRun
from eval.served_quality import (
    SAMPLE_SIZE,
    ServedRequest,
    plan_served_quality,
    sample_served,
    served_quality,
    system_served_quality,
    token_configurations,
)
from sglang_morph.data import resolve_model
from sglang_morph.hf_model import load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_INT4 = tuple((i, "int4") for i in range(5))
TIMELINE = [
    {"t": 0.0, "formats": {str(i): "fp" for i in range(5)}},
    {"t": 2.0, "formats": {str(i): "int4" for i in range(5)}},
]


def record(
    index: int, tokens: int, output_ids: list[int] | None = None, **kw: object
) -> RequestRecord:
    """A completed request sent at ``index`` seconds: first token 1 s later, 2 s to finish."""
    fields = {"sent_s": float(index), "ttft_s": 1.0, "e2e_s": 3.0, "output_ids": output_ids}
    fields.update(kw)
    return RequestRecord(
        index,
        float(index),
        prompt_tokens=4,
        requested_output_tokens=tokens,
        output_tokens=tokens,
        **fields,
    )


@pytest.fixture(scope="module")
def evaluator() -> QualityEvaluator:
    return shared_evaluator(None)


@pytest.fixture(scope="module")
def fp_model() -> torch.nn.Module:
    return load_model(resolve_model(None))  # untouched transformers model


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return load_tokenizer(resolve_model(None))("Once upon a time, there was a little").input_ids


@torch.no_grad()
def greedy_output(model: torch.nn.Module, prompt: list[int], tokens: int) -> list[int]:
    """What a full-precision server decoding greedily would return."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def test_tokens_are_attributed_like_the_proxy() -> None:
    """Five tokens between 1 s and 3 s (1, 1.5, 2, 2.5, 3): the timeline turns int4 at 2 s."""
    r = record(0, 5)
    keys = token_configurations(r, TIMELINE, 5)
    assert keys == [(), (), ALL_INT4, ALL_INT4, ALL_INT4]
    counts = {key: float(keys.count(key)) for key in set(keys)}
    assert counts == token_weights([r], TIMELINE)


def test_sample_is_seeded_and_skips_what_was_not_served() -> None:
    runs = [SystemRun("s", rep, [record(i, 2, [i, rep]) for i in range(80)]) for rep in (1, 0)]
    runs[0].records += [record(80, 2, None), record(81, 2, [1, 2], error="HTTP 500")]
    prompts = [[i + 1] for i in range(82)]
    one = sample_served(runs, prompts, nominal=())
    assert len(one) == SAMPLE_SIZE and one == sample_served(runs, prompts, nominal=())
    assert one != sample_served(runs, prompts, nominal=(), seed=1)
    picked = [(s.output_ids[1], s.output_ids[0]) for s in one]
    assert picked == sorted(picked) and len(set(picked)) == SAMPLE_SIZE  # (rep, index) order
    assert all(s.prompt_ids == [s.output_ids[0] + 1] for s in one)  # each with its own prompt
    assert all(s.configurations == [(), ()] for s in one)
    few = [SystemRun("s", 0, [record(i, 2, [5, 6]) for i in range(3)])]
    assert len(sample_served(few, prompts, nominal=None)) == 3
    assert all(s.configurations is None for s in sample_served(few, prompts, nominal=None))
    timed = sample_served([SystemRun("s", 0, [record(0, 5, [7] * 5)], TIMELINE)], prompts, None)
    assert timed[0].configurations == [(), (), ALL_INT4, ALL_INT4, ALL_INT4]


@torch.no_grad()
def test_fp_served_tokens_nll_matches_transformers(
    evaluator: QualityEvaluator, fp_model: torch.nn.Module, prompt: list[int]
) -> None:
    output = greedy_output(fp_model, prompt, 12)
    served = [ServedRequest(prompt, output, [()] * len(output))]
    result = served_quality(evaluator, served)
    logits = fp_model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1 : -1]
    nll = F.cross_entropy(logits, torch.tensor(output)).item()
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert result["kl"] == 0.0 and result["sampled"] == 1 and result["tokens"] == 12
    # Tokens full precision would not have chosen cost more NLL than its own greedy choice.
    other = [(t + 1) % 512 for t in output]
    worse = served_quality(evaluator, [ServedRequest(prompt, other, None)])
    assert worse["nll"] > result["nll"] + 1 and worse["kl"] is None


@torch.no_grad()
def test_kl_counts_only_the_positions_a_configuration_served(
    evaluator: QualityEvaluator, fp_model: torch.nn.Module, prompt: list[int]
) -> None:
    output = greedy_output(fp_model, prompt, 10)
    seq = torch.tensor(prompt + output)
    start = len(prompt) - 1
    fp = F.log_softmax(fp_model(seq[None]).logits[0, :-1], dim=-1)[start:]
    q = evaluator.logprobs(dict(ALL_INT4), seq)[start:]
    per_token = (fp.exp() * (fp - q)).sum(dim=-1)
    assert (per_token > 0).all()
    half = [()] * 4 + [ALL_INT4] * 6
    result = served_quality(evaluator, [ServedRequest(prompt, output, half)])
    assert result["kl"] == pytest.approx(per_token[4:].sum().item() / 10, rel=1e-4)
    every = served_quality(evaluator, [ServedRequest(prompt, output, [ALL_INT4] * 10)])
    assert every["kl"] == pytest.approx(per_token.mean().item(), rel=1e-4)
    assert every["nll"] == result["nll"]  # NLL is the fp model's, whoever served


def test_bad_and_missing_input(evaluator: QualityEvaluator) -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        served_quality(evaluator, [ServedRequest([], [5, 6], None)])
    assert served_quality(evaluator, [])["nll"] is None
    runs = [SystemRun("fp", 0, [record(0, 2, None)])]
    assert system_served_quality(resolve_model(None), runs, [[1, 2]], nominal=()) is None
    runs = [SystemRun("fp", 0, [record(0, 2, [5, 6])])]
    entry = system_served_quality(resolve_model(None), runs, [[]], nominal=())
    assert entry == {
        "sampled": 1,
        "error": "ValueError: a served request has an empty prompt: its first token has no context",
    }


@torch.no_grad()
def test_the_summary_entry_reads_the_plan(
    evaluator: QualityEvaluator, fp_model: torch.nn.Module, prompt: list[int], tmp_path: Path
) -> None:
    """What summary.json's ``served_quality`` holds for a morphing run: the plan's prompts and
    model, each token's configuration from the timeline (int4 everywhere from 2 s)."""
    output = greedy_output(fp_model, prompt, 5)
    plan = Plan(
        trace=None,
        systems=["morph-heuristic"],
        model_path=resolve_model(None),
        num_layers=5,
        budget_bytes=0,
        budget_how="test",
        prompts=[[1, 2], prompt],
        vocab=None,
        out_dir=tmp_path,
        args=argparse.Namespace(group_size=32, quant_method="rtn"),
    )
    runs = [SystemRun("morph-heuristic", 0, [record(1, 5, output)], TIMELINE)]
    entry = plan_served_quality(plan, runs, nominal=None)
    # The request was sent at 1 s: tokens at 2, 2.5, 3, 3.5, 4 s, all after the switch to int4.
    expected = served_quality(evaluator, [ServedRequest(prompt, output, [ALL_INT4] * 5)])
    assert entry == expected and entry["kl"] > 0 and entry["sampled"] == 1
