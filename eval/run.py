"""``python -m eval.run``: replay one trace against several systems and report SLOs and quality.

Every system (fp, static-int8, static-int4, static-k, morph-heuristic, morph-rl) is served in
turn with the same model, memory budget and layer order (the shipped LIS profile by default),
and receives the same requests (same arrival times, same prompt token ids), judged by the fixed
SLOs of eval/slos.json unless told otherwise. All input is checked before the first server
starts. With no arguments it runs a short demo (the first 20 s of azure-code's burstiest minute
at time scale 0.25: fp, static-int4, morph-heuristic). ``--resume DIR`` continues an
interrupted run; ``python -m eval.sweep`` runs it over loads, SLOs, budgets and windows.

Exit status: 0; 1 when a system-rep failed (its server did not start, or the RL policy fell
back to the heuristic) or the SLOs could not be measured; 2, with one line, for input the user
must change; 130 when interrupted (Ctrl-C or SIGTERM), after writing what finished.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from rich.console import Console
from rich.markup import escape

from eval.execute import execute
from eval.plan import (
    DEMO_WINDOW,
    SHIPPED_PROFILE,
    SLO_MODES,
    WINDOW_FORMS,
    Plan,
    make_plan,
    resume_plan,
)
from eval.servers import DEFAULT_RL_CHECKPOINT, SYSTEMS
from eval.traces import LengthMapping, TraceError
from sglang_morph.cli import UsageError
from sglang_morph.config import GROUP_SIZES, QUANT_METHODS, UNLOADED_SLO_MULTIPLE
from sglang_morph.memory import DEFAULT_FP_KV_TOKENS

PROG = "python -m eval.run"
DEMO_SYSTEMS = "fp,static-int4,morph-heuristic"

console = Console(stderr=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, exit 2: the option at fault is all the user needs."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_trace_options(p: argparse.ArgumentParser) -> None:
    """Which requests: the trace, its window, speed-up and length mapping."""
    p.add_argument(
        "--trace",
        default="azure-code",
        help="azure-code, azure-conv, mooncake (shared prefixes), or a file: "
        "Azure 2023 CSV, BurstGPT CSV, Mooncake JSONL (default: azure-code)",
    )
    p.add_argument(
        "--trace-format",
        choices=("azure", "burstgpt", "mooncake"),
        default=None,
        help="format of a trace file (default: detected)",
    )
    p.add_argument("--data-dir", default=None, help="directory holding the shared data")
    win = p.add_mutually_exclusive_group()
    win.add_argument(
        "--window",
        default=None,
        metavar="SPEC",
        help=f"the window of the source trace to replay: {WINDOW_FORMS}; one "
        "window here (random:1:LEN:SEED), several with python -m eval.sweep",
    )
    win.add_argument(
        "--burstiest",
        type=float,
        default=None,
        metavar="LENGTH_S",
        help="replay the LENGTH_S-second window with the most arrivals (default "
        "when no --window: 60; for azure-code with neither option the demo window "
        f"{DEMO_WINDOW[0]:g}:{DEMO_WINDOW[1]:g})",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=0.25,
        help="speed-up: arrival times are divided by it (default: 0.25, a load at "
        "which stories260K on a 2-core CPU queues in full precision)",
    )
    d = LengthMapping()
    for side in ("input", "output"):
        p.add_argument(
            f"--{side}-div",
            type=float,
            default=getattr(d, f"{side}_div"),
            help=f"{side} tokens = clip(round(trace {side} / DIV), MIN, MAX)",
        )
        p.add_argument(f"--{side}-min", type=int, default=getattr(d, f"{side}_min"))
        p.add_argument(f"--{side}-max", type=int, default=getattr(d, f"{side}_max"))
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt token ids")


def _add_system_options(p: argparse.ArgumentParser) -> None:
    """What serves them: the systems, model, shared budget and quantization."""
    p.add_argument(
        "--systems",
        default=DEMO_SYSTEMS,
        help=f"comma-separated, from: {', '.join(SYSTEMS)}, static-k:K (the first K "
        "layers of the profile order in int4; static-k alone searches the smallest K "
        f"reaching morph-heuristic's violations) (default: {DEMO_SYSTEMS})",
    )
    p.add_argument("--model", default=None, help="HF model directory (default: stories260K)")
    p.add_argument(
        "--budget",
        default=None,
        help="memory budget for weights + KV, e.g. 2000000 or 2MB, the same for "
        "all systems (default: weights + --fp-kv-tokens KV tokens)",
    )
    p.add_argument(
        "--fp-kv-tokens",
        type=int,
        default=DEFAULT_FP_KV_TOKENS,
        help=f"KV tokens the default budget gives the fp model (default: {DEFAULT_FP_KV_TOKENS})",
    )
    p.add_argument(
        "--rl-checkpoint",
        default=DEFAULT_RL_CHECKPOINT,
        help=f"policy for morph-rl (default: {DEFAULT_RL_CHECKPOINT})",
    )
    p.add_argument(
        "--quant-method",
        choices=QUANT_METHODS,
        default="rtn",
        help="quantization of the quantized layers, for servers and quality (default: rtn)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        choices=GROUP_SIZES,
        default=32,
        help="quantization group size, for servers and quality (default: 32)",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="lis|last_to_first|random[:SEED]|P.json",
        help="layer order of every server and of quality: the shipped LIS profile "
        f"({SHIPPED_PROFILE}, default), last_to_first, a seeded random order, or a "
        "profile file",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra launcher argument for every server (repeat; use --server-arg=--x)",
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """How it is judged and run: SLOs, reps, output directory, port, timeouts."""
    p.add_argument("--slo-ttft", type=float, default=None, help="TTFT SLO in seconds")
    p.add_argument("--slo-tpot", type=float, default=None, help="TPOT SLO in seconds")
    p.add_argument(
        "--slo",
        default="fixed",
        choices=SLO_MODES,
        help="SLOs not given: fixed = eval/slos.json's entry for the model and this "
        "machine kind (measured when it has none); measure = a multiple of the fp "
        "server's unloaded median TTFT/TPOT, measured in the same run (default: fixed)",
    )
    p.add_argument(
        "--slo-scale",
        type=float,
        default=None,
        help="multiple of the fixed SLOs (default: 1) or of the measured unloaded "
        f"medians (default: {UNLOADED_SLO_MULTIPLE:g})",
    )
    p.add_argument("--reps", type=int, default=1, help="repetitions of every system")
    p.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        help="seconds before a request counts as failed (default: 120)",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument(
        "--out", default=None, help="output directory (default: runs/<trace>-<date>-<time>)"
    )
    out.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the interrupted run in DIR: its saved plan, only the "
        "system-reps not finished yet (other options must match the plan)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help="port of every server (default: a free port per server)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The CLI; its defaults are the demo that ``python -m eval.run`` runs."""
    p = _Parser(prog=PROG, description="Replay a trace open-loop against each system (same "
                "model, budget and requests) and write summary.json, report.md, figures and "
                "per-request records.")  # fmt: skip
    _add_trace_options(p)
    _add_system_options(p)
    _add_run_options(p)
    return p


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The options typed on the command line, whatever their value (a typed default counts):
    parsing into a namespace that already holds every option keeps argparse from filling in
    defaults, so only typed options change from None."""
    unset = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), None))
    typed = parser.parse_args(argv, namespace=unset)
    return {name for name, value in vars(typed).items() if value is not None}


def _describe(plan: Plan) -> None:
    trace = plan.trace
    window = trace.meta["window"]
    console.print(
        f"{trace.name}: {len(trace.requests)} requests over {trace.duration_s:.1f} s "
        f"(window {window[0]:.1f}-{window[1]:.1f} s of the source, "
        f"time scale {trace.meta['time_scale']:g}x); systems {', '.join(plan.systems)}; "
        f"budget {plan.budget_bytes} B ({plan.budget_how}); layer order {plan.profile_name}; "
        f"results in {plan.out_dir}"
    )
    if plan.slo is not None:
        console.print(f"SLO: TTFT {1000 * plan.slo.ttft_s:.1f} ms, TPOT "
                      f"{1000 * plan.slo.tpot_s:.2f} ms ({escape(plan.slo.how)})")  # fmt: skip
    for note in plan.notes:
        console.print(f"[yellow]{escape(note)}[/]")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, plan (exit 2 with a one-line error on bad input), then run.

    SIGTERM is handled like Ctrl-C, so a harness killed by a job runner still stops its server
    and writes what it has.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.resume is not None:
            plan = resume_plan(args, given_options(parser, argv))
        else:
            plan = make_plan(args)
    except (UsageError, TraceError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    _describe(plan)
    signal.signal(signal.SIGTERM, _interrupt)
    return execute(plan)


if __name__ == "__main__":
    sys.exit(main())
