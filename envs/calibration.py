"""Iteration-time model of one SGLang replica, fitted to iterations measured on the engine.

The simulator is only as good as its iteration times, so they come from the real engine: the
runtime records one sample per scheduler iteration (served at ``GET /morph/iterations``) and
``python -m envs.calibrate`` fits this linear model to them. A linear model in prefill tokens,
decode requests and quantized layers is enough at this scale (the measured decode steps lie
close to a line) and keeps the simulator's inner loop to one dot product.

What is fitted is the whole scheduler-loop pass (``loop_s``: tick, scheduling, forward, sending
results, receiving requests), not the forward alone: on a small CPU the rest of the loop is a
sizeable share of it, and queueing under a burst is very sensitive to it. The time a request spends
outside the loop (HTTP, tokenizer manager, detokenizer, the client) is ``response_s``, added to
every first token.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from sglang_morph.paths import DEFAULT_CALIBRATION

SAMPLE_FIELDS = ("batch_tokens", "prefill_tokens", "decode_reqs", "quantized_layers",
                 "context_tokens", "loop_s")
COEFFICIENTS = ("base_s", "per_prefill_token_s", "per_decode_req_s", "per_quantized_layer_s",
                "per_context_token_s")


class CalibrationError(ValueError):
    """Samples or a calibration file that cannot be used, with the reason."""


@dataclass(frozen=True)
class IterationSample:
    """One measured scheduler iteration of the engine (``loop_s``: the whole loop pass)."""

    batch_tokens: int
    prefill_tokens: int
    decode_reqs: int
    quantized_layers: int
    loop_s: float
    context_tokens: int = 0
    """Sum of the batch's sequence lengths (attention reads every one of them)."""


@dataclass(frozen=True)
class IterationModel:
    """loop_s = base + a * prefill_tokens + b * decode_reqs + c * quantized_layers
    + d * context_tokens, a fixed stall of ``swap_s_per_layer`` per layer quantized or
    restored, and ``response_s`` between a first token leaving the scheduler and reaching the
    client."""

    base_s: float
    per_prefill_token_s: float
    per_decode_req_s: float
    per_quantized_layer_s: float
    swap_s_per_layer: float
    source: str
    """Where the numbers come from (measured on which engine, or estimated from what)."""
    response_s: float = 0.0
    """Unloaded TTFT minus the modelled iteration of its prefill: the request's way through
    HTTP, the tokenizer manager and the detokenizer."""
    per_context_token_s: float = 0.0
    """Attention reads the whole context, so a step of long sequences can cost more than one of
    short ones. For a tiny model with short sequences the fit may find nothing and clamp it to
    0: such attention is noise next to the rest of the step."""

    def iteration_s(
        self, prefill_tokens: int, decode_reqs: int, quantized_layers: int,
        context_tokens: int = 0,
    ) -> float:
        """Seconds of one scheduler iteration with this batch (``context_tokens``: the sum of
        its sequence lengths, new tokens included)."""
        return (
            self.base_s
            + self.per_prefill_token_s * prefill_tokens
            + self.per_decode_req_s * decode_reqs
            + self.per_quantized_layer_s * quantized_layers
            + self.per_context_token_s * context_tokens
        )


def parse_samples(raw: object) -> tuple[list[IterationSample], list[tuple[int, float]]]:
    """Iteration samples and swap timings from decoded JSON.

    Accepts a list of iteration samples, or ``{"iterations": [...], "swaps": [{"layers": n,
    "seconds": s}, ...]}``; other keys (notes) are ignored. Raises CalibrationError naming the
    first malformed entry.
    """
    if isinstance(raw, list):
        raw = {"iterations": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("iterations"), list):
        raise CalibrationError(
            "expected a JSON list of iteration samples or an object with an 'iterations' list"
        )
    samples = []
    for i, item in enumerate(raw["iterations"]):
        missing = [f for f in SAMPLE_FIELDS if not isinstance(item, dict) or f not in item]
        if missing:
            raise CalibrationError(f"iteration sample {i} lacks {', '.join(missing)}: {item!r}")
        sample = IterationSample(
            int(item["batch_tokens"]),
            int(item["prefill_tokens"]),
            int(item["decode_reqs"]),
            int(item["quantized_layers"]),
            float(item["loop_s"]),
            int(item["context_tokens"]),
        )
        if not (math.isfinite(sample.loop_s) and sample.loop_s > 0):
            raise CalibrationError(f"iteration sample {i}: loop_s must be positive: {item!r}")
        samples.append(sample)
    swaps = []
    for i, item in enumerate(raw.get("swaps", [])):
        try:
            swaps.append((int(item["layers"]), float(item["seconds"])))
        except (KeyError, TypeError, ValueError) as err:
            raise CalibrationError(
                f"swap record {i} needs 'layers' and 'seconds': {item!r}"
            ) from err
    return samples, swaps


def fit_iteration_model(
    samples: list[IterationSample],
    fallback: IterationModel,
    swaps: list[tuple[int, float]],
    source: str,
    unloaded: tuple[int, float] | None = None,
) -> tuple[IterationModel, dict]:
    """Least-absolute-deviations fit of the coefficients the samples can identify; the rest
    from fallback.

    LAD (the conditional median) rather than least squares: on a CPU shared with other jobs a
    few forwards take many times the typical time when the scheduler is descheduled, and least
    squares lets those spikes set the intercept. LAD alone models the typical iteration and
    ignores what the spikes cost in throughput (the simulator then queues too little), so the
    coefficients are then scaled by one factor (``level_scale``) that makes the model's total
    time over the samples equal the measured total: the shape from the median, the level from
    the mean.

    A coefficient is identifiable when its column varies in the samples (e.g. samples taken with
    no layer quantized say nothing about ``per_quantized_layer_s``). Coefficients are kept
    non-negative by fixing a negative one to 0 and refitting (listed as ``clamped_to_zero``).
    ``unloaded`` is (prompt tokens, median TTFT) of requests sent one at a time to the idle
    engine: what of that TTFT the fitted iteration does not explain is ``response_s`` (without
    it, the fallback's).
    Returns the model and a fit report (which coefficients were fitted, clamped or taken from
    the fallback, R^2, max relative error) for the calibration file.
    """
    if len(samples) < 2:
        raise CalibrationError(f"need at least 2 iteration samples to fit, got {len(samples)}")
    y = np.array([s.loop_s for s in samples])
    coef, free, clamped = _median_shape(_columns(samples), y, fallback)
    coef, level = _scaled_to_total(coef, samples, y)
    swap_s = sum(s for _, s in swaps) / sum(n for n, _ in swaps) if swaps else None
    model = IterationModel(
        **coef,
        swap_s_per_layer=fallback.swap_s_per_layer if swap_s is None else swap_s,
        source=source,
        response_s=fallback.response_s,
    )
    if unloaded is not None:
        model = _with_response_time(model, *unloaded)
    report = {
        "samples": len(samples),
        "fitted": ["base_s", *free],
        "clamped_to_zero": clamped,
        "from_fallback": [n for n in COEFFICIENTS if n not in ("base_s", *free, *clamped)]
        + ([] if swap_s is not None else ["swap_s_per_layer"])
        + ([] if unloaded is not None else ["response_s"]),
        "method": "least absolute deviations (IRLS), scaled to the measured total time",
        "level_scale": level,
        **_errors(model, samples, y),
    }
    return model, report


def _columns(samples: list[IterationSample]) -> dict[str, np.ndarray]:
    """The regressors of each coefficient but the intercept, one column per coefficient."""
    return {
        "per_prefill_token_s": np.array([s.prefill_tokens for s in samples], dtype=float),
        "per_decode_req_s": np.array([s.decode_reqs for s in samples], dtype=float),
        "per_quantized_layer_s": np.array([s.quantized_layers for s in samples], dtype=float),
        "per_context_token_s": np.array([s.context_tokens for s in samples], dtype=float),
    }


def _median_shape(
    columns: dict[str, np.ndarray], y: np.ndarray, fallback: IterationModel
) -> tuple[dict[str, float], list[str], list[str]]:
    """LAD coefficients of the columns that vary (the others keep the fallback's value), a
    negative one fixed at 0 and the rest refitted until none is negative. Returns every
    coefficient, the fitted names and the clamped ones."""
    coef = {name: getattr(fallback, name) for name in COEFFICIENTS}
    free = [name for name, col in columns.items() if np.ptp(col) > 0]
    clamped: list[str] = []
    while True:
        fixed = sum(coef[n] * columns[n] for n in columns if n not in free)
        design = np.column_stack([np.ones_like(y)] + [columns[n] for n in free])
        solution = _least_absolute_deviations(design, y - fixed)
        negative = [n for n, v in zip(free, solution[1:], strict=True) if v < 0]
        if not negative:
            break
        for name in negative:
            coef[name] = 0.0
        clamped += negative
        free = [n for n in free if n not in negative]
    coef["base_s"] = max(0.0, float(solution[0]))
    coef.update({n: float(v) for n, v in zip(free, solution[1:], strict=True)})
    return coef, free, clamped


def _scaled_to_total(
    coef: dict[str, float], samples: list[IterationSample], y: np.ndarray
) -> tuple[dict[str, float], float]:
    """The coefficients times the one factor that makes the model's total time over the samples
    equal the measured total (throughput, which sets queueing, is kept), and that factor."""
    shape = IterationModel(**coef, swap_s_per_layer=0.0, source="")
    modelled = sum(shape.iteration_s(s.prefill_tokens, s.decode_reqs, s.quantized_layers,
                                     s.context_tokens) for s in samples)
    level = float(y.sum() / modelled) if modelled > 0 else 1.0
    return {name: value * level for name, value in coef.items()}, level


def _with_response_time(model: IterationModel, prompt_tokens: int, ttft_s: float) -> IterationModel:
    """``model`` with ``response_s``: the part of an unloaded TTFT that the modelled iteration
    of its prefill does not explain."""
    prefill_s = model.iteration_s(prompt_tokens, 0, 0, prompt_tokens)
    return replace(model, response_s=max(0.0, ttft_s - prefill_s))


def _errors(model: IterationModel, samples: list[IterationSample], y: np.ndarray) -> dict:
    """How well ``model`` predicts the samples: R^2, median and max relative error."""
    predicted = np.array(
        [model.iteration_s(s.prefill_tokens, s.decode_reqs, s.quantized_layers, s.context_tokens)
         for s in samples]
    )
    residual = y - predicted
    total = float(np.sum((y - y.mean()) ** 2))
    return {
        "r2": 1.0 - float(np.sum(residual**2)) / total if total > 0 else 1.0,
        "median_rel_error": float(np.median(np.abs(residual) / y)),
        "max_rel_error": float(np.max(np.abs(residual) / y)),
    }


def _least_absolute_deviations(design: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin_b sum |y - design @ b| by iteratively reweighted least squares (weights
    1 / |residual|, floored at 0.1 ms so exact fits do not divide by zero)."""
    weights = np.ones_like(y)
    solution = np.zeros(design.shape[1])
    for _ in range(100):
        root = np.sqrt(weights)
        new, *_ = np.linalg.lstsq(design * root[:, None], y * root, rcond=None)
        converged = np.allclose(new, solution, rtol=1e-6, atol=1e-9)
        solution = new
        if converged:
            break
        weights = 1.0 / np.maximum(np.abs(y - design @ solution), 1e-4)
    return solution


def save_calibration(
    model: IterationModel, report: dict, path: str | Path, replica: dict | None = None
) -> None:
    """Write the model with its fit report (the file documents its own provenance) and, when
    measured, the replica it was measured on (capacity, layers, SLO: ``load_replica``)."""
    content: dict = {"model": asdict(model), "fit": report}
    if replica:
        content["replica"] = replica
    Path(path).write_text(json.dumps(content, indent=2) + "\n")


def load_replica(path: str | Path = DEFAULT_CALIBRATION) -> dict:
    """The measured replica section of a calibration file (empty if it has none)."""
    try:
        replica = json.loads(Path(path).read_text()).get("replica") or {}
    except (OSError, ValueError, AttributeError) as err:
        raise CalibrationError(f"cannot read calibration {path}: {err}") from err
    if not isinstance(replica, dict):
        raise CalibrationError(f"calibration {path}: 'replica' must be an object")
    return replica


def load_calibration(path: str | Path = DEFAULT_CALIBRATION) -> IterationModel:
    """The iteration model in a calibration file; CalibrationError if it is malformed."""
    try:
        raw = json.loads(Path(path).read_text())
        return IterationModel(**raw["model"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CalibrationError(f"cannot read calibration {path}: {err}") from err
