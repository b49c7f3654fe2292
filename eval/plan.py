"""What a run will do, decided and checked before the first server starts.

A plan is the command line made concrete: the shaped trace, the systems, the model, the shared
memory budget, the prompt token ids and (when given) the SLOs. Every user path in it is made
absolute first, because servers run in another working directory, where a relative path would
silently name something else (a relative RL checkpoint once left morph-rl running the
heuristic). All input errors are found here, so a typo costs seconds, not a half-finished run;
and a plan saved in the run directory is what ``--resume`` continues, so a resumed run replays
the very same requests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from eval import run_dir
from eval.metrics import Slo
from eval.replay import prompt_ids, usable_token_ids
from eval.servers import SYSTEMS
from eval.traces import (
    NAMED_TRACES,
    LengthMapping,
    Trace,
    TraceRequest,
    burstiest_window,
    load_trace,
    map_lengths,
    scale_time,
    select_window,
)
from sglang_morph.cli import UsageError
from sglang_morph.config import parse_bytes
from sglang_morph.data import DEFAULT_MODEL, resolve_model
from sglang_morph.memory import fp_kv_tokens
from sglang_morph.model_info import ModelInfo, context_length, read_model_info
from sglang_morph.paths import absolute
from sglang_morph.profile_file import ProfileError, load_profile

DEMO_WINDOW = (569.0, 589.0)
"""The demo's window of azure-code: the first 20 s of its burstiest minute, a burst that then
halves. At time scale 0.25 it is long enough for full precision to queue and for a
morphing server to quantize and restore."""
PATH_OPTIONS = ("data_dir", "rl_checkpoint", "profile", "out", "resume")
RUNTIME_OPTIONS = {"port", "resume"}
"""Options a resumed run may set anew: they do not change what is measured."""
ABSOLUTE_SLO = "absolute (--slo-ttft, --slo-tpot)"


@dataclass
class Plan:
    """Everything validated and derived from the command line before a server starts.

    ``slo`` is known from the start when both SLOs are given; otherwise the run measures it on
    the fp server and sets it here (and in the saved plan) before any replay."""

    trace: Trace
    systems: list[str]
    model_path: str
    num_layers: int
    budget_bytes: int
    budget_how: str
    prompts: list[list[int]]
    vocab: np.ndarray | None
    out_dir: Path
    args: argparse.Namespace
    profile: dict | None = None
    slo: Slo | None = None


def make_paths_absolute(args: argparse.Namespace) -> None:
    """Every path option of ``args`` as an absolute path (named traces and the embedded model's
    name stay names)."""
    for name in PATH_OPTIONS:
        if getattr(args, name, None) is not None:
            setattr(args, name, absolute(getattr(args, name)))
    if args.trace not in NAMED_TRACES:
        args.trace = absolute(args.trace)
    if args.model is not None and args.model != DEFAULT_MODEL:
        args.model = absolute(args.model)


def _parse_window(text: str) -> tuple[float, float]:
    try:
        start, end = (float(x) for x in text.split(":"))
    except ValueError:
        raise UsageError(f"--window must be START:END in seconds, got {text!r}") from None
    return start, end


def _check_options(args: argparse.Namespace) -> list[str]:
    """The systems to run, after checking every option that needs no file or trace."""
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise UsageError(f"unknown system(s) {unknown or systems}; offered: {', '.join(SYSTEMS)}")
    if len(set(systems)) != len(systems):
        raise UsageError(f"--systems lists a system twice: {args.systems}")
    if "morph-rl" in systems and not Path(args.rl_checkpoint).is_file():
        raise UsageError(
            f"morph-rl needs a policy checkpoint: {args.rl_checkpoint} does not exist "
            "(train one, or pass --rl-checkpoint PATH)"
        )
    if args.reps < 1 or args.request_timeout <= 0 or args.slo_scale <= 0:
        raise UsageError("--reps, --request-timeout and --slo-scale must be positive")
    for flag in ("slo_ttft", "slo_tpot"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive number of seconds")
    return systems


def _load_profile(args: argparse.Namespace) -> dict | None:
    if args.profile is None:
        return None
    try:
        return load_profile(args.profile)
    except ProfileError as err:
        raise UsageError(f"--profile: {err}") from err


def _shape_trace(args: argparse.Namespace) -> Trace:
    """Load, window (source seconds), speed up, then map lengths: the order reports state."""
    trace = load_trace(args.trace, args.trace_format, args.data_dir)
    if args.window:
        window = _parse_window(args.window)
    elif args.burstiest is None and args.trace == "azure-code":
        window = DEMO_WINDOW
    else:
        window = burstiest_window(trace, args.burstiest or 60.0)
    trace = select_window(trace, *window)
    if not trace.requests:
        raise UsageError(f"window {window[0]:g}:{window[1]:g} s holds no requests")
    mapping = LengthMapping(
        args.input_div,
        args.input_min,
        args.input_max,
        args.output_div,
        args.output_min,
        args.output_max,
    )
    return map_lengths(scale_time(trace, args.time_scale), mapping)


def _model(args: argparse.Namespace) -> tuple[str, ModelInfo, int | None]:
    """(absolute model path, its sizes as SGLang holds them, its context length)."""
    try:
        model_path = absolute(resolve_model(args.model, args.data_dir))
        return model_path, read_model_info(model_path), context_length(model_path)
    except (OSError, KeyError, ValueError) as err:
        raise UsageError(f"model: {err}") from err


def _budget(args: argparse.Namespace, info: ModelInfo, longest: int) -> tuple[int, str]:
    """The shared memory budget in bytes and how it was chosen; it must hold the longest
    request in fp, or fp would fail requests rather than queue them."""
    if args.budget is None:
        if args.fp_kv_tokens <= 0:
            raise UsageError("--fp-kv-tokens must be positive")
        budget = info.budget_bytes(args.fp_kv_tokens)
        how = (
            f"fp weights {info.weight_bytes} B + {args.fp_kv_tokens} KV tokens x "
            f"{info.kv_bytes_per_token} B"
        )
    else:
        try:
            budget = parse_bytes(args.budget)
        except ValueError as err:
            raise UsageError(f"--budget: {err}") from err
        how = f"--budget {args.budget}"
    fp_tokens = fp_kv_tokens(info, budget)
    if fp_tokens < longest:
        raise UsageError(
            f"budget {budget} B leaves fp {max(fp_tokens, 0)} KV tokens, less than the longest "
            f"request ({longest} tokens): raise --budget or --fp-kv-tokens"
        )
    return budget, how


def _given_slo(args: argparse.Namespace) -> Slo | None:
    if args.slo_ttft is not None and args.slo_tpot is not None:
        return Slo(args.slo_ttft, args.slo_tpot, ABSOLUTE_SLO)
    return None


def _prompts(vocab: np.ndarray, trace: Trace, seed: int) -> list[list[int]]:
    """The prompt token ids of every request: seeded per request, so every system (and a
    resumed run) sends the same ones."""
    return [prompt_ids(vocab, r.input_tokens, i, seed) for i, r in enumerate(trace.requests)]


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate the arguments and shape the trace; raises UsageError or TraceError."""
    make_paths_absolute(args)
    systems = _check_options(args)
    profile = _load_profile(args)
    trace = _shape_trace(args)
    model_path, info, context = _model(args)
    longest = max(r.input_tokens + r.output_tokens for r in trace.requests)
    if context is not None and longest > context:
        raise UsageError(
            f"the length mapping makes requests of up to {longest} tokens, more than the "
            f"model's {context}-token context; lower --input-max/--output-max"
        )
    budget, how = _budget(args, info, longest)
    args.out = args.out or absolute(f"runs/{trace.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir = Path(args.out)
    if (out_dir / run_dir.PLAN_FILE).exists():
        raise UsageError(
            f"--out {out_dir} already holds a run: continue it with --resume {out_dir}, "
            "or choose another --out"
        )
    vocab = usable_token_ids(model_path)
    prompts = _prompts(vocab, trace, args.seed)
    return Plan(trace, systems, model_path, info.num_layers, budget, how, prompts, vocab,
                out_dir, args, profile, _given_slo(args))  # fmt: skip


def _prompts_sha256(prompts: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


def plan_json(plan: Plan) -> dict:
    """What ``--resume`` needs to continue the run: the options, the shaped requests (not the
    trace file, which may change), the model, budget and SLOs, and the prompts' checksum."""
    options = {k: v for k, v in vars(plan.args).items() if k not in RUNTIME_OPTIONS}
    trace, slo = plan.trace, plan.slo
    return {
        "options": options,
        "trace": {
            "name": trace.name,
            "meta": trace.meta,
            "requests": [[r.arrival_s, r.input_tokens, r.output_tokens] for r in trace.requests],
        },
        "model_path": plan.model_path,
        "num_layers": plan.num_layers,
        "budget": {"bytes": plan.budget_bytes, "how": plan.budget_how},
        "prompts_sha256": _prompts_sha256(plan.prompts),
        "slo": None if slo is None else asdict(slo),
    }


def _conflicts(args: argparse.Namespace, given: set[str], options: dict) -> list[str]:
    """The options given on the command line that differ from the saved plan's."""
    out = []
    for name in sorted(given - RUNTIME_OPTIONS):
        value = json.loads(json.dumps(getattr(args, name)))
        if value != options.get(name):
            flag = f"--{name.replace('_', '-')}"
            out.append(f"{flag} {getattr(args, name)!r} (saved: {options.get(name)!r})")
    return out


def _saved_trace(saved: dict) -> Trace:
    requests = tuple(TraceRequest(float(a), int(i), int(o)) for a, i, o in saved["requests"])
    return Trace(saved["name"], requests, saved["meta"])


def resume_plan(args: argparse.Namespace, given: set[str]) -> Plan:
    """The plan saved in ``args.resume``, checked again where the world may have changed (the
    RL checkpoint and profile still exist, the model still gives the same prompts).

    ``given`` names the options typed on the command line: any that differs from the saved plan
    is a UsageError, since a resumed run must measure what the interrupted one did."""
    make_paths_absolute(args)
    out_dir = Path(args.resume)
    try:
        saved = run_dir.read_plan(out_dir)
    except (OSError, ValueError) as err:
        raise UsageError(f"--resume: {err}") from err
    conflicts = _conflicts(args, given, saved["options"])
    if conflicts:
        raise UsageError(
            f"--resume {out_dir}: {'; '.join(conflicts)}; a resumed run keeps its saved plan, "
            "so drop these options"
        )
    runtime = {name: getattr(args, name) for name in RUNTIME_OPTIONS}
    merged = argparse.Namespace(**saved["options"], **runtime)
    systems = _check_options(merged)
    profile = _load_profile(merged)
    trace = _saved_trace(saved["trace"])
    model_path = saved["model_path"]
    try:
        vocab = usable_token_ids(model_path)
    except OSError as err:
        raise UsageError(f"--resume {out_dir}: the saved model {model_path}: {err}") from err
    prompts = _prompts(vocab, trace, merged.seed)
    if _prompts_sha256(prompts) != saved["prompts_sha256"]:
        raise UsageError(f"--resume {out_dir}: the model {model_path} now gives other prompts")
    slo = None if saved["slo"] is None else Slo(**saved["slo"])
    return Plan(trace, systems, model_path, saved["num_layers"], saved["budget"]["bytes"],
                saved["budget"]["how"], prompts, vocab, out_dir, merged, profile, slo)  # fmt: skip
