"""Writes an evaluation's results: summary.json, report.md, figures and the console table.

Every report states the load it was measured under (window, time scale, length mapping, memory
budget, SLOs), because on a 260K-parameter CPU model those choices decide the numbers as much
as the systems do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from eval.replay import RequestRecord
from eval.run_dir import write_text_atomic

REFERENCE = "fp"
QUALITY_REFERENCE = "static-int4"
COLUMNS = (
    ("completed", "done", "{:d}"),
    ("failed", "failed", "{:d}"),
    ("slo_violation_rate", "SLO viol.", "{:.1%}"),
    ("ttft_p50_s", "TTFT p50 ms", "ms"),
    ("ttft_p95_s", "TTFT p95 ms", "ms"),
    ("ttft_p99_s", "TTFT p99 ms", "ms"),
    ("tpot_p50_s", "TPOT p50 ms", "ms"),
    ("tpot_p95_s", "TPOT p95 ms", "ms"),
    ("throughput_tok_s", "tok/s", "{:.1f}"),
    ("goodput_req_s", "goodput req/s", "{:.2f}"),
    ("quality_ppl", "PPL", "{:.3f}"),
    ("quality_kl", "KL", "{:.4f}"),
    ("transitions", "transitions", "{:d}"),
    ("kv_capacity_tokens_at_start", "KV tok (start)", "{:d}"),
    ("prefix_cache_hit_rate", "prefix hit", "{:.1%}"),
)


def _cell(value: object, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "ms":
        return f"{1000 * float(value):.0f}"  # type: ignore[arg-type]
    return fmt.format(value)


def comparisons(summary: Mapping) -> dict[str, dict[str, float | None]]:
    """Each non-fp system against fp: SLO-violation reduction (%), P95 TTFT speed-up (x), and
    its quality cost as a fraction of static-int4's (KL to fp, which is 0 for fp itself)."""
    systems = summary.get("systems", {})
    ref = systems.get(REFERENCE)
    if not ref:
        return {}
    static_kl = (systems.get(QUALITY_REFERENCE) or {}).get("quality_kl")
    out: dict[str, dict[str, float | None]] = {}
    for name, row in systems.items():
        if name == REFERENCE:
            continue
        fp_rate, rate = ref.get("slo_violation_rate"), row.get("slo_violation_rate")
        fp_p95, p95 = ref.get("ttft_p95_s"), row.get("ttft_p95_s")
        kl = row.get("quality_kl")
        out[name] = {
            "violation_reduction_pct": (
                100.0 * (fp_rate - rate) / fp_rate if fp_rate and rate is not None else None
            ),
            "p95_ttft_speedup": fp_p95 / p95 if fp_p95 and p95 else None,
            "quality_cost_vs_static_int4": kl / static_kl if static_kl and kl is not None else None,
        }
    return out


def _ratio_texts(r: Mapping[str, float | None]) -> tuple[str, str, str]:
    red, speed, cost = (
        r["violation_reduction_pct"],
        r["p95_ttft_speedup"],
        r["quality_cost_vs_static_int4"],
    )
    return (
        "-" if red is None else f"{red:+.1f}%",
        "-" if speed is None else f"{speed:.2f}x",
        "-" if cost is None else f"{cost:.2f}",
    )


def conditions(summary: Mapping) -> list[str]:
    """The stated conditions of the measurement, one line each."""
    trace, slo, budget = summary["trace"], summary["slo"], summary.get("budget", {})
    window = trace.get("window")
    window_text = f"{window[0]:.1f}-{window[1]:.1f} s of the source" if window else "whole trace"
    mapping = trace.get("length_mapping") or {}
    how = f" (chosen: {trace['window_how']})" if trace.get("window_how") else ""
    reps = summary.get("reps", 1)
    lines = [
        f"Trace: {trace['name']} ({trace.get('source', '?')}), {window_text}{how}, "
        f"{trace['requests']} requests over {trace.get('duration_s', 0):.1f} s replayed",
        f"Time scale: {trace['time_scale']:g}x speed-up (arrival times divided by it)",
        "Length mapping: input = clip(round(ctx / {input_div:g}), {input_min}, {input_max}), "
        "output = clip(round(gen / {output_div:g}), {output_min}, {output_max})".format(**mapping)
        if mapping
        else "Length mapping: none",
        f"Memory budget: {budget.get('bytes', '?')} bytes for weights + KV "
        f"({budget.get('how', '')})",
        f"SLO: TTFT <= {1000 * slo['ttft_s']:.1f} ms and TPOT <= {1000 * slo['tpot_s']:.1f} ms "
        f"({slo['how']})"
        if slo
        else "SLO: not measured (no fp server ran)",
        f"Layer order (profile): {summary.get('profile') or 'last_to_first'}",
        f"Repetitions: {reps}"
        + (" (one rep: intervals from resampling requests only)" if reps < 2
           else ", means with 95% t intervals over reps"),
    ]
    if summary.get("interrupted"):
        lines.append("INTERRUPTED: the results cover only what finished before Ctrl-C")
    return lines


def _name(name: str, row: Mapping) -> str:
    """A system's name in tables, with the K a searched static-k found, marked when any of its
    reps failed."""
    if name == "static-k" and row.get("k") is not None:
        name = f"static-k (K={row['k']})"
    return f"{name} (FAILED)" if row.get("failures") else name


def failure_lines(summary: Mapping) -> list[str]:
    """One line per failed system-rep, and per rep flagged invalid, with its reason."""
    return [
        f"{f['system']} rep {f['rep']} FAILED: {f['reason']}" for f in summary.get("failures", [])
    ] + [
        f"{f['system']} rep {f['rep']} INVALID: {f['reason']}"
        for f in summary.get("invalid_reps", [])
    ]


def served_quality_lines(summary: Mapping) -> list[str]:
    """One line per system: the full-precision model's judgement of the tokens it served
    (``eval.served_quality``), next to the table's per-configuration proxy."""
    out = []
    for name, row in summary.get("systems", {}).items():
        sq = row.get("served_quality")
        if not sq:
            continue
        if sq.get("error"):
            out.append(f"{name}: served-token quality not measured: {sq['error']}")
            continue
        kl = "-" if sq.get("kl") is None else f"{sq['kl']:.4f}"
        out.append(
            f"{name}: served tokens judged by the fp model ({sq['sampled']} requests, "
            f"{sq['tokens']} tokens): NLL {sq['nll']:.4f}, PPL {sq['ppl']:.3f}, KL {kl}"
        )
    return out


def _interval(mean: float | None, ci: Sequence[float] | None, fmt: str) -> str:
    if mean is None:
        return "-"
    text = _cell(mean, fmt)
    return text + (f" [{_cell(ci[0], fmt)}, {_cell(ci[1], fmt)}]" if ci else "")


SPREAD_COLUMNS = (
    ("slo_violation_rate", "SLO viol.", "{:.1%}"),
    ("ttft_p95_s", "TTFT p95 ms", "ms"),
    ("tpot_p95_s", "TPOT p95 ms", "ms"),
    ("goodput_req_s", "goodput req/s", "{:.2f}"),
    ("quality_kl", "KL", "{:.4f}"),
)
RATIO_COLUMNS = (
    ("violation_reduction_pct", "SLO violation reduction", "{:+.1f}%"),
    ("p95_ttft_speedup", "P95 TTFT speed-up", "{:.2f}x"),
    ("quality_cost_vs_static_int4", "quality cost / static-int4's", "{:.2f}"),
)


def spread_lines(summary: Mapping) -> list[str]:
    """Markdown tables of the mean and 95% interval over reps: per system, then each system's
    ratios against fp taken per rep pair."""
    lines = ["| system | valid reps | " + " | ".join(h for _, h, _ in SPREAD_COLUMNS) + " |"]
    lines.append("|---" * (len(SPREAD_COLUMNS) + 2) + "|")
    for name, row in summary.get("systems", {}).items():
        mean, ci = row.get("mean") or {}, row.get("ci95") or {}
        cells = [_interval(mean.get(k), ci.get(k), fmt) for k, _, fmt in SPREAD_COLUMNS]
        lines.append(f"| {name} | {row.get('valid_reps', '-')} | " + " | ".join(cells) + " |")
    vs_fp = summary.get("vs_fp") or {}
    if vs_fp:
        heads = " | ".join(h for _, h, _ in RATIO_COLUMNS)
        lines += ["", f"| vs fp, per rep pair | pairs | {heads} |"]
        lines.append("|---" * (len(RATIO_COLUMNS) + 2) + "|")
        for name, r in vs_fp.items():
            cells = [_interval(r["mean"].get(k), r["ci95"].get(k), f) for k, _, f in RATIO_COLUMNS]
            lines.append(f"| {name} | {r['n']} | " + " | ".join(cells) + " |")
    return lines


def request_interval_heading(summary: Mapping) -> str:
    """What the within-run intervals are, said the same way in report.md and on the console."""
    return (f"95% intervals within this run ({summary.get('bootstrap_draws')} resamples of its "
            "requests; machine drift between runs is not in them):")


def request_interval_lines(summary: Mapping) -> list[str]:
    """Each system's violation rate and P95 TTFT, and its ratios against fp, with the 95%
    interval from resampling this run's requests (machine drift between runs is not in it)."""
    out = []
    for name, row in summary.get("systems", {}).items():
        ci = row.get("ci95_requests") or {}
        out.append(
            f"{name}: SLO violations "
            f"{_interval(row.get('slo_violation_rate'), ci.get('slo_violation_rate'), '{:.1%}')}"
            f", P95 TTFT {_interval(row.get('ttft_p95_s'), ci.get('ttft_p95_s'), 'ms')} ms"
        )
    ratios = comparisons(summary)
    for name, r in (summary.get("vs_fp") or {}).items():
        ci = r.get("ci95_requests") or {}
        pooled = ratios.get(name, {})
        red = _interval(pooled.get("violation_reduction_pct"), ci.get("violation_reduction_pct"),
                        "{:+.1f}%")
        speed = _interval(pooled.get("p95_ttft_speedup"), ci.get("p95_ttft_speedup"), "{:.2f}x")
        out.append(f"{name} vs fp: SLO violations {red}, P95 TTFT speed-up {speed}")
    return out


def lag_lines(summary: Mapping) -> list[str]:
    """The client's send lag of every rep (p99 and max), marking reps past the limit."""
    out = []
    for name, row in summary.get("systems", {}).items():
        for r in row.get("per_rep", []):
            if r.get("send_lag_p99_s") is None:
                continue
            flag = "" if r.get("valid", True) else " INVALID"
            out.append(
                f"{name} rep {r['rep']}: p99 {1000 * r['send_lag_p99_s']:.1f} ms, max "
                f"{1000 * r['send_lag_max_s']:.1f} ms{flag}"
            )
    return out


def markdown(summary: Mapping, figures: Sequence[str] = ()) -> str:
    """report.md: conditions, the per-system table, morph-vs-fp ratios and figure links."""
    lines = ["# MorphServe evaluation", ""]
    lines += [f"- {line}" for line in conditions(summary)]
    lines += ["", "| system | " + " | ".join(h for _, h, _ in COLUMNS) + " |"]
    lines.append("|---" * (len(COLUMNS) + 1) + "|")
    for name, row in summary.get("systems", {}).items():
        cells = [_cell(row.get(key), fmt) for key, _, fmt in COLUMNS]
        lines.append(f"| {_name(name, row)} | " + " | ".join(cells) + " |")
    served = served_quality_lines(summary)
    if served:
        lines += ["", "Quality of what was served:", ""] + [f"- {line}" for line in served]
    failures = failure_lines(summary)
    if failures:
        lines += ["", "Failed or invalid:", ""] + [f"- {line}" for line in failures]
    ratios = comparisons(summary)
    if ratios:
        lines += ["", "Against fp (same budget, same requests):", ""]
        lines += [
            "| system | SLO violation reduction | P95 TTFT speed-up | quality cost (KL) / "
            "static-int4's |",
            "|---|---|---|---|",
        ]
        for name, r in ratios.items():
            lines.append(f"| {name} | " + " | ".join(_ratio_texts(r)) + " |")
    within = request_interval_lines(summary)
    if within:
        lines += ["", request_interval_heading(summary), ""]
        lines += [f"- {line}" for line in within]
    if summary.get("systems"):
        lines += ["", "Over reps (mean [95% interval]; invalid reps left out):", ""]
        lines += spread_lines(summary)
    lags = lag_lines(summary)
    if lags:
        lines += ["", "Client send lag (actual minus scheduled send), per rep:", ""]
        lines += [f"- {line}" for line in lags]
    notes = summary.get("notes") or []
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if figures:
        lines += [""] + [f"![{f.removesuffix('.png')}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Path, summary: Mapping) -> None:
    """summary.json and report.md, each replaced whole (figures are linked when already
    present)."""
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    figures = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*.png"))
    write_text_atomic(out_dir / "report.md", markdown(summary, figures))


def write_records(path: Path, rows: Sequence[Mapping]) -> None:
    """One JSON object per line (requests.jsonl, timeline.jsonl)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def plot_ttft_cdf(
    path: Path, records: Mapping[str, Sequence[RequestRecord]], slo_ttft_s: float | None = None
) -> None:
    """One TTFT CDF per system on shared log-scaled axes, with the TTFT SLO as a dashed line
    (failed requests are left out, so a curve that stops below 1.0 shows the failed fraction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, recs in records.items():
        ttfts = np.sort([r.ttft_s for r in recs if r.ok and r.ttft_s is not None])
        if len(ttfts) == 0:
            continue
        ax.step(ttfts, np.arange(1, len(ttfts) + 1) / len(recs), where="post", label=name)
    if slo_ttft_s is not None:
        ax.axvline(slo_ttft_s, color="black", linestyle="--", linewidth=1, label="TTFT SLO")
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_timeline(
    path: Path, title: str, records: Sequence[RequestRecord], timeline: Sequence[Mapping]
) -> None:
    """Load (arrivals/s), queue and running requests, quantized layers, and KV capacity/use over
    the replay: shows whether the system quantized when the burst came and returned after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(4, 1, figsize=(8, 8), sharex=True)
    arrivals = [r.arrival_s for r in records]
    end = max([row["t"] for row in timeline] + arrivals + [1.0])
    bins = np.arange(0.0, end + 1.0, 1.0)
    axes[0].hist(arrivals, bins=bins, color="tab:gray")
    axes[0].set_ylabel("arrivals/s")
    t = [row["t"] for row in timeline]

    def series(key: str) -> list[float]:
        return [row.get(key) if row.get(key) is not None else np.nan for row in timeline]

    axes[1].step(t, series("queue_len"), where="post", label="queued")
    axes[1].step(t, series("running_reqs"), where="post", label="running")
    axes[1].set_ylabel("requests")
    axes[1].legend(loc="upper right")
    axes[2].step(t, series("quantized_layers"), where="post", color="tab:red")
    axes[2].set_ylabel("quantized layers")
    axes[3].step(t, series("kv_capacity_tokens"), where="post", label="capacity")
    axes[3].step(t, series("kv_used_tokens"), where="post", label="used")
    axes[3].set_ylabel("KV tokens")
    axes[3].set_xlabel("time since replay start (s)")
    axes[3].legend(loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(summary: Mapping, console: Console | None = None) -> None:
    """The summary table and the morph-vs-fp ratios on the console."""
    console = console or Console()
    if not console.is_terminal:  # a pipe or file gets 80 columns, too narrow for the table
        console.width = max(console.width, 180)
    for line in conditions(summary):
        console.print(line, markup=False)  # "[...]" in a stated condition is text
    table = Table(title="per-system results")
    table.add_column("system")
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    for name, row in summary.get("systems", {}).items():
        table.add_row(_name(name, row), *(_cell(row.get(key), fmt) for key, _, fmt in COLUMNS))
    console.print(table)
    for line in served_quality_lines(summary):
        console.print(line, markup=False)
    for line in failure_lines(summary):
        console.print(f"[red]{escape(line)}[/]")
    for name, r in comparisons(summary).items():
        red, speed, cost = _ratio_texts(r)
        console.print(
            f"{name} vs fp: SLO violations {red} reduction, P95 TTFT {speed} speed-up, "
            f"quality cost {cost} of static-int4's"
        )
    within = request_interval_lines(summary)
    if within:
        console.print(request_interval_heading(summary), markup=False)
        for line in within:
            console.print("  " + line, markup=False)
    if summary.get("reps", 1) > 1:
        for line in spread_lines(summary):
            console.print(line, markup=False)
    worst = max((row for row in _rep_rows(summary)), key=_lag_key, default=None)
    if worst is not None:
        console.print(
            f"client send lag: worst rep p99 {1000 * worst['send_lag_p99_s']:.1f} ms "
            f"(limit 50 ms); {len(summary.get('invalid_reps', []))} rep(s) invalid"
        )


def _rep_rows(summary: Mapping) -> list[Mapping]:
    return [
        r
        for row in summary.get("systems", {}).values()
        for r in row.get("per_rep", [])
        if r.get("send_lag_p99_s") is not None
    ]


def _lag_key(row: Mapping) -> float:
    return float(row["send_lag_p99_s"])


SWEEP_LABELS = {
    "offered_load_req_s": "offered load (requests/s of the replayed window)",
    "slo_scale": "SLO scale (x the base SLOs)",
    "slo_violation_rate": "SLO violation rate",
    "ttft_p95_s": "P95 TTFT (s)",
}


def plot_sweep(path: Path, points: Sequence[Mapping], x: str, y: str) -> None:
    """One line per system of ``y`` (its mean over reps, with the 95% interval as error bars
    when there is one, drawn within the values ``y`` can take: a rate in [0, 1], a latency
    above 0; the t interval of two reps is unbounded) against the point field ``x``, points
    sorted along x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = dict.fromkeys(name for p in points for name in p.get("systems", {}))
    for name in names:
        rows = sorted((p[x], p["systems"][name]) for p in points if name in p.get("systems", {}))
        xs, means, errs = [], [], []
        for xv, row in rows:
            mean = (row.get("mean") or {}).get(y, row.get(y))
            if xv is None or mean is None:
                continue
            ci = (row.get("ci95") or {}).get(y)
            xs.append(xv)
            means.append(mean)
            lo, hi = ci if ci else (mean, mean)
            lo, hi = max(lo, 0.0), min(hi, 1.0) if y.endswith("_rate") else hi
            errs.append((mean - lo, hi - mean))
        if xs:
            yerr = [[e[0] for e in errs], [e[1] for e in errs]]
            ax.errorbar(xs, means, yerr=yerr, marker="o", capsize=3, label=name)
    ax.set_xlabel(SWEEP_LABELS.get(x, x))
    ax.set_ylabel(SWEEP_LABELS.get(y, y))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
