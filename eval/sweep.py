"""``python -m eval.sweep``: the same systems over lists of loads, SLO multiples, budgets and
windows, each point one ``python -m eval.run`` in its own run directory.

One point of a noisy 2-core machine says little about where morphing pays: a sweep shows the
whole load curve (violations and P95 TTFT against the offered load) and how the verdict moves
with the SLO. Each point is a subprocess of ``eval.run`` (commands never import commands), so
every point gets eval.run's checks, outputs and ``--resume``: a sweep run again with the same
``--out`` resumes its unfinished points and reuses the finished ones. Options the sweep does
not know go to every ``eval.run`` unchanged.

Exit status: 0; 1 when a point failed; 2, with one line, for input the user must change (also
when the first point's ``eval.run`` refuses its options); 130 when interrupted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from eval.plan import WINDOW_FORMS, parse_windows
from eval.report import plot_sweep
from eval.run_dir import PLAN_FILE, write_json_atomic
from eval.traces import TraceError, load_trace
from sglang_morph.cli import UsageError, exit_with
from sglang_morph.config import parse_bytes
from sglang_morph.paths import absolute

PROG = "python -m eval.sweep"
SWEPT = ("--time-scale", "--slo-scale", "--budget", "--window", "--burstiest", "--out", "--resume")
"""eval.run options the sweep sets per point, so they may not be forwarded."""
DROPPED = ("per_rep",)
"""Per-system summary fields left out of sweep.json (each point's summary.json has them)."""

console = Console(stderr=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, exit 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The sweep's own options; anything else is forwarded to every eval.run."""
    p = _Parser(
        prog=PROG,
        allow_abbrev=False,  # --time-scale (eval.run's) must not pass for --time-scales
        description="Run eval.run over time scales x SLO scales x budgets x "
        "windows; write sweep.json and figures. Unknown options go to every eval.run.",
    )
    p.add_argument("--time-scales", default="0.25", help="comma-separated speed-ups (default 0.25)")
    p.add_argument(
        "--slo-scales", default="1", help="comma-separated multiples of the SLOs (default 1)"
    )
    p.add_argument(
        "--budgets",
        default=None,
        help="comma-separated budgets (2099968, 2MB; default: eval.run's)",
    )
    p.add_argument(
        "--windows",
        default=None,
        metavar="SPEC",
        help=f"{WINDOW_FORMS}; every window is a point (default: eval.run's window)",
    )
    p.add_argument("--trace", default="azure-code", help="trace (forwarded; read for --windows)")
    p.add_argument("--trace-format", default=None, help="forwarded; read for --windows")
    p.add_argument("--data-dir", default=None, help="forwarded; read for --windows")
    p.add_argument("--out", default=None, help="sweep directory (default: runs/sweep-<time>)")
    return p


def _floats(flag: str, text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 < v < float("inf") for v in values):
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers > 0")
    return values


def _budgets(text: str | None) -> list[str | None]:
    if text is None:
        return [None]
    items = [x.strip() for x in text.split(",") if x.strip()]
    for item in items:
        try:
            parse_bytes(item)
        except ValueError as err:
            raise UsageError(f"--budgets: {err}") from err
    if not items:
        raise UsageError(f"--budgets {text!r}: expected comma-separated byte counts")
    return items


def _windows(args: argparse.Namespace) -> tuple[list[tuple[float, float] | None], str | None]:
    if args.windows is None:
        return [None], None
    try:
        trace = load_trace(args.trace, args.trace_format, args.data_dir)
    except TraceError as err:
        raise UsageError(str(err)) from err
    arrivals = [r.arrival_s for r in trace.requests]
    windows, how = parse_windows(args.windows, trace.duration_s, arrivals)
    return list(windows), how


def point_argv(
    forward: Sequence[str],
    out: Path,
    time_scale: float,
    slo_scale: float,
    budget: str | None,
    window: tuple[float, float] | None,
) -> list[str]:
    """The eval.run command line of one point (``--resume`` when its directory holds a plan)."""
    if (out / PLAN_FILE).exists():
        return ["--resume", str(out)]
    argv = [*forward, "--time-scale", f"{time_scale:g}", "--slo-scale", f"{slo_scale:g}"]
    argv += ["--out", str(out)]
    if budget is not None:
        argv += ["--budget", budget]
    if window is not None:
        argv += ["--window", f"{window[0]}:{window[1]}"]  # every digit: the window drawn
    return argv


def finished(run_dir: Path) -> bool:
    """Whether a point's eval.run completed every system-rep (a summary with SLOs, neither
    interrupted nor listing a failure)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    done = summary.get("interrupted") is False and summary.get("slo") is not None
    return done and not summary.get("failures")


def sweep_point(summary: dict, point: dict) -> dict:
    """One entry of sweep.json: the point's coordinates, its load and SLOs, and each system's
    summary fields (with mean and ci95 over reps) and ratios against fp."""
    trace = summary["trace"]
    duration = trace.get("duration_s") or 0.0
    return {
        **point,
        "budget_bytes": summary["budget"]["bytes"],
        "window": trace.get("window"),
        "window_how": trace.get("window_how"),
        "requests": trace["requests"],
        "offered_load_req_s": trace["requests"] / duration if duration > 0 else None,
        "slo": summary.get("slo"),
        "profile": summary.get("profile"),
        "reps": summary.get("reps"),
        "systems": {
            name: {k: v for k, v in row.items() if k not in DROPPED}
            for name, row in summary.get("systems", {}).items()
        },
        "vs_fp": {
            name: {k: v for k, v in r.items() if k not in DROPPED}
            for name, r in summary.get("vs_fp", {}).items()
        },
        "invalid_reps": summary.get("invalid_reps", []),
        "failures": summary.get("failures", []),
    }


def write_sweep(out: Path, options: dict, points: list[dict]) -> list[Path]:
    """sweep.json and its figures: violations and P95 TTFT against the offered load per system
    (at the first SLO scale and budget), violations against the SLO scale (at the first time
    scale and budget). Returns the figures written (one needs two points on its axis)."""
    write_json_atomic(out / "sweep.json", {"options": options, "points": points})
    done = [p for p in points if p.get("systems")]
    if not done:
        return []
    first = done[0]

    def same(p: dict, keys: tuple[str, str]) -> bool:
        return all(p[k] == first[k] for k in keys)

    by_load = [p for p in done if same(p, ("slo_scale", "budget"))]
    by_slo = [p for p in done if same(p, ("time_scale", "budget"))]
    figures = [
        (out / "violations_vs_load.png", by_load, "offered_load_req_s", "slo_violation_rate"),
        (out / "ttft_p95_vs_load.png", by_load, "offered_load_req_s", "ttft_p95_s"),
        (out / "violations_vs_slo_scale.png", by_slo, "slo_scale", "slo_violation_rate"),
    ]
    written = []
    for path, subset, x, y in figures:
        if len({p[x] for p in subset}) >= 2:
            plot_sweep(path, subset, x, y)
            written.append(path)
    return written


def _run_point(argv: list[str], log: Path) -> int:
    """One eval.run; its console output goes to ``log`` (the sweep prints one line per point)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        cmd = [sys.executable, "-m", "eval.run", *argv]
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.wait()  # eval.run got the Ctrl-C too: it writes what it has, then exits
            raise


def main(argv: Sequence[str] | None = None) -> int:
    """Parse and check, then run every point in order and write sweep.json after each."""
    args, forward = build_parser().parse_known_args(argv)
    clash = [a for a in forward if a.split("=")[0] in SWEPT]
    try:
        if clash:
            raise UsageError(
                f"{', '.join(clash)}: set by the sweep per point; use --time-scales, "
                "--slo-scales, --budgets, --windows or --out"
            )
        time_scales = _floats("--time-scales", args.time_scales)
        slo_scales = _floats("--slo-scales", args.slo_scales)
        budgets = _budgets(args.budgets)
        windows, windows_how = _windows(args)
    except UsageError as err:
        exit_with(f"{PROG}: {err}")
    forward = [*forward, "--trace", args.trace]
    for flag in ("trace_format", "data_dir"):
        if getattr(args, flag) is not None:
            forward += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    out = Path(absolute(args.out or f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}"))
    options = {
        "time_scales": time_scales,
        "slo_scales": slo_scales,
        "budgets": budgets,
        "windows": args.windows,
        "windows_how": windows_how,
        "eval_run": forward,
    }
    grid = list(itertools.product(enumerate(windows), time_scales, slo_scales, budgets))
    points: list[dict] = []
    status = 0
    try:
        for n, ((w, window), ts, ss, budget) in enumerate(grid):
            name = f"p{n:02d}-w{w}-ts{ts:g}-slo{ss:g}" + (f"-b{budget}" if budget else "")
            run_dir = out / name
            console.print(f"[bold]point {n + 1}/{len(grid)}[/]: {name} (log {run_dir}.log)")
            if finished(run_dir):
                code = 0  # a sweep run again reuses its finished points
            else:
                argv = point_argv(forward, run_dir, ts, ss, budget, window)
                code = _run_point(argv, out / f"{name}.log")
            point = {
                "name": name,
                "time_scale": ts,
                "slo_scale": ss,
                "budget": budget,
                "run_dir": name,  # beside sweep.json: no machine paths in results
                "exit_status": code,
            }
            if code == 2 and not points:
                said = (out / f"{name}.log").read_text().strip().splitlines()
                exit_with(f"{PROG}: eval.run refused the options: {said[-1] if said else '?'}")
            summary_path = run_dir / "summary.json"
            if summary_path.is_file():
                point = sweep_point(json.loads(summary_path.read_text()), point)
            points.append(point)
            status = status or (1 if code else 0)
            write_sweep(out, options, points)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: sweep.json holds the points that finished[/]")
        write_sweep(out, options, points)
        return 130
    console.print(f"sweep of {len(points)} points in {out} (sweep.json and figures)")
    return status


if __name__ == "__main__":
    sys.exit(main())
