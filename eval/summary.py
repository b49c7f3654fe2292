"""From finished system-reps to summary.json, report.md and figures.

Latency and SLO fields are pooled over a system's reps (each rep is also reported on its own,
and every figure has its mean and 95% interval over reps, as have the ratios against fp, taken
per rep pair, and a within-run interval from resampling requests, ``eval.bootstrap``, which
one rep also has); quality is token-weighted over the layer configurations a system actually served,
each configuration evaluated once per run. A system-rep that failed (its server did not start,
or an RL policy that fell back to the heuristic) is listed with its reason, and a rep whose
client lagged behind the trace is flagged invalid, so no figure is read as what it is not.
"""

from __future__ import annotations

from collections.abc import Sequence

from eval import bootstrap, metrics, report, stats
from eval.metrics import FormatKey, Slo
from eval.plan import Plan, layer_order
from eval.run_dir import SystemRun
from eval.servers import STATIC_K, static_k
from sglang_morph.paths import repo_relative


def _evaluate(plan: Plan, key: FormatKey, cache: dict, notes: list[str]) -> dict | None:
    """Quality of one layer-format configuration, computed once per run (lazy import: the
    quality evaluation pulls in torch and transformers)."""
    if key in cache:
        return cache[key]
    try:
        from eval.quality_eval import evaluate_formats

        value = dict(
            evaluate_formats(
                plan.model_path,
                dict(key),
                group_size=plan.args.group_size,
                quant_method=plan.args.quant_method,
                profile=plan.profile,
            )
        )
        if not key:
            value["kl"] = 0.0
    except Exception as err:  # quality is reported as missing, the latency results still stand
        notes.append(f"quality of {dict(key) or 'fp'} not computed: {type(err).__name__}: {err}")
        value = None
    cache[key] = value
    return value


def system_k(plan: Plan, system: str) -> int | None:
    """How many layers a static-k system quantizes (None for other systems)."""
    if system.partition(":")[0] != STATIC_K:
        return None
    k = static_k(system)
    return plan.static_k if k is None else k


def nominal_key(plan: Plan, system: str) -> FormatKey | None:
    """The configuration a system is meant to run (used when no timeline was recorded)."""
    if system == "fp":
        return ()
    if system.partition(":")[0] == STATIC_K:
        k = system_k(plan, system)
        return None if k is None else tuple(sorted((i, "int4") for i in layer_order(plan)[:k]))
    if system.startswith("static-"):
        fmt = system.split("-", 1)[1]
        return tuple((i, fmt) for i in range(plan.num_layers))
    return None


def system_quality(
    plan: Plan, system: str, runs: Sequence[SystemRun], cache: dict, notes: list[str]
) -> tuple[float | None, float | None, float | None]:
    """(ppl, kl, mean quantized layers) weighted by the tokens each configuration produced."""
    weights: dict[FormatKey, float] = {}
    for run in runs:
        for key, w in metrics.token_weights(run.records, run.timeline).items():
            weights[key] = weights.get(key, 0.0) + w
    if not weights:
        key = nominal_key(plan, system)
        if key is None:
            notes.append(f"{system}: no /morph/state timeline, so no token-weighted quality")
            return None, None, None
        weights = {key: 1.0}
    quality = {k: v for k in weights if (v := _evaluate(plan, k, cache, notes)) is not None}
    ppl, kl = metrics.weighted_quality(weights, quality)
    return ppl, kl, metrics.mean_quantized_layers(weights)


def _counter(run: SystemRun, key: str) -> int | None:
    """How much a ``/morph/state`` counter grew over the replay."""
    if not run.state_end or run.state_end.get(key) is None:
        return None
    before = (run.state_start or {}).get(key) or 0
    return int(run.state_end[key]) - int(before)


def _final_state(run: SystemRun) -> dict:
    return run.state_end or run.state_start or {}


def _policy_loaded(runs: Sequence[SystemRun]) -> bool | None:
    """Whether every rep's server loaded its RL policy (None when no server said)."""
    known = [v for run in runs if (v := _final_state(run).get("policy_loaded")) is not None]
    return all(known) if known else None


def _where(loaded: object) -> object:
    """The checkpoint a server ran, relative to the checkout (summary.json carries no machine
    paths); False or None as the server said."""
    return repo_relative(loaded) if isinstance(loaded, str) else loaded


def _total(values: Sequence[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _rep_row(run: SystemRun, slo: Slo, quality: tuple = (None, None, None)) -> dict:
    """One rep's figures; ``valid`` is false (with ``invalid``, the reason) when the client's
    send lag shows it replayed another load than the trace's."""
    state = _final_state(run)
    return {
        "rep": run.rep,
        **metrics.summarize(run.records, slo),
        "quality_ppl": quality[0],
        "quality_kl": quality[1],
        **stats.send_lag(run.records),
        "failure": run.failure,
        "fallbacks": state.get("fallbacks"),
        "policy_loaded": _where(state.get("policy_loaded")),
    }


def _system_row(
    runs: Sequence[SystemRun], slo: Slo, quality: tuple, rep_quality: dict | None = None
) -> dict:
    """One system's summary.json entry, pooled over its reps, with each figure's mean and 95%
    interval over its valid reps (``mean``, ``ci95``, ``valid_reps``)."""
    row = metrics.summarize([r for run in runs for r in run.records], slo,
                            sum(metrics.wall_time_s(run.records) for run in runs))
    ppl, kl, mean_k = quality
    start = runs[0].state_start or {}
    row.update(
        quality_ppl=ppl,
        quality_kl=kl,
        mean_quantized_layers=mean_k,
        transitions=_total([_counter(run, "transitions") for run in runs]),
        fallbacks=_total([_final_state(run).get("fallbacks") for run in runs]),
        policy_loaded=_policy_loaded(runs),
        failures=[{"rep": run.rep, "reason": run.failure} for run in runs if run.failure],
        kv_capacity_tokens_at_start=start.get("kv_capacity_tokens"),
        quantized_layers_at_start=start.get("quantized_layers"),
        per_rep=[_rep_row(run, slo, (rep_quality or {}).get(run.rep, quality)) for run in runs],
    )
    spread = stats.summarize_reps(row["per_rep"])
    row.update(valid_reps=spread["n"], mean=spread["mean"], ci95=spread["ci95"])
    return row


def _vs_fp(systems: dict) -> dict:
    """Each other system against fp, ratio per rep pair, then mean and 95% interval."""
    if "fp" not in systems:
        return {}
    static = (systems.get("static-int4") or {}).get("per_rep", [])
    return {
        name: stats.paired_ratios(systems["fp"]["per_rep"], row["per_rep"], static)
        for name, row in systems.items()
        if name != "fp"
    }


def _invalid_reps(systems: dict) -> list[dict]:
    return [
        {"system": name, "rep": r["rep"], "reason": r["invalid"]}
        for name, row in systems.items()
        for r in row["per_rep"]
        if not r["valid"]
    ]


def _failures(runs: dict[str, list[SystemRun]], start_failures: Sequence[dict]) -> list[dict]:
    """Every failed system-rep with its reason, in the order they ran."""
    failed = [
        {"system": system, "rep": run.rep, "reason": run.failure}
        for system, system_runs in runs.items()
        for run in system_runs
        if run.failure
    ]
    order = list(runs)
    return sorted([*failed, *start_failures], key=lambda f: (f["rep"], order.index(f["system"])))


def build_summary(
    plan: Plan,
    runs: dict[str, list[SystemRun]],
    interrupted: bool,
    quality: dict[str, tuple] | None = None,
    notes: Sequence[str] = (),
    failures: Sequence[dict] = (),
    rep_quality: dict[str, dict[int, tuple]] | None = None,
) -> dict:
    """summary.json's content from whatever has run so far; ``failures`` are the system-reps
    whose server did not start (the others' failures come with their runs); ``rep_quality``
    is each system's quality per rep (the pooled one stands in when absent)."""
    trace, slo = plan.trace, plan.slo
    summary: dict = {
        "trace": {
            "name": trace.name,
            "source": trace.meta.get("source") and repo_relative(trace.meta["source"]),
            "window": trace.meta.get("window"),
            "window_how": trace.meta.get("window_how"),
            "time_scale": trace.meta.get("time_scale"),
            "length_mapping": trace.meta.get("length_mapping"),
            "requests": len(trace.requests),
            "duration_s": trace.duration_s,
        },
        "budget": {"bytes": plan.budget_bytes, "how": plan.budget_how},
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "how": slo.how} if slo else None,
        "profile": plan.profile_name,
        "reps": plan.args.reps,
        "interrupted": interrupted,
        "systems": {},
        "vs_fp": {},
        "invalid_reps": [],
        "failures": _failures(runs, failures),
        "notes": list(dict.fromkeys([*plan.notes, *notes])),
    }
    if slo is None:
        return summary
    for system, system_runs in runs.items():
        if any(run.records for run in system_runs):
            no_quality = (None, None, None)
            row = _system_row(
                system_runs,
                slo,
                (quality or {}).get(system, no_quality),
                (rep_quality or {}).get(system),
            )
            if system.partition(":")[0] == STATIC_K:
                row["k"] = system_k(plan, system)
            if quality:  # the final summary only: reads the model (lazy import: torch)
                from eval.served_quality import plan_served_quality

                nominal = nominal_key(plan, system)
                row["served_quality"] = plan_served_quality(plan, system_runs, nominal)
            summary["systems"][system] = row
    summary["vs_fp"] = _vs_fp(summary["systems"])
    records = {name: [(run.rep, r) for run in runs[name] for r in run.records]
               for name in summary["systems"]}
    per_system, vs_fp = bootstrap.request_intervals(records, slo, report.REFERENCE)
    for name, interval in per_system.items():
        summary["systems"][name]["ci95_requests"] = interval
    for name, interval in vs_fp.items():
        summary["vs_fp"][name]["ci95_requests"] = interval
    summary["bootstrap_draws"] = bootstrap.DRAWS
    summary["invalid_reps"] = _invalid_reps(summary["systems"])
    return summary


def write_outputs(
    plan: Plan, summary: dict, runs: dict[str, list[SystemRun]], figures: bool
) -> None:
    """Per-system records and timelines, summary.json, report.md, and (at the end) figures."""
    out = plan.out_dir
    for system, system_runs in runs.items():
        report.write_records(
            out / system / "requests.jsonl",
            [{**r.to_json(), "rep": run.rep} for run in system_runs for r in run.records],
        )
        report.write_records(
            out / system / "timeline.jsonl",
            [{**row, "rep": run.rep} for run in system_runs for row in run.timeline],
        )
        if figures and system_runs and system_runs[0].timeline:
            first = system_runs[0]
            title = f"{system} (rep {first.rep})"
            path = out / system / "timeline.png"
            report.plot_timeline(path, title, first.records, first.timeline)
    if figures:
        pooled = {s: [r for run in rs for r in run.records] for s, rs in runs.items()}
        if any(pooled.values()):
            slo = summary.get("slo") or {}
            report.plot_ttft_cdf(out / "ttft_cdf.png", pooled, slo.get("ttft_s"))
    report.write_summary(out, summary)


def finish(
    plan: Plan,
    runs: dict[str, list[SystemRun]],
    failures: Sequence[dict],
    notes: list[str],
    interrupted: bool,
) -> dict:
    """The final summary: each system's quality (skipped when interrupted), then every output
    with its figures. Returns the summary written."""
    quality: dict[str, tuple] = {}
    rep_quality: dict[str, dict[int, tuple]] = {}
    if interrupted:
        notes.append("interrupted: quality was not computed")
    else:
        cache: dict = {}
        for system, system_runs in runs.items():
            if system_runs:
                quality[system] = system_quality(plan, system, system_runs, cache, notes)
                rep_quality[system] = {
                    run.rep: system_quality(plan, system, [run], cache, notes)
                    for run in system_runs
                }
    summary = build_summary(plan, runs, interrupted, quality, notes, failures, rep_quality)
    write_outputs(plan, summary, runs, figures=True)
    return summary
