"""Quality of what was served: the full-precision model's verdict on the tokens a system returned.

The proxy in summary.json (``eval.metrics.weighted_quality``) scores each layer configuration
on fixed evaluation text and weights it by the tokens the configuration produced; it never
reads what was served. This scores the served tokens themselves, on a seeded sample of a
system's completed requests (``SAMPLE_SIZE``, or all when fewer):

* ``nll`` / ``ppl``: the full-precision model's teacher-forced negative log-likelihood per
  served output token (the prompt and the output before it as context), and its exponential.
  The replay decodes greedily, so full precision would serve each step's most likely token;
  tokens a quantized configuration chose differently show up as a higher NLL;
* ``kl``: the mean over served output positions of KL(full-precision next-token distribution ||
  that of the configuration that served the token), both teacher-forced on the served sequence.

Which configuration served a token is not recorded per token. The estimator is the one
``eval.metrics.token_weights`` uses for the proxy: a request's tokens are spaced evenly between
its first token and its end, and each is attributed to the latest timeline sample at or before
it (the first sample for tokens before any); without a timeline, the system's nominal
configuration (fp, static) serves every token, and with neither ``kl`` is None.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from eval.metrics import FormatKey, format_key
from eval.plan import Plan
from eval.replay import RequestRecord
from eval.run_dir import SystemRun
from sglang_morph.hf_model import token_kl

if TYPE_CHECKING:
    from eval.quality_eval import QualityEvaluator

SAMPLE_SIZE = 100


@dataclass(frozen=True)
class ServedRequest:
    """One served request: its prompt, its output and, per output token, the configuration
    estimated to have served it (None: unknown)."""

    prompt_ids: list[int]
    output_ids: list[int]
    configurations: list[FormatKey] | None


def token_configurations(
    record: RequestRecord, timeline: Sequence[dict], tokens: int
) -> list[FormatKey]:
    """The configuration of each of ``tokens`` output tokens of ``record`` (module docstring:
    the attribution of ``eval.metrics.token_weights``); ``timeline`` must not be empty."""
    times = np.array([row["t"] for row in timeline], dtype=float)
    first = (record.sent_s or 0.0) + (record.ttft_s or 0.0)
    end = record.e2e_s if record.e2e_s is not None else record.ttft_s or 0.0
    token_times = np.linspace(first, (record.sent_s or 0.0) + end, tokens)
    rows = np.clip(np.searchsorted(times, token_times, side="right") - 1, 0, None)
    return [format_key(timeline[row].get("formats") or {}) for row in rows]


def sample_served(
    runs: Sequence[SystemRun],
    prompts: Sequence[Sequence[int]],
    nominal: FormatKey | None,
    size: int = SAMPLE_SIZE,
    seed: int = 0,
) -> list[ServedRequest]:
    """A seeded sample of the completed requests with output ids over all reps (all of them
    when at most ``size``), in (rep, index) order; ``prompts[i]`` is request i's prompt."""
    pool = [
        (run, record)
        for run in sorted(runs, key=lambda r: r.rep)
        for record in sorted(run.records, key=lambda r: r.index)
        if record.ok and record.output_ids
    ]
    if len(pool) > size:
        chosen = set(random.Random(seed).sample(range(len(pool)), size))
        pool = [pair for i, pair in enumerate(pool) if i in chosen]
    served = []
    for run, record in pool:
        output = list(record.output_ids or [])
        if run.timeline:
            configurations = token_configurations(record, run.timeline, len(output))
        else:
            configurations = None if nominal is None else [nominal] * len(output)
        served.append(ServedRequest(list(prompts[record.index]), output, configurations))
    return served


@torch.no_grad()
def served_quality(evaluator: QualityEvaluator, served: Sequence[ServedRequest]) -> dict:
    """{"nll", "ppl", "kl", "sampled", "tokens"} over every output token of ``served``; ``kl``
    is None when any request's configurations are unknown, all three None with no token."""
    nll, kl, tokens = 0.0, 0.0, 0
    kl_known = all(s.configurations is not None for s in served)
    for request in served:
        if not request.prompt_ids:
            raise ValueError("a served request has an empty prompt: its first token has no context")
        start = len(request.prompt_ids) - 1  # the row predicting the first output token
        seq = torch.tensor([*request.prompt_ids, *request.output_ids])
        output = seq[start + 1 :]
        fp = evaluator.logprobs({}, seq)[start:]
        nll -= fp.gather(1, output[:, None]).sum().item()
        tokens += len(output)
        if kl_known:
            kl += _served_kl(evaluator, seq, start, fp, request.configurations or [])
    if tokens == 0:
        return {"nll": None, "ppl": None, "kl": None, "sampled": len(served), "tokens": 0}
    return {
        "nll": nll / tokens,
        "ppl": math.exp(nll / tokens),
        "kl": kl / tokens if kl_known else None,
        "sampled": len(served),
        "tokens": tokens,
    }


def _served_kl(
    evaluator: QualityEvaluator,
    seq: torch.Tensor,
    start: int,
    fp: torch.Tensor,
    configurations: list[FormatKey],
) -> float:
    """Summed KL(fp || served configuration) over the output positions, one teacher-forced pass
    per distinct quantized configuration (full precision contributes 0)."""
    total = 0.0
    for key in set(configurations) - {()}:
        mask = torch.tensor([c == key for c in configurations])
        served = evaluator.logprobs(dict(key), seq)[start:]
        total += token_kl(fp[mask], served[mask]).sum().item()
    return total


def system_served_quality(
    model_path: str,
    runs: Sequence[SystemRun],
    prompts: Sequence[Sequence[int]],
    nominal: FormatKey | None,
    group_size: int = 32,
    quant_method: str = "rtn",
    profile: dict | None = None,
) -> dict | None:
    """summary.json's ``served_quality`` of one system (None when no completed request has
    output ids, e.g. records saved before they were kept). A failure is reported in the entry
    (``error``), never raised: the run's latency results stand without it."""
    served = sample_served(runs, prompts, nominal)
    if not served:
        return None
    try:
        # Imported only when there is something to score, like summary.py's own quality import.
        from eval.quality_eval import shared_evaluator

        evaluator = shared_evaluator(model_path, group_size, quant_method, profile)
        return served_quality(evaluator, served)
    except Exception as err:  # quality is reported as missing, the latency results still stand
        return {"sampled": len(served), "error": f"{type(err).__name__}: {err}"}


def plan_served_quality(
    plan: Plan, runs: Sequence[SystemRun], nominal: FormatKey | None
) -> dict | None:
    """``system_served_quality`` with the run's model, prompts and quantization options."""
    return system_served_quality(
        plan.model_path,
        runs,
        plan.prompts,
        nominal,
        plan.args.group_size,
        plan.args.quant_method,
        plan.profile,
    )
