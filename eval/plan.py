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
import bisect
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from eval import run_dir
from eval.metrics import Slo
from eval.prompts import trace_prompts
from eval.replay import usable_token_ids
from eval.servers import SYSTEMS, static_k
from eval.traces import (
    NAMED_TRACES,
    LengthMapping,
    Trace,
    burstiest_window,
    load_trace,
    map_lengths,
    request_from_row,
    request_row,
    scale_time,
    select_window,
)
from sglang_morph.cli import UsageError
from sglang_morph.config import parse_bytes
from sglang_morph.data import DEFAULT_MODEL, resolve_model
from sglang_morph.memory import fp_kv_tokens
from sglang_morph.model_info import ModelInfo, context_length, read_model_info, serving_device
from sglang_morph.paths import REPO_ROOT, absolute, default_profile, repo_relative
from sglang_morph.profile_file import LAST_TO_FIRST, ProfileError, load_profile

DEMO_WINDOW = (569.0, 589.0)
"""The demo's window of azure-code: the first 20 s of its burstiest minute, a burst that then
halves. At time scale 0.25 it is long enough for full precision to queue and for a
morphing server to quantize and restore."""
PATH_OPTIONS = ("data_dir", "rl_checkpoint", "profile", "out", "resume")
RUNTIME_OPTIONS = {"port", "resume"}
"""Options a resumed run may set anew: they do not change what is measured."""
ABSOLUTE_SLO = "absolute (--slo-ttft, --slo-tpot)"
SLO_FILE = REPO_ROOT / "eval" / "slos.json"
"""Fixed SLOs per model and machine kind: a run is judged by the same targets whatever the
machine's load at the moment, which a per-run unloaded probe is not."""
SLO_MODES = ("fixed", "measure")
PROFILE_FILE = "profile.json"
"""A derived profile (last_to_first, random) kept in the run directory for its servers."""
SHIPPED_PROFILE = "lis"


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
    profile_path: str | None = None
    """What every server gets as ``--morph-profile`` (None: ``last_to_first``)."""
    profile_name: str = LAST_TO_FIRST
    slo_measured: bool = False
    """The SLOs are (or were) measured on the fp server, so fp runs first in every rep."""
    static_k: int | None = None
    """The K of ``static-k`` once found (by the search of its first rep, or a resumed plan)."""
    notes: list[str] = field(default_factory=list)


def make_paths_absolute(args: argparse.Namespace) -> None:
    """Every path option of ``args`` as an absolute path (named traces and the embedded model's
    name stay names)."""
    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if value is not None and not (name == "profile" and _is_profile_keyword(value)):
            setattr(args, name, absolute(value))
    if args.trace not in NAMED_TRACES:
        args.trace = absolute(args.trace)
    if args.model is not None and args.model != DEFAULT_MODEL:
        args.model = absolute(args.model)


WINDOW_FORMS = "START:END, random:N:LEN[:SEED] or segments:LEN (seconds of the source trace)"


def _numbers(text: str, parts: list[str], kinds: tuple[type, ...]) -> list:
    try:
        values = [kind(x) for kind, x in zip(kinds, parts, strict=False)]
    except ValueError:
        values = []
    if len(values) != len(parts) or any(v <= 0 for v in values[:2]):
        raise UsageError(f"--window {text!r}: expected {WINDOW_FORMS}")
    return values


def _fits(text: str, length: float, duration_s: float) -> None:
    if length > duration_s:
        raise UsageError(f"--window {text}: LEN {length:g} s exceeds the trace's {duration_s:g} s")


def parse_windows(
    text: str, duration_s: float, arrivals: Sequence[float] = ()
) -> tuple[list[tuple[float, float]], str]:
    """The windows a ``--window`` spec names in a trace spanning ``duration_s`` seconds, and
    how they were chosen (for the report).

    ``random:N:LEN[:SEED]`` draws N window starts uniformly (seeded, default 0) so a result is
    not an artefact of one hand-picked burst; draws holding none of ``arrivals`` (when given)
    are drawn again, since an empty window measures nothing. ``segments:LEN`` cuts the whole
    trace into consecutive LEN-second windows (a last partial one is dropped), so every part
    of the day is judged."""
    kind, _, rest = text.partition(":")
    parts = rest.split(":")
    if kind == "random" and len(parts) in (2, 3):
        n, length, *seed = _numbers(text, parts, (int, float, int))
        _fits(text, length, duration_s)
        seed = seed[0] if seed else 0
        starts = _random_starts(n, length, duration_s, sorted(arrivals), seed)
        held = " holding requests" if len(arrivals) else ""
        how = f"{n} random window{'s' if n > 1 else ''} of {length:g} s{held} (seed {seed})"
        return [(s, s + length) for s in starts], how
    if kind == "segments" and len(parts) == 1:
        (length,) = _numbers(text, parts, (float,))
        _fits(text, length, duration_s)
        segments = [(i * length, (i + 1) * length) for i in range(int(duration_s // length))]
        how = f"{len(segments)} consecutive {length:g}-s segments of the whole trace"
        if len(arrivals):
            ordered = sorted(arrivals)
            held = [w for w in segments if _holds(ordered, *w)]
            how += f", {len(segments) - len(held)} without requests left out"
            segments = held
        return segments, how
    try:
        start, end = (float(x) for x in text.split(":"))
    except ValueError:
        raise UsageError(f"--window must be {WINDOW_FORMS}; got {text!r}") from None
    return [(start, end)], f"--window {text}"


def _holds(arrivals: list[float], start: float, end: float) -> bool:
    return bisect.bisect_left(arrivals, end) > bisect.bisect_left(arrivals, start)


def _random_starts(
    n: int, length: float, duration_s: float, arrivals: list[float], seed: int
) -> list[float]:
    rng = np.random.default_rng(seed)
    starts: list[float] = []
    for _ in range(1000 * n):
        start = round(float(rng.uniform(0, duration_s - length)), 3)
        if not arrivals or _holds(arrivals, start, start + length):
            starts.append(start)
        if len(starts) == n:
            return sorted(starts)
    raise UsageError(f"--window random:{n}:{length:g}: too few windows hold any request")


def choose_window(args: argparse.Namespace, trace: Trace) -> tuple[tuple[float, float], str]:
    """The one window this run replays and how it was chosen; a spec naming several windows is
    a UsageError pointing at ``eval.sweep --windows``, which replays each."""
    if args.window:
        arrivals = [r.arrival_s for r in trace.requests]
        windows, how = parse_windows(args.window, trace.duration_s, arrivals)
        if len(windows) != 1:
            raise UsageError(
                f"--window {args.window} names {len(windows)} windows; eval.run replays one: "
                f"use python -m eval.sweep --windows {args.window}"
            )
        return windows[0], how
    if args.burstiest is None and args.trace == "azure-code":
        return DEMO_WINDOW, "the demo window: the first 20 s of the burstiest minute"
    length = args.burstiest or 60.0
    return burstiest_window(trace, length), f"the burstiest {length:g}-s window (most arrivals)"


def _check_options(args: argparse.Namespace) -> list[str]:
    """The systems to run, after checking every option that needs no file or trace."""
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if not _known_system(s)]
    if unknown or not systems:
        raise UsageError(
            f"unknown system(s) {unknown or systems}; offered: {', '.join(SYSTEMS)} "
            "(static-k:K for a fixed K)"
        )
    if len(set(systems)) != len(systems):
        raise UsageError(f"--systems lists a system twice: {args.systems}")
    if "static-k" in systems and "morph-heuristic" not in systems:
        raise UsageError(
            "static-k without K searches the smallest K reaching morph-heuristic's violations: "
            "add morph-heuristic to --systems, or give static-k:K"
        )
    if "morph-rl" in systems and not Path(args.rl_checkpoint).is_file():
        raise UsageError(
            f"morph-rl needs a policy checkpoint: {args.rl_checkpoint} does not exist "
            "(train one, or pass --rl-checkpoint PATH)"
        )
    if args.reps < 1 or args.request_timeout <= 0 or (args.slo_scale or 1.0) <= 0:
        raise UsageError("--reps, --request-timeout and --slo-scale must be positive")
    if args.slo not in SLO_MODES:
        raise UsageError(f"--slo {args.slo!r}: accepted: {', '.join(SLO_MODES)}")
    for flag in ("slo_ttft", "slo_tpot"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive number of seconds")
    return systems


def _known_system(system: str) -> bool:
    try:
        k = static_k(system)
    except ValueError:
        return False
    return system in SYSTEMS or k is not None


def _is_profile_keyword(value: str) -> bool:
    return value in (SHIPPED_PROFILE, LAST_TO_FIRST) or value.split(":")[0] == "random"


def _read_profile(path: str | Path) -> dict:
    try:
        return load_profile(path)
    except ProfileError as err:
        raise UsageError(f"--profile: {err}") from err


@dataclass
class ProfileChoice:
    """The layer order every server and the quality evaluation use, and what it is."""

    profile: dict | None
    path: str | None
    name: str
    note: str | None = None


def _random_order(spec: str, num_layers: int) -> tuple[list[int], int]:
    _, _, seed_text = spec.partition(":")
    try:
        seed = int(seed_text) if seed_text else 0
    except ValueError:
        raise UsageError(f"--profile {spec!r}: expected random or random:SEED") from None
    order = np.random.default_rng(seed).permutation(num_layers)
    return [int(i) for i in order], seed


def resolve_profile(args: argparse.Namespace, num_layers: int, out_dir: Path) -> ProfileChoice:
    """``--profile``: the shipped LIS profile of the embedded model by default (quantizing the
    least important layers first is what MorphServe's ranking is for), ``last_to_first``,
    ``random[:SEED]``, or a profile file. A derived order is a copy of the shipped profile
    (its AWQ scales kept) with another ``layer_order``, kept in the run directory for the
    servers; a model with no shipped profile quantizes last to first, with a note."""
    spec = args.profile or SHIPPED_PROFILE
    if not _is_profile_keyword(spec):
        return ProfileChoice(_read_profile(spec), spec, f"file {spec}")
    base = None
    if args.model in (None, DEFAULT_MODEL):
        shipped = default_profile("int4", args.quant_method)
        base = _read_profile(shipped)
        if spec == SHIPPED_PROFILE:
            return ProfileChoice(base, str(shipped), f"lis (shipped {repo_relative(shipped)})")
    note = None
    if spec == SHIPPED_PROFILE:
        note = f"no shipped profile for model {args.model}: layers are quantized last to first"
        spec = LAST_TO_FIRST
    if spec == LAST_TO_FIRST:
        order, name = list(range(num_layers - 1, -1, -1)), LAST_TO_FIRST
    else:
        order, seed = _random_order(spec, num_layers)
        name = f"random (seed {seed}): {order}"
    if base is None and spec == LAST_TO_FIRST:
        return ProfileChoice(None, None, name, note)  # the servers' own default order
    derived = dict(base) if base is not None else {
        "format": "int4", "quant_method": args.quant_method, "group_size": args.group_size,
        "num_layers": num_layers, "layers": [],
    }  # fmt: skip
    derived["layer_order"] = order
    return ProfileChoice(derived, str(out_dir / PROFILE_FILE), name, note)


def layer_order(plan: Plan) -> list[int]:
    """The order in which the plan's servers quantize layers."""
    if plan.profile is not None:
        return [int(i) for i in plan.profile["layer_order"]]
    return list(range(plan.num_layers - 1, -1, -1))


def machine_kind() -> str:
    """The machine kind fixed SLOs are stored under: the serving device and the cores this
    process may use (``cpu-2core``)."""
    return f"{serving_device()}-{len(os.sched_getaffinity(0))}core"


def fixed_slo_entry(model: str, machine: str, path: Path = SLO_FILE) -> dict | None:
    """The stored SLOs of ``model`` on ``machine`` (None when the file has no such entry)."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"fixed SLOs: cannot read {path}: {err}") from err
    return (table.get(model) or {}).get(machine)


def resolve_slo(args: argparse.Namespace, model: str) -> tuple[Slo | None, bool, str | None]:
    """(SLOs known before any server, whether they are measured on fp instead, a note).

    Both ``--slo-ttft`` and ``--slo-tpot`` win; ``--slo fixed`` (default) takes the entry of
    this model and machine kind in eval/slos.json times ``--slo-scale`` (default 1), an SLO
    given on the command line replacing its part; a missing entry, or ``--slo measure``,
    leaves them to be measured on the unloaded fp server."""
    if args.slo_ttft is not None and args.slo_tpot is not None:
        return Slo(args.slo_ttft, args.slo_tpot, ABSOLUTE_SLO), False, None
    if args.slo == "measure":
        return None, True, None
    machine = machine_kind()
    entry = fixed_slo_entry(model, machine)
    if entry is None:
        note = (f"no fixed SLOs for {model} on {machine} in {repo_relative(SLO_FILE)}: "
                "measured on the unloaded fp server instead")  # fmt: skip
        return None, True, note
    scale = args.slo_scale or 1.0
    how = f"fixed: {repo_relative(SLO_FILE)} entry {model}/{machine} x {scale:g} ({entry['how']})"
    if args.slo_ttft is not None or args.slo_tpot is not None:
        how += "; the other SLO given on the command line"
    ttft = args.slo_ttft or scale * float(entry["ttft_s"])
    return Slo(ttft, args.slo_tpot or scale * float(entry["tpot_s"]), how), False, None


def _shape_trace(args: argparse.Namespace) -> Trace:
    """Load, window (source seconds), speed up, then map lengths: the order reports state."""
    trace = load_trace(args.trace, args.trace_format, args.data_dir)
    window, how = choose_window(args, trace)
    trace = select_window(trace, *window)
    trace.meta["window_how"] = how
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


def _prompts(vocab: np.ndarray, trace: Trace, seed: int) -> list[list[int]]:
    """The prompt token ids of every request: seeded per request (and per hash-id block where
    the trace shares prefixes), so every system (and a resumed run) sends the same ones."""
    return trace_prompts(vocab, trace, seed)


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate the arguments and shape the trace; raises UsageError or TraceError."""
    make_paths_absolute(args)
    systems = _check_options(args)
    trace = _shape_trace(args)
    model_path, info, context = _model(args)
    _check_k(systems, info.num_layers)
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
    choice = resolve_profile(args, info.num_layers, out_dir)
    model_name = DEFAULT_MODEL if args.model in (None, DEFAULT_MODEL) else Path(model_path).name
    slo, measured, slo_note = resolve_slo(args, model_name)
    vocab = usable_token_ids(model_path)
    prompts = _prompts(vocab, trace, args.seed)
    notes = [n for n in (choice.note, slo_note) if n]
    return Plan(trace, systems, model_path, info.num_layers, budget, how, prompts, vocab,
                out_dir, args, choice.profile, slo, choice.path, choice.name, measured,
                notes=notes)  # fmt: skip


def _check_k(systems: list[str], num_layers: int) -> None:
    for system in systems:
        k = static_k(system)
        if k is not None and k > num_layers:
            raise UsageError(f"{system}: K must be 0..{num_layers} (the model's layers)")


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
            "requests": [request_row(r) for r in trace.requests],
        },
        "model_path": plan.model_path,
        "num_layers": plan.num_layers,
        "budget": {"bytes": plan.budget_bytes, "how": plan.budget_how},
        "prompts_sha256": _prompts_sha256(plan.prompts),
        "slo": None if slo is None else asdict(slo),
        "slo_measured": plan.slo_measured,
        "profile": plan.profile_name,
        "static_k": plan.static_k,
        "notes": plan.notes,
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
    requests = tuple(request_from_row(row) for row in saved["requests"])
    return Trace(saved["name"], requests, saved["meta"])


def _before_fixed_slos(saved: dict) -> dict:
    """Options a plan saved before fixed SLOs and shipped-profile defaults lacks, set to what
    that run did: SLOs measured, layers quantized last to first."""
    if "profile" in saved:
        return {}
    return {"slo": "measure", "profile": saved["options"].get("profile") or LAST_TO_FIRST}


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
    options = {**saved["options"], **_before_fixed_slos(saved), **runtime}
    merged = argparse.Namespace(**options)
    systems = _check_options(merged)
    choice = resolve_profile(merged, saved["num_layers"], out_dir)
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
                saved["budget"]["how"], prompts, vocab, out_dir, merged, choice.profile, slo,
                choice.path, choice.name, saved.get("slo_measured", slo is None),
                saved.get("static_k"), list(saved.get("notes", [])))  # fmt: skip
