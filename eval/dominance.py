"""``python -m eval.dominance DIR [DIR ...]``: does the learned controller dominate the heuristic
over several ``eval.run`` outputs, the acceptance check of the learned controller.

Each DIR is one ``eval.run`` output (its ``summary.json``) that served both systems, e.g. one
per test window. Per window and pooled over all of them: SLO violations (late requests over
requests; per window the mean of the valid reps with a 95% t interval), the runtime's KL
quality proxy (request-weighted), layer transitions, and per rep pair (the reps interleave the
systems) the difference in violation rate, with its interval. The candidate dominates when,
pooled, its violations and its KL are both at most the reference's, one of them at least
``DOMINANCE_MIN_GAIN`` lower, with at most ``DOMINANCE_MAX_TRANSITIONS`` times its
transitions, and its policy was loaded and never fell back in any rep; otherwise the verdict
names every condition that failed. Summaries are read as written, so a verdict can be
re-checked from committed figures.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from eval.stats import mean_ci95
from sglang_morph.cli import UsageError, exit_with, output_path, read_input
from sglang_morph.config import DOMINANCE_MAX_TRANSITIONS, DOMINANCE_MIN_GAIN


@dataclass(frozen=True)
class Figures:
    """One system's figures over the valid reps of one or more windows."""

    requests: int
    late: int
    kl_weighted: float | None
    """Request-weighted mean KL to fp (None when no rep reported one)."""
    transitions: int
    fallbacks: int
    policy_loaded: bool
    reps: int
    violation_mean: float | None
    violation_ci95: list[float] | None

    @property
    def violation_rate(self) -> float:
        return self.late / self.requests if self.requests else 0.0


def _valid_reps(summary: Mapping, system: str, where: str) -> list[Mapping]:
    systems = summary.get("systems") or {}
    if system not in systems:
        raise UsageError(f"{where} has no system {system!r}; it has {', '.join(systems) or 'none'}")
    return [r for r in systems[system].get("per_rep", []) if r.get("valid", True)]


def figures(summaries: Sequence[tuple[str, Mapping]], system: str) -> Figures:
    """``system``'s figures pooled over ``summaries`` (name, summary.json contents)."""
    requests = late = transitions = fallbacks = reps = 0
    kl_sum, kl_requests, loaded, rates = 0.0, 0, True, []
    for where, summary in summaries:
        for rep in _valid_reps(summary, system, where):
            n = int(rep["requests"])
            requests += n
            late += round(float(rep["slo_violation_rate"]) * n)
            rates.append(float(rep["slo_violation_rate"]))
            reps += 1
            if rep.get("quality_kl") is not None:
                kl_sum += float(rep["quality_kl"]) * n
                kl_requests += n
            fallbacks += int(rep.get("fallbacks") or 0)
            loaded = loaded and rep.get("policy_loaded") not in (None, False)
        transitions += int(summary["systems"][system].get("transitions") or 0)
    mean, ci = mean_ci95(rates)
    return Figures(requests, late, kl_sum / kl_requests if kl_requests else None, transitions,
                   fallbacks, loaded, reps, mean, ci)


def paired_differences(summaries: Sequence[tuple[str, Mapping]], candidate: str,
                       reference: str) -> list[float]:
    """Candidate minus reference violation rate for every rep pair (same window, same rep
    number, both valid): the systems of one rep ran back to back, so a pair shares the
    machine's state."""
    diffs = []
    for where, summary in summaries:
        ref = {r["rep"]: r for r in _valid_reps(summary, reference, where)}
        for rep in _valid_reps(summary, candidate, where):
            if rep["rep"] in ref:
                diffs.append(float(rep["slo_violation_rate"])
                             - float(ref[rep["rep"]]["slo_violation_rate"]))
    return diffs


def _reduction(value: float | None, ref: float | None) -> float | None:
    """Relative reduction of ``value`` against ``ref`` (0.2: 20% lower), None when unknown."""
    if value is None or ref is None or ref <= 0:
        return None
    return 1.0 - value / ref


def verdict(candidate: Figures, reference: Figures) -> tuple[bool, list[str]]:
    """Whether ``candidate`` dominates ``reference`` (see the module docstring) and, when it does
    not, every condition that failed."""
    failed = []
    if not candidate.reps or not reference.reps:
        failed.append("a system has no valid rep")
    if candidate.violation_rate > reference.violation_rate:
        failed.append(f"more SLO violations ({candidate.violation_rate:.1%} against "
                      f"{reference.violation_rate:.1%})")
    if candidate.kl_weighted is None or reference.kl_weighted is None:
        failed.append("no KL reported for one of the systems")
    elif candidate.kl_weighted > reference.kl_weighted:
        failed.append(f"more quality cost (KL {candidate.kl_weighted:.4f} against "
                      f"{reference.kl_weighted:.4f})")
    gains = [g for g in (_reduction(candidate.violation_rate, reference.violation_rate),
                         _reduction(candidate.kl_weighted, reference.kl_weighted)) if g is not None]
    if not gains or max(gains) < DOMINANCE_MIN_GAIN:
        failed.append(f"neither violations nor KL is {DOMINANCE_MIN_GAIN:.0%} lower")
    if candidate.transitions > DOMINANCE_MAX_TRANSITIONS * reference.transitions:
        failed.append(f"{candidate.transitions} transitions, more than "
                      f"{DOMINANCE_MAX_TRANSITIONS:g}x the reference's {reference.transitions}")
    if candidate.fallbacks:
        failed.append(f"{candidate.fallbacks} fallbacks: the heuristic decided some ticks")
    if not candidate.policy_loaded:
        failed.append("a rep does not show the candidate's policy loaded")
    return not failed, failed


def _interval(mean: float | None, ci: list[float] | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.1%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else "")


def _load(directory: str) -> tuple[str, Mapping]:
    path = Path(directory) / "summary.json"
    summary = read_input(directory, lambda: json.loads(path.read_text()))
    if not isinstance(summary, dict) or "systems" not in summary:
        raise UsageError(f"{path} is not an eval.run summary (no 'systems')")
    return directory, summary


def main(argv: list[str] | None = None) -> None:
    """Read every summary, print the per-window and pooled table and the verdict."""
    parser = argparse.ArgumentParser(prog="python -m eval.dominance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="eval.run output directories")
    parser.add_argument("--candidate", default="morph-rl", help="default: morph-rl")
    parser.add_argument("--reference", default="morph-heuristic",
                        help="default: morph-heuristic")
    parser.add_argument("--out", help="write the figures and the verdict as JSON here")
    args = parser.parse_args(argv)
    try:
        out = output_path("--out", args.out) if args.out else None
        summaries = [_load(d) for d in args.dirs]
        for where, summary in summaries:
            _valid_reps(summary, args.candidate, where)
            _valid_reps(summary, args.reference, where)
    except UsageError as err:
        exit_with(err)

    table = Table(title=f"{args.candidate} against {args.reference} (valid reps; intervals: "
                  "95% t over reps)")
    for column in ("window", "system", "reps", "SLO violations (mean of reps)",
                   "late / requests", "KL", "transitions", "pair difference"):
        table.add_column(column)
    windows = [(where, [(where, summary)]) for where, summary in summaries]
    rows: dict[str, dict] = {}
    shown: dict[str, dict[str, Figures]] = {}
    for where, group in [*windows, ("pooled", summaries)]:
        pair_mean, pair_ci = mean_ci95(paired_differences(group, args.candidate, args.reference))
        for system in (args.reference, args.candidate):
            f = shown.setdefault(where, {})[system] = figures(group, system)
            rows.setdefault(where, {})[system] = asdict(f)
            table.add_row(where if system == args.reference else "", system, str(f.reps),
                          _interval(f.violation_mean, f.violation_ci95),
                          f"{f.late} / {f.requests}",
                          "-" if f.kl_weighted is None else f"{f.kl_weighted:.4f}",
                          str(f.transitions),
                          "" if system == args.reference else _interval(pair_mean, pair_ci))
        rows[where]["pair_difference"] = {"mean": pair_mean, "ci95": pair_ci}
    console = Console()
    console.print(table)
    cand, ref = shown["pooled"][args.candidate], shown["pooled"][args.reference]
    dominates, failed = verdict(cand, ref)
    gains = {"violations": _reduction(cand.violation_rate, ref.violation_rate),
             "kl": _reduction(cand.kl_weighted, ref.kl_weighted)}
    console.print(
        f"pooled: violations (late / requests) {cand.violation_rate:.1%} against "
        f"{ref.violation_rate:.1%}, KL "
        f"{cand.kl_weighted or 0:.4f} against {ref.kl_weighted or 0:.4f}, transitions "
        f"{cand.transitions} against {ref.transitions}; "
        + ("[bold green]dominates[/]" if dominates else
           "[bold red]does not dominate[/]: " + "; ".join(failed)))
    if out is not None:
        out.write_text(json.dumps({"candidate": args.candidate, "reference": args.reference,
                                   "dirs": list(args.dirs), "windows": rows,
                                   "reductions": gains, "dominates": dominates,
                                   "failed": failed}, indent=1) + "\n")


if __name__ == "__main__":
    main()
