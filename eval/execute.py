"""Running a plan: every system for every rep, one server at a time, each finished system-rep
kept on disk the moment it ends.

Systems are interleaved rep by rep so slow drift of the machine hits them alike. When the SLOs
are to be measured (``--slo measure``, or no fixed entry for this model and machine) they are
measured on the fp server before its first replay, so fp goes first then. A system whose
server does not start is recorded as failed and the others still run. A server that exits
during its replay ends that replay at once (its requests in flight would otherwise each wait
for the request timeout); the rep is recorded as failed with the exit status and the log line
saying why, and the next system runs. A morph-rl rep whose policy fell back to the heuristic is
recorded as failed too: its numbers would be the heuristic's under the RL policy's name.

``static-k`` without K runs after morph-heuristic, and in its first rep searches K: a bisection
over 0..layers for the smallest K whose SLO-violation rate is at most morph-heuristic's in the
same rep, each try a full replay; the found K is kept in the saved plan and used by every rep.
Bisection assumes violations fall as K grows, which more KV capacity makes true up to noise.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import requests
from rich.console import Console

from eval import metrics, report, run_dir
from eval.metrics import Slo
from eval.plan import PROFILE_FILE, Plan, plan_json
from eval.replay import Replayer, probe_prompts
from eval.run_dir import SystemRun
from eval.servers import (
    STATIC_K,
    get_state,
    poll_state,
    quantize_first,
    start_server,
    static_k,
    stop_server,
    system_flags,
)
from eval.summary import build_summary, finish, write_outputs
from sglang_morph.client import MorphClient, MorphRequestError
from sglang_morph.config import UNLOADED_SLO_MULTIPLE
from sglang_morph.profile_file import LAST_TO_FIRST
from sglang_morph.server_process import Server, ServerError

CALIBRATION_REQUESTS = 5
CALIBRATION_MIN_OUTPUT = 16
"""Probe requests decode at least this many tokens, so their TPOT is not a 1-2 gap estimate."""

SERVER_WATCH_S = 0.5
"""How often a replay checks that its server's process still runs."""
SERVER_EXIT_GRACE_S = 10.0
"""After a replay with failed requests, how long a launcher may take to exit and still be
reported as the cause (SGLang's launcher exits within seconds of a child's crash)."""

console = Console(stderr=True)


class _Skipped(Exception):
    """A system-rep whose server did not start; ``entry`` goes into the summary's failures."""

    def __init__(self, entry: dict) -> None:
        super().__init__(entry["reason"])
        self.entry = entry


class _NoSlo(Exception):
    """The SLOs had to be measured and could not be: nothing can be judged."""


def launch(plan: Plan, system: str, rep: int) -> Server:
    """Start ``system``'s server with the shared model and budget (on ``--port``, or a free
    port when none is given)."""
    args = plan.args
    flags = system_flags(system, plan.budget_bytes, args.rl_checkpoint)
    if plan.slo is not None:
        flags += [
            "--morph-ttft-slo",
            f"{plan.slo.ttft_s:.6f}",
            "--morph-tpot-slo",
            f"{plan.slo.tpot_s:.6f}",
        ]
    flags += ["--morph-quant-method", args.quant_method, "--morph-group-size", str(args.group_size)]
    flags += ["--morph-profile", plan.profile_path or LAST_TO_FIRST]
    flags += args.server_arg
    k = f"-k{plan.static_k}" if system == STATIC_K else ""
    log = plan.out_dir / system / f"server-rep{rep}{k}.log"
    where = f"port {args.port}" if args.port else "a free port"
    console.print(f"[bold]starting {system}[/] (rep {rep}) on {where}; log {log}")
    return start_server(plan.model_path, args.port, flags, log)


def calibrate(plan: Plan, server: Server) -> Slo:
    """SLOs from the unloaded fp server (an SLO given on the command line wins)."""
    args, trace = plan.args, plan.trace.requests
    inp = int(statistics.median(r.input_tokens for r in trace))
    out = max(CALIBRATION_MIN_OUTPUT, int(statistics.median(r.output_tokens for r in trace)))
    prompts = probe_prompts(plan.vocab, inp, CALIBRATION_REQUESTS)
    try:
        ttft, tpot = MorphClient(server.url).unloaded_latency(prompts, out)
    except (RuntimeError, requests.RequestException) as err:
        raise _NoSlo(f"the fp server's unloaded latency could not be measured: {err}") from err
    scale = args.slo_scale or UNLOADED_SLO_MULTIPLE
    how = (
        f"{scale:g} x the fp server's unloaded median (TTFT {1000 * ttft:.1f} ms, TPOT "
        f"{1000 * tpot:.2f} ms; {CALIBRATION_REQUESTS} sequential requests of {inp} in / {out} out "
        "tokens)"
    )
    if args.slo_ttft is not None or args.slo_tpot is not None:
        how += "; the other SLO given on the command line"
    return Slo(args.slo_ttft or scale * ttft, args.slo_tpot or scale * tpot, how)


def _set_slo(plan: Plan, slo: Slo) -> None:
    """The measured SLOs, kept in the saved plan before any replay, so a resumed run judges
    every system by the same ones."""
    plan.slo = slo
    run_dir.save_plan(plan.out_dir, plan_json(plan))
    console.print(
        f"SLO: TTFT {1000 * slo.ttft_s:.1f} ms, TPOT {1000 * slo.tpot_s:.2f} ms ({slo.how})"
    )


async def _server_exit(server: Server) -> int:
    """The exit status of the server's launcher, once it has exited."""
    while (status := server.proc.poll()) is None:
        await asyncio.sleep(SERVER_WATCH_S)
    return status


async def _replay_and_watch(replayer: Replayer, server: Server, timeline: list[dict]) -> int | None:
    """Replay while reading /morph/state into ``timeline``; None when the replay finished, or
    the server's exit status when it exited first (the replay is then cancelled)."""
    t0 = time.perf_counter()
    poller = asyncio.create_task(poll_state(server.url, t0, timeline))
    replay = asyncio.create_task(replayer.run(t0))
    watcher = asyncio.create_task(_server_exit(server))
    try:
        await asyncio.wait({replay, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if replay.done():
            replay.result()  # its exception, if any
            if not any(r.error for r in replayer.records):
                return None
            # Failed requests may be the first sign of a server going down (a dead scheduler
            # refuses every request at once, and a short replay can end before its launcher
            # has exited): give the launcher a moment, so the rep is failed with the reason.
            done, _ = await asyncio.wait({watcher}, timeout=SERVER_EXIT_GRACE_S)
            return watcher.result() if done else None
        return watcher.result()
    finally:
        for task in (poller, replay, watcher):
            task.cancel()
        await asyncio.gather(poller, replay, watcher, return_exceptions=True)


_CAUSE_WORDS = ("crashed", "error", "exception", "killed", "died")


def _exit_cause(server: Server) -> str:
    """Where a server that stopped says why: the last line of its log that names a crash or
    an error (SGLang logs its own clean-up after that line), else the last line."""
    lines = [line.strip() for line in server.tail(80).splitlines() if line.strip()]
    for line in reversed(lines):
        if any(word in line.lower() for word in _CAUSE_WORDS):
            return line
    return lines[-1] if lines else "(empty log)"


def replay_system(plan: Plan, server: Server, run: SystemRun) -> None:
    """Replay the plan's requests to ``server``, filling ``run`` as it goes (so an interrupt
    leaves the finished part in place). A server that exits during the replay sets
    ``run.failure``."""
    replayer = Replayer(
        server.url,
        plan.trace.requests,
        plan.prompts,
        request_timeout_s=plan.args.request_timeout,
        label=f"{run.system} rep {run.rep}",
    )
    run.records = replayer.records
    run.state_start = get_state(server.url)
    try:
        exited = asyncio.run(_replay_and_watch(replayer, server, run.timeline))
    finally:
        for record in run.records:
            if record.error is None and record.e2e_s is None:
                record.error = "interrupted"
    if exited is not None:
        run.failure = f"server exited with status {exited} during the replay: {_exit_cause(server)}"
        return
    run.state_end = get_state(server.url)


def policy_failure(state: dict | None) -> str | None:
    """Why a morph-rl rep did not measure the RL policy, from ``/morph/state`` after its replay;
    None when the policy decided every tick. A state that cannot be read proves nothing, so it
    fails the rep too."""
    if state is None:
        return "RL policy unverified: /morph/state could not be read after the replay"
    fallbacks = int(state.get("fallbacks") or 0)
    if fallbacks > 0:
        reason = state.get("fallback_reason") or "no reason given"
        return f"RL policy fell back to the heuristic on {fallbacks} ticks: {reason}"
    if state.get("policy_loaded") is False:
        return "RL policy not loaded: the heuristic decided"
    return None


def _measure_slo(plan: Plan) -> None:
    """An fp server only to measure the SLOs, when fp is not replayed first."""
    try:
        server = launch(plan, "fp", 0)
    except ServerError as err:
        raise _NoSlo(f"the fp server needed to measure the SLOs did not start: {err}") from err
    try:
        _set_slo(plan, calibrate(plan, server))
    finally:
        stop_server(server)


def _start_failure(err: ServerError) -> str:
    """One line for the report: the error's headline and the log's last line, which is where
    the launcher states why it stopped."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = f"server failed to start: {lines[0].rstrip(':')}"
    return reason + (f" (last log line: {lines[-1]})" if len(lines) > 1 else "")


def _quantize_static_k(plan: Plan, system: str, server: Server) -> str | None:
    """Put a static-k server in its configuration before the replay; why it failed, or None."""
    k = static_k(system)
    k = plan.static_k if k is None else k
    try:
        quantize_first(server.url, k)
    except (OSError, RuntimeError, MorphRequestError, KeyError) as err:
        return f"static-k: swapping the first {k} layers to int4 failed: {err}"
    return None


def run_one(
    plan: Plan, system: str, rep: int, runs: dict[str, list[SystemRun]], keep: bool = True
) -> SystemRun:
    """Start, (calibrate,) replay and stop one system-rep, and keep it on disk once finished
    (unless ``keep`` is false: a try of the static-k search).

    The run joins ``runs`` before its replay, so an interrupt still reports its finished
    requests. A server that fails to start raises _Skipped, or _NoSlo when the SLOs still had
    to be measured on it (only ever fp's first rep, which then runs first).
    """
    try:
        server = launch(plan, system, rep)
    except ServerError as err:
        if plan.slo is None:
            raise _NoSlo(f"the fp server needed to measure the SLOs did not start: {err}") from err
        console.print(f"[red]{system}: {err}[/]")
        raise _Skipped({"system": system, "rep": rep, "reason": _start_failure(err)}) from err
    try:
        if plan.slo is None:
            _set_slo(plan, calibrate(plan, server))
        run = SystemRun(system, rep)
        runs[system].append(run)
        if system.partition(":")[0] == STATIC_K:
            run.failure = _quantize_static_k(plan, system, server)
        if run.failure is None:
            replay_system(plan, server, run)
        if system == "morph-rl" and run.failure is None:
            run.failure = policy_failure(run.state_end)
        if keep:
            run_dir.save_run(plan.out_dir, run)
        if run.failure:
            console.print(f"[red]{system} rep {rep} failed: {run.failure}[/]")
        return run
    finally:
        stop_server(server)


def _violations(plan: Plan, run: SystemRun) -> float | None:
    if run.failure or not run.records or plan.slo is None:
        return None
    return metrics.summarize(run.records, plan.slo)["slo_violation_rate"]


def search_static_k(plan: Plan, rep: int, runs: dict[str, list[SystemRun]]) -> SystemRun:
    """Bisect for the smallest K whose violation rate is at most morph-heuristic's in rep
    ``rep``; the try at the found K is that rep's static-k result. The K and every try go
    into the saved plan and its notes. _Skipped when there is nothing to match."""
    target = next((_violations(plan, r) for r in runs["morph-heuristic"] if r.rep == rep), None)
    if target is None:
        reason = "static-k: no valid morph-heuristic result in this rep to match"
        raise _Skipped({"system": STATIC_K, "rep": rep, "reason": reason})
    tries: dict[int, tuple[float | None, SystemRun]] = {}
    lo, hi = 0, plan.num_layers
    while lo < hi or hi not in tries:
        k = (lo + hi) // 2 if lo < hi else hi
        plan.static_k = k
        try:
            run = run_one(plan, STATIC_K, rep, {STATIC_K: []}, keep=False)
        except BaseException:
            plan.static_k = None  # not found: a later rep (or a resume) searches again
            raise
        tries[k] = (_violations(plan, run), run)
        console.print(f"static-k search: K={k} violations {tries[k][0]} (target {target})")
        if lo == hi:
            break
        rate = tries[k][0]
        lo, hi = (lo, k) if rate is not None and rate <= target else (k + 1, hi)
    k = hi
    reached = tries[k][0] is not None and tries[k][0] <= target  # type: ignore[operator]
    tried = ", ".join(
        f"K={t}: {'-' if v is None else f'{v:.1%}'}" for t, (v, _) in sorted(tries.items())
    )
    plan.static_k = k
    plan.notes.append(
        f"static-k: K={k}, {'the smallest K' if reached else 'no K (all layers tried)'} with SLO "
        f"violations <= morph-heuristic's {target:.1%} in rep {rep} (bisection; {tried})"
    )
    chosen = tries[k][1]
    runs[STATIC_K].append(chosen)
    run_dir.save_run(plan.out_dir, chosen)
    run_dir.save_plan(plan.out_dir, plan_json(plan))
    return chosen


def _order(plan: Plan, needs_calibration: bool) -> list[str]:
    """The systems in the order each rep runs them: fp first when the SLOs are measured (also
    in a resumed run that has them already, so its summary lists systems as the first did);
    a searching static-k after the morph-heuristic it matches."""
    systems = list(plan.systems)
    if needs_calibration and "fp" in systems:
        systems.remove("fp")
        systems.insert(0, "fp")
    if STATIC_K in systems:
        systems.remove(STATIC_K)
        systems.insert(systems.index("morph-heuristic") + 1, STATIC_K)
    return systems


def _run_all(
    plan: Plan,
    finished: dict[tuple[str, int], SystemRun],
    runs: dict[str, list[SystemRun]],
    failures: list[dict],
    notes: list[str],
) -> None:
    """Every system-rep not in ``finished``, in order; the summary is rewritten after each."""
    if plan.slo is None and ("fp" not in runs or ("fp", 0) in finished):
        _measure_slo(plan)
    for rep in range(plan.args.reps):
        for system in runs:
            if (system, rep) in finished:
                runs[system].append(finished[(system, rep)])
                continue
            try:
                if system == STATIC_K and plan.static_k is None:
                    search_static_k(plan, rep, runs)
                else:
                    run_one(plan, system, rep, runs)
            except _Skipped as skipped:
                failures.append(skipped.entry)
                continue
            summary = build_summary(plan, runs, False, notes=notes, failures=failures)
            write_outputs(plan, summary, runs, figures=False)


def execute(plan: Plan) -> int:
    """Run every system-rep the run directory does not hold yet; always writes what it has,
    even on Ctrl-C. Returns the exit status: 0, 1 when a system-rep failed or nothing could be
    judged, 130 when interrupted."""
    run_dir.save_plan(plan.out_dir, plan_json(plan))
    if plan.profile_path == str(plan.out_dir / PROFILE_FILE):
        run_dir.write_json_atomic(plan.out_dir / PROFILE_FILE, plan.profile)
    finished = run_dir.finished_runs(plan.out_dir, plan.systems, plan.args.reps)
    measured = plan.slo_measured or plan.slo is None
    runs: dict[str, list[SystemRun]] = {s: [] for s in _order(plan, measured)}
    failures: list[dict] = []
    notes: list[str] = []
    if finished:
        reloaded = ", ".join(f"{s} rep {r}" for s, r in sorted(finished, key=lambda k: k[::-1]))
        notes.append(f"resumed: {reloaded} reloaded from the interrupted run")
    status = 0
    interrupted = False
    try:
        _run_all(plan, finished, runs, failures, notes)
    except _NoSlo as err:
        notes.append(str(err).split("\n")[0])
        console.print(f"[red]cannot measure the SLOs: {err}[/]")
        status = 1
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]interrupted: writing what has finished[/]")
    summary = finish(plan, runs, failures, notes, interrupted)
    if summary["slo"] is not None:
        report.print_table(summary, Console())
    console.print(f"results in {plan.out_dir}")
    if interrupted:
        return 130
    return 1 if status or summary["failures"] else 0
