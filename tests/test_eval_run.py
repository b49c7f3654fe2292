"""eval.run: outputs on synthetic results, input errors before any server, interrupts, RL
fallbacks, resuming, and (slow) real end-to-end replays against sglang_morph servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import unused_port

from eval import execute as exe
from eval import plan as planmod
from eval import run as runmod
from eval import run_dir, servers
from eval.metrics import Slo
from eval.plan import Plan, parse_windows, plan_json, resume_plan
from eval.replay import Replayer, RequestRecord
from eval.report import comparisons, markdown
from eval.run_dir import SystemRun
from eval.servers import poll_state, start_server, stop_server
from eval.summary import build_summary, system_quality, write_outputs
from eval.traces import Trace, TraceRequest
from sglang_morph.paths import DEFAULT_CHECKPOINT
from sglang_morph.server_process import Server, ServerError

REPO = Path(__file__).resolve().parent.parent
SYSTEM_FIELDS = {
    "completed",
    "failed",
    "slo_violation_rate",
    "ttft_p50_s",
    "ttft_p95_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "tpot_p95_s",
    "throughput_tok_s",
    "goodput_req_s",
    "quality_ppl",
    "quality_kl",
    "transitions",
}


def _plan(tmp_path: Path, systems: str, *extra: str) -> Plan:
    args = runmod.build_parser().parse_args(
        ["--out", str(tmp_path), "--systems", systems, "--slo-ttft", "0.5", "--slo-tpot", "0.1"]
        + list(extra)
    )
    requests = tuple(TraceRequest(0.5 * i, 20, 5) for i in range(8))
    meta = {
        "source": "synthetic",
        "window": [100.0, 104.0],
        "time_scale": 2.0,
        "length_mapping": {
            "input_div": 16,
            "input_min": 8,
            "input_max": 300,
            "output_div": 4,
            "output_min": 4,
            "output_max": 150,
        },
        "span_s": 4.0,
    }
    return Plan(
        Trace("synthetic", requests, meta),
        systems.split(","),
        "/nonexistent-model",
        5,
        2_000_000,
        "test budget",
        [[3] * 20 for _ in requests],
        None,
        tmp_path,
        args,
        slo=Slo(0.5, 0.1, "absolute"),
    )


def _records(ttft: float, tpot: float, failed: int = 0) -> list[RequestRecord]:
    out = []
    for i in range(8):
        sent = 0.5 * i
        if i < failed:
            out.append(RequestRecord(i, sent, sent, 20, 5, error="timeout"))
            continue
        out.append(RequestRecord(i, sent, sent, 20, 5, 5, ttft, tpot, ttft + 4 * tpot))
    return out


def _fake_quality(monkeypatch: pytest.MonkeyPatch, calls: list) -> None:
    def evaluate_formats(model_path: str, layer_formats: dict, **_: object) -> dict:
        calls.append(dict(layer_formats))
        k = len(layer_formats)
        return {"ppl": 3.5 + 0.1 * k, "kl": 0.01 * k + 0.5}

    module = types.ModuleType("eval.quality_eval")
    module.evaluate_formats = evaluate_formats  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "eval.quality_eval", module)


def test_outputs_on_synthetic_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    _fake_quality(monkeypatch, calls)
    plan = _plan(tmp_path, "fp,static-int4,morph-heuristic")
    fp = SystemRun("fp", 0, _records(1.0, 0.05, failed=2), [{"t": 0.0, "formats": {}}])
    fp.state_start, fp.state_end = {"transitions": 0}, {"transitions": 0}
    static = SystemRun("static-int4", 0, _records(0.2, 0.05))  # no timeline: nominal
    timeline = [
        {"t": 0.0, "formats": {}, "queue_len": 0, "running_reqs": 0, "quantized_layers": 0,
         "kv_capacity_tokens": 768, "kv_used_tokens": 0},
        {"t": 2.0, "formats": {"4": "int4"}, "queue_len": 3, "running_reqs": 2,
         "quantized_layers": 1, "kv_capacity_tokens": 900, "kv_used_tokens": 500},
    ]  # fmt: skip
    morph = SystemRun("morph-heuristic", 0, _records(0.25, 0.05), timeline)
    morph.state_start, morph.state_end = {"transitions": 1}, {"transitions": 3}
    runs = {"fp": [fp], "static-int4": [static], "morph-heuristic": [morph]}

    cache: dict = {}
    notes: list[str] = []
    quality = {s: system_quality(plan, s, r, cache, notes) for s, r in runs.items()}
    assert quality["fp"][:2] == (3.5, 0.0)  # fp: k = 0 and KL forced to 0
    assert quality["static-int4"][0] == pytest.approx(4.0)
    assert 3.5 < quality["morph-heuristic"][0] < 3.6
    assert {} in calls and {4: "int4"} in calls and {i: "int4" for i in range(5)} in calls
    assert len(calls) == len(cache) == 3  # fp, all-int4, one layer: each computed once

    summary = build_summary(plan, runs, False, quality, notes)
    write_outputs(plan, summary, runs, figures=True)

    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["trace"]["time_scale"] == 2.0 and written["trace"]["requests"] == 8
    assert written["slo"] == {"ttft_s": 0.5, "tpot_s": 0.1, "how": "absolute"}
    for name in runs:
        assert SYSTEM_FIELDS <= set(written["systems"][name])
    assert written["systems"]["fp"]["failed"] == 2
    assert written["systems"]["fp"]["slo_violation_rate"] == 1.0
    assert written["systems"]["morph-heuristic"]["slo_violation_rate"] == 0.0
    assert written["systems"]["morph-heuristic"]["transitions"] == 2
    ratios = comparisons(written)
    assert ratios["morph-heuristic"]["violation_reduction_pct"] == pytest.approx(100.0)
    assert ratios["morph-heuristic"]["p95_ttft_speedup"] == pytest.approx(4.0)
    kl = {name: written["systems"][name]["quality_kl"] for name in runs}
    assert 0 < kl["morph-heuristic"] < kl["static-int4"]
    cost = ratios["morph-heuristic"]["quality_cost_vs_static_int4"]
    assert cost == pytest.approx(kl["morph-heuristic"] / kl["static-int4"])
    assert ratios["static-int4"]["quality_cost_vs_static_int4"] == pytest.approx(1.0)

    report = (tmp_path / "report.md").read_text()
    assert "Time scale: 2x" in report and "clip(round(ctx / 16), 8, 300)" in report
    assert f"| morph-heuristic | +100.0% | 4.00x | {cost:.2f} |" in report
    assert "TTFT <= 500.0 ms" in report and "2000000 bytes" in report
    assert (tmp_path / "ttft_cdf.png").stat().st_size > 0
    assert (tmp_path / "morph-heuristic" / "timeline.png").stat().st_size > 0
    lines = (tmp_path / "fp" / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[0])["rep"] == 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--systems", "fp,turbo"], "offered: fp, static-int8, static-int4"),
        (["--trace", "azure-nope"], "azure-code, azure-conv"),
        (["--window", "9000:9100"], "outside trace"),
        (["--window", "ten:20"], "START:END"),
        (["--systems", "morph-rl", "--rl-checkpoint", "/no/such.zip"], "checkpoint"),
        (["--budget", "1MB"], "KV tokens"),
        (["--profile", "/no/such.json"], "--profile"),
        (["--resume", "/no/such/run"], "not a run directory"),
        (["--resume", "/tmp", "--out", "/tmp/x"], "not allowed with argument"),
        (["--reps", "two"], "invalid int value"),
        (["--window", "segments:600"], "use python -m eval.sweep --windows segments:600"),
        (["--window", "random:0:20"], "random:N:LEN[:SEED]"),
        (["--profile", "random:x"], "random or random:SEED"),
        (["--systems", "fp,static-k:9"], "K must be 0..5"),
        (["--systems", "fp,static-k:two"], "static-k:K for a fixed K"),
        (["--systems", "fp,static-k"], "add morph-heuristic to --systems"),
        (["--slo", "guess"], "invalid choice: 'guess'"),
    ],
)
def test_bad_input_fails_before_any_server(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Input the user must change: status 2 and one line, before any server starts."""

    def no_server(*_: object, **__: object) -> None:
        raise AssertionError("a server was started")

    monkeypatch.setattr(exe, "start_server", no_server)
    try:
        status = runmod.main(argv)
    except SystemExit as exit_:  # argparse's own checks
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and message in err
    assert len(err.strip().splitlines()) == 1, err


def test_malformed_trace_file_names_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,10,x\n")
    monkeypatch.setattr(exe, "start_server", None)
    assert runmod.main(["--trace", str(path)]) == 2
    assert f"{path}:2:" in capsys.readouterr().err


def _fake_server(*_: object) -> Server:
    return types.SimpleNamespace(url="http://127.0.0.1:1")  # type: ignore[return-value]


def _fake_servers(
    monkeypatch: pytest.MonkeyPatch, replay: object, started: list | None = None
) -> None:
    """Servers that start at once and replays that ``replay`` fills in."""

    def launch(plan: Plan, system: str, rep: int) -> Server:
        if started is not None:
            started.append((system, rep))
        return _fake_server()

    monkeypatch.setattr(exe, "launch", launch)
    monkeypatch.setattr(exe, "replay_system", replay)
    monkeypatch.setattr(exe, "stop_server", lambda server: None)


def test_interrupt_still_writes_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan(tmp_path, "fp,morph-heuristic")
    started: list = []

    def replay(plan: Plan, server: Server, run: SystemRun) -> None:
        run.records.extend(_records(0.1, 0.01)[:5])
        if run.system == "morph-heuristic":
            raise KeyboardInterrupt

    _fake_servers(monkeypatch, replay, started)
    assert exe.execute(plan) == 130
    assert started == [("fp", 0), ("morph-heuristic", 0)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert summary["systems"]["morph-heuristic"]["completed"] == 5
    assert "INTERRUPTED" in (tmp_path / "report.md").read_text()
    # Only the finished system-rep is kept for a resume; the interrupted one is replayed.
    assert (tmp_path / "fp" / "rep0.json").is_file()
    assert not (tmp_path / "morph-heuristic" / "rep0.json").exists()


def test_server_that_fails_is_marked_and_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(tmp_path, "fp,static-int4")
    _fake_quality(monkeypatch, [])

    def replay(plan: Plan, server: Server, run: SystemRun) -> None:
        run.records.extend(_records(0.1, 0.01))

    _fake_servers(monkeypatch, replay)

    def launch(plan: Plan, system: str, rep: int) -> Server:
        if system == "static-int4":
            raise ServerError("server exited with status 1\nlog tail")
        return _fake_server()

    monkeypatch.setattr(exe, "launch", launch)
    assert exe.execute(plan) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["systems"]) == ["fp"]
    reason = "server failed to start: server exited with status 1 (last log line: log tail)"
    assert summary["failures"] == [{"system": "static-int4", "rep": 0, "reason": reason}]
    report = (tmp_path / "report.md").read_text()
    assert "static-int4 rep 0 FAILED: server failed to start" in report


def test_rl_fallback_fails_the_rep_and_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A morph-rl rep whose policy fell back to the heuristic is the heuristic's result under
    the RL name: it is marked failed with the server's reason, and the run exits 1."""
    plan = _plan(tmp_path, "morph-heuristic,morph-rl")
    _fake_quality(monkeypatch, [])

    def replay(plan: Plan, server: Server, run: SystemRun) -> None:
        run.records.extend(_records(0.1, 0.01))
        run.state_start = {"transitions": 0, "fallbacks": 0}
        if run.system == "morph-rl":
            run.state_end = {"transitions": 0, "fallbacks": 7, "policy_loaded": False,
                             "fallback_reason": "checkpoint failed to load: bad zip"}  # fmt: skip
        else:
            run.state_end = {"transitions": 2, "fallbacks": 0}

    _fake_servers(monkeypatch, replay)
    assert exe.execute(plan) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    reason = "RL policy fell back to the heuristic on 7 ticks: checkpoint failed to load: bad zip"
    rl = summary["systems"]["morph-rl"]
    assert rl["failures"] == [{"rep": 0, "reason": reason}]
    assert rl["policy_loaded"] is False and rl["fallbacks"] == 7
    assert rl["per_rep"][0]["failure"] == reason
    assert summary["systems"]["morph-heuristic"]["failures"] == []
    assert summary["failures"] == [{"system": "morph-rl", "rep": 0, "reason": reason}]
    report = (tmp_path / "report.md").read_text()
    assert "| morph-rl (FAILED) |" in report and f"morph-rl rep 0 FAILED: {reason}" in report
    assert f"morph-rl rep 0 FAILED: {reason}" in capsys.readouterr().out


def test_policy_failure_reads_the_state() -> None:
    assert exe.policy_failure({"fallbacks": 0, "policy_loaded": True}) is None
    assert exe.policy_failure({"fallbacks": 0}) is None  # a server that does not say
    assert "could not be read" in exe.policy_failure(None)
    assert "not loaded" in exe.policy_failure({"fallbacks": 0, "policy_loaded": False})
    assert "on 2 ticks: nan" in exe.policy_failure({"fallbacks": 2, "fallback_reason": "nan"})


def test_no_fp_server_means_no_slo_and_a_clear_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(tmp_path, "static-int4")
    plan.slo = None  # the SLOs must be measured on an fp server, which fails
    plan.args.slo_ttft = None

    def launch(plan: Plan, system: str, rep: int) -> Server:
        raise ServerError("server exited with status 1")

    monkeypatch.setattr(exe, "launch", launch)
    assert exe.execute(plan) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["slo"] is None and summary["systems"] == {}
    assert "fp server needed to measure the SLOs" in summary["notes"][0]
    assert "SLO: not measured" in (tmp_path / "report.md").read_text()


def test_fp_goes_first_when_slos_are_measured(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "static-int4,fp")
    assert exe._order(plan, needs_calibration=True) == ["fp", "static-int4"]
    assert exe._order(plan, needs_calibration=False) == ["static-int4", "fp"]


def test_user_paths_reach_servers_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers run in another directory: a relative checkpoint must reach them absolute (or the
    RL policy silently never loads), and with no --port each server gets a free one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "policy.zip").write_bytes(b"not read here")
    args = runmod.build_parser().parse_args(
        ["--systems", "morph-rl", "--rl-checkpoint", "policy.zip", "--window", "0:5",
         "--slo-ttft", "1", "--slo-tpot", "1", "--out", "run"]
    )  # fmt: skip
    plan = runmod.make_plan(args)
    assert plan.out_dir == tmp_path / "run" and Path(plan.model_path).is_absolute()
    calls: list = []
    monkeypatch.setattr(exe, "start_server", lambda *a: calls.append(a))
    exe.launch(plan, "morph-rl", 0)
    model, port, flags, _log = calls[0]
    assert port is None and Path(model).is_absolute()
    assert flags[flags.index("--morph-checkpoint") + 1] == str(tmp_path / "policy.zip")
    default = runmod.build_parser().parse_args([])
    assert default.rl_checkpoint == str(DEFAULT_CHECKPOINT) and DEFAULT_CHECKPOINT.is_absolute()


def test_resume_replays_only_the_missing_system_reps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Interrupted during its second system, a run resumed with --resume replays only that
    system, leaves the first one's file untouched, and ends with the summary an uninterrupted
    run writes."""
    _fake_quality(monkeypatch, [])
    monkeypatch.setattr(runmod.signal, "signal", lambda *a: None)
    interrupt = {"static-int4"}
    started: list = []

    def replay(plan: Plan, server: Server, run: SystemRun) -> None:
        run.records.extend(_records(0.1 if run.system == "fp" else 0.05, 0.01))
        run.state_start = run.state_end = {"transitions": 0}
        if run.system in interrupt:
            raise KeyboardInterrupt

    _fake_servers(monkeypatch, replay, started)
    options = ["--window", "0:5", "--systems", "fp,static-int4", "--slo-ttft", "0.5",
               "--slo-tpot", "0.1"]  # fmt: skip
    run = tmp_path / "run"
    assert runmod.main([*options, "--out", str(run)]) == 130
    fp_file = (run / "fp" / "rep0.json").read_bytes()
    assert not (run / "static-int4" / "rep0.json").exists()
    plan = json.loads((run / "plan.json").read_text())
    assert plan["slo"]["ttft_s"] == 0.5 and plan["options"]["systems"] == "fp,static-int4"

    assert runmod.main(["--resume", str(run), "--systems", "fp"]) == 2
    assert "--systems 'fp' (saved: 'fp,static-int4')" in capsys.readouterr().err
    assert runmod.main([*options, "--out", str(run)]) == 2  # a fresh run may not overwrite it

    interrupt.clear()
    started.clear()
    assert runmod.main(["--resume", str(run), "--port", "31599", "--reps", "1"]) == 0
    assert started == [("static-int4", 0)]
    assert (run / "fp" / "rep0.json").read_bytes() == fp_file
    resumed = json.loads((run / "summary.json").read_text())

    whole = tmp_path / "whole"
    assert runmod.main([*options, "--out", str(whole)]) == 0
    expected = json.loads((whole / "summary.json").read_text())
    assert resumed["interrupted"] is False and set(resumed) == set(expected)
    assert list(resumed["systems"]) == list(expected["systems"]) == ["fp", "static-int4"]
    for name, row in expected["systems"].items():
        assert set(resumed["systems"][name]) == set(row)
        assert resumed["systems"][name]["per_rep"] == row["per_rep"]
    assert any("resumed: fp rep 0" in note for note in resumed["notes"])
    lines = (run / "static-int4" / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(line)["rep"] == 0 for line in lines)


async def _fake_generate(request: web.Request) -> web.StreamResponse:
    """SGLang's streamed /generate: cumulative chunks, then [DONE]; prompts of 13 tokens are
    refused and prompts of 14 tokens are aborted after one token."""
    body = await request.json()
    assert body["stream"] is True and body["sampling_params"]["ignore_eos"] is True
    if len(body["input_ids"]) == 13:
        return web.Response(status=500, text="boom")
    response = web.StreamResponse()
    await response.prepare(request)
    for n in range(1, body["sampling_params"]["max_new_tokens"] + 1):
        await asyncio.sleep(0.01)
        finish = {"type": "abort", "message": "no KV"} if len(body["input_ids"]) == 14 else None
        chunk = {"text": "x" * n, "meta_info": {"completion_tokens": n, "finish_reason": finish}}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if finish:
            break
    await response.write(b"data: [DONE]\n\n")
    return response


async def _fake_state(request: web.Request) -> web.Response:
    state = {"queue_len": 1, "running_reqs": 2, "quantized_layers": 1, "kv_capacity_tokens": 900,
             "kv_used_tokens": 10, "transitions": 1,
             "layers": [{"id": 0, "format": "fp"}, {"id": 1, "format": "int4"}]}  # fmt: skip
    return web.json_response(state)


async def _replay_against_fake(requests: list[TraceRequest]) -> tuple[list, list, float]:
    app = web.Application()
    app.router.add_post("/generate", _fake_generate)
    app.router.add_get("/morph/state", _fake_state)
    runner = web.AppRunner(app)
    await runner.setup()
    port = unused_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    prompts = [[5] * r.input_tokens for r in requests]
    replayer = Replayer(url, requests, prompts, request_timeout_s=5, progress=False)
    timeline: list = []
    t0 = time.perf_counter()
    poller = asyncio.create_task(poll_state(url, t0, timeline, interval_s=0.05))
    records = await replayer.run(t0)
    poller.cancel()
    await runner.cleanup()
    return records, timeline, time.perf_counter() - t0


def test_replay_streams_open_loop_and_records_errors() -> None:
    requests = [
        TraceRequest(0.0, 20, 5),
        TraceRequest(0.2, 13, 5),
        TraceRequest(0.2, 14, 5),
        TraceRequest(0.3, 20, 1),
    ]
    records, timeline, wall = asyncio.run(_replay_against_fake(requests))
    ok, refused, aborted, single = records
    assert ok.ok and ok.output_tokens == 5 and ok.error is None
    assert 0.005 < ok.ttft_s < 1 and ok.tpot_s == pytest.approx((ok.e2e_s - ok.ttft_s) / 4)
    assert refused.error.startswith("HTTP 500") and not refused.ok
    assert aborted.error == "server error: no KV" and not aborted.ok
    assert single.ok and single.tpot_s is None
    assert [r.sent_s >= r.arrival_s for r in records] == [True] * 4  # sent on schedule
    assert all(r.sent_s - r.arrival_s < 0.1 for r in records)
    assert wall < 2
    assert timeline and timeline[0]["formats"] == {"1": "int4"}
    assert timeline[0]["kv_capacity_tokens"] == 900


class _Hanging(BaseHTTPRequestHandler):
    """A server whose scheduler died: requests are accepted and never answered."""

    release = threading.Event()

    def do_POST(self) -> None:
        self.release.wait(30)

    def do_GET(self) -> None:
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _ExitingProc:
    """A launcher process that exits with status -9 ``after_s`` from now."""

    def __init__(self, after_s: float) -> None:
        self.exits_at = time.monotonic() + after_s

    def poll(self) -> int | None:
        return -9 if time.monotonic() >= self.exits_at else None


def test_replay_ends_as_soon_as_its_server_exits() -> None:
    """Not after the request timeout: the rep fails with the exit status and the log line that
    says why (not SGLang's clean-up after it); the requests in flight fail, no more are sent."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Hanging)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    log = (
        "[t] Decode batch, #running-req: 2\n[t] Subprocess scheduler_0 (pid=7) crashed with "
        "exit code -9. Triggering SIGQUIT for cleanup...\n[t] SIGQUIT received. It usually "
        "means one child failed.\n[t] Sleeping 5 seconds before crash diagnostics to let GPU "
        "activity settle.\n[t] kill_process_tree called\n"
    )  # SGLang 0.5.23's, abridged
    server = types.SimpleNamespace(
        url=f"http://127.0.0.1:{httpd.server_address[1]}",
        proc=_ExitingProc(0.5),
        tail=lambda lines=40: log,
    )
    requests = (TraceRequest(0.0, 5, 5), TraceRequest(0.1, 5, 5), TraceRequest(60.0, 5, 5))
    plan = types.SimpleNamespace(
        trace=types.SimpleNamespace(requests=requests),
        prompts=[[5] * 5] * 3,
        args=types.SimpleNamespace(request_timeout=120.0),
    )
    run = SystemRun("fp", 0)
    started = time.monotonic()
    try:
        exe.replay_system(plan, server, run)  # type: ignore[arg-type]
    finally:
        _Hanging.release.set()
        httpd.shutdown()
    assert time.monotonic() - started < 5
    assert run.failure == (
        "server exited with status -9 during the replay: [t] Subprocess "
        "scheduler_0 (pid=7) crashed with exit code -9. Triggering SIGQUIT "
        "for cleanup..."
    )
    assert len(run.records) == 2 and not any(r.ok for r in run.records)  # the 3rd: never sent


FAKE_LAUNCHER = """
import argparse, http.server, subprocess, sys
p = argparse.ArgumentParser()
p.add_argument("--port", type=int)
p.add_argument("--mode")
a, _ = p.parse_known_args()
if a.mode == "crash":
    print("model load failed: boom", flush=True)
    sys.exit(3)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("child", child.pid, flush=True)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", a.port), Health).serve_forever()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_server_lifecycle_reaches_the_whole_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fake_launcher.py").write_text(FAKE_LAUNCHER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(servers, "LAUNCHER", "fake_launcher")
    log = tmp_path / "ok" / "server.log"
    server = start_server("model", unused_port(), ["--mode", "ok"], log, health_timeout_s=30)
    child = int(log.read_text().split("child ")[1].split()[0])
    assert _alive(child)
    stop_server(server, grace_s=5)
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.proc.poll() is not None and not _alive(child)

    with pytest.raises(ServerError, match="status 3") as info:
        start_server("model", unused_port(), ["--mode", "crash"], tmp_path / "crash.log")
    assert "boom" in str(info.value)


@pytest.mark.slow
def test_end_to_end_against_real_servers(tmp_path: Path) -> None:
    """A short, light window replayed to fp and static-k:2 servers (each on a free port, both
    with the shipped LIS profile and the fixed SLOs): every request completes, and static-k:2
    served the profile's first two layers in int4 (swapped before the replay). Static-int4
    end to end: test_resume_after_the_harness_is_killed and tests/test_lifecycle.py."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "eval.run", "--trace", "azure-code", "--window", "0:20",
        "--time-scale", "1", "--systems", "fp,static-k:2", "--out", str(out),
        "--request-timeout", "60",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trace"]["requests"] > 0 and summary["slo"]["ttft_s"] > 0
    for name in ("fp", "static-k:2"):
        row = summary["systems"][name]
        assert SYSTEM_FIELDS <= set(row)
        assert row["failed"] == 0 and row["completed"] == summary["trace"]["requests"]
        assert row["per_rep"][0]["send_lag_p99_s"] is not None
    assert summary["systems"]["fp"]["quantized_layers_at_start"] == 0
    assert summary["systems"]["static-k:2"]["quantized_layers_at_start"] == 2
    assert summary["systems"]["static-k:2"]["transitions"] == 0  # nothing moved during the replay
    state = json.loads((out / "static-k:2" / "rep0.json").read_text())["state_start"]
    lis = json.loads((REPO / "checkpoints/profiles/stories260K-int4.json").read_text())
    quantized = {x["id"] for x in state["layers"] if x["format"] == "int4"}
    assert quantized == set(lis["layer_order"][:2])  # the first two of the shipped LIS order
    assert summary["slo"]["how"].startswith("fixed: eval/slos.json")
    assert summary["profile"].startswith("lis (shipped")
    assert (out / "report.md").exists() and (out / "ttft_cdf.png").exists()
    # Served tokens judged by the fp model: what fp served costs nothing, int4 layers' do.
    served = {name: summary["systems"][name]["served_quality"] for name in ("fp", "static-k:2")}
    assert served["fp"]["kl"] == 0.0 and served["static-k:2"]["kl"] > 0
    assert served["static-k:2"]["tokens"] > 0 and served["fp"]["sampled"] > 0
    assert "Quality of what was served" in (out / "report.md").read_text()


def _harness_diagnosis(proc: subprocess.Popen, stderr_path: Path, system_dir: Path) -> str:
    """Why the first system-rep never came: the harness's state, its stderr and its server's log."""
    logs = sorted(system_dir.glob("server-rep*.log"))
    server_log = logs[0].read_text(errors="replace")[-3000:] if logs else "(no server log)"
    return (
        f"the first system-rep never finished (harness exit {proc.poll()});\n"
        f"harness stderr:\n{stderr_path.read_text(errors='replace')[-3000:]}\n"
        f"server log:\n{server_log}"
    )


@pytest.mark.slow
def test_resume_after_the_harness_is_killed(tmp_path: Path) -> None:
    """The harness is killed outright (SIGKILL: no cleanup of its own runs) as soon as its first
    system-rep is on disk; --resume replays the second system only and completes the run."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "eval.run", "--trace", "azure-code", "--window", "0:10",
        "--time-scale", "1", "--systems", "fp,static-int4", "--out", str(out),
        "--slo-ttft", "1", "--slo-tpot", "0.2", "--request-timeout", "60",
    ]  # fmt: skip
    first = out / "fp" / "rep0.json"
    stderr_path = tmp_path / "harness.stderr"  # a file, not a pipe nobody reads while it runs
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 600
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.exists(), _harness_diagnosis(proc, stderr_path, out / "fp")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    fp_file = first.read_bytes()
    assert (
        not (out / "summary.json").exists()
        or "static-int4" not in json.loads((out / "summary.json").read_text())["systems"]
    )

    resume = [sys.executable, "-m", "eval.run", "--resume", str(out)]
    done = subprocess.run(resume, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert first.read_bytes() == fp_file
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is False and summary["failures"] == []
    for name in ("fp", "static-int4"):
        row = summary["systems"][name]
        assert SYSTEM_FIELDS <= set(row)
        assert row["failed"] == 0 and row["completed"] == summary["trace"]["requests"]
    assert "starting fp" not in done.stderr and "starting static-int4" in done.stderr


def _lagged(records: list[RequestRecord], lag_s: float) -> list[RequestRecord]:
    for r in records:
        r.sent_s = r.arrival_s + lag_s
    return records


def test_reps_give_intervals_ratios_per_pair_and_flag_lagging_reps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_quality(monkeypatch, [])
    plan = _plan(tmp_path, "fp,static-int4,morph-heuristic", "--reps", "3")
    runs = {
        "fp": [SystemRun("fp", r, _records(0.4 + 0.2 * r, 0.05, failed=2)) for r in range(3)],
        "static-int4": [SystemRun("static-int4", r, _records(0.2, 0.05)) for r in range(3)],
        "morph-heuristic": [
            SystemRun("morph-heuristic", 0, _records(0.1, 0.05)),
            SystemRun("morph-heuristic", 1, _records(0.3, 0.05, failed=1)),
            SystemRun("morph-heuristic", 2, _lagged(_records(0.1, 0.05), 0.08)),
        ],
    }
    summary = exe.finish(plan, runs, [], [], False)
    morph = summary["systems"]["morph-heuristic"]
    assert [r["valid"] for r in morph["per_rep"]] == [True, True, False]
    assert morph["per_rep"][2]["send_lag_p99_s"] == pytest.approx(0.08)
    assert "80.0 ms > 50 ms" in morph["per_rep"][2]["invalid"]
    assert summary["invalid_reps"] == [
        {"system": "morph-heuristic", "rep": 2, "reason": morph["per_rep"][2]["invalid"]}
    ]
    # Mean and interval over the two valid reps only: violations 0 and 1/8.
    assert morph["valid_reps"] == 2
    assert morph["mean"]["slo_violation_rate"] == pytest.approx(1 / 16)
    lo, hi = morph["ci95"]["slo_violation_rate"]
    assert lo == pytest.approx(1 / 16 - 12.7062 * (0.125 / 2**0.5) / 2**0.5)
    assert hi == pytest.approx(1 / 16 + 12.7062 * (0.125 / 2**0.5) / 2**0.5)
    fp = summary["systems"]["fp"]
    assert fp["ci95"]["ttft_p95_s"][0] < fp["mean"]["ttft_p95_s"] == pytest.approx(0.6)
    # Pooled rates per second are over the reps' summed wall time, not one rep's.
    per_rep = [r["throughput_tok_s"] for r in fp["per_rep"]]
    assert min(per_rep) <= fp["throughput_tok_s"] <= max(per_rep)
    assert fp["wall_s"] == pytest.approx(sum(r["wall_s"] for r in fp["per_rep"]))
    # Ratios per rep pair: fp's p95 TTFT 0.4 and 0.6 against morph's 0.1 and 0.3.
    vs = summary["vs_fp"]["morph-heuristic"]
    assert [r["rep"] for r in vs["per_rep"]] == [0, 1] and vs["n"] == 2
    assert [r["p95_ttft_speedup"] for r in vs["per_rep"]] == pytest.approx([4.0, 2.0])
    assert vs["mean"]["p95_ttft_speedup"] == pytest.approx(3.0)
    # Violations: fp 2/8 and 8/8 (TTFT 0.6 > 0.5), morph 0 and 1/8: (100% + 87.5%) / 2.
    assert vs["mean"]["violation_reduction_pct"] == pytest.approx(93.75)
    assert summary["vs_fp"]["static-int4"]["mean"]["quality_cost_vs_static_int4"] == 1.0

    report = (tmp_path / "report.md").read_text()
    assert "Repetitions: 3, means with 95% t intervals" in report
    assert "morph-heuristic rep 2 INVALID: client send lag p99 80.0 ms" in report
    assert (
        "| morph-heuristic | 2 | +93.8% [+14.3%, +173.2%] | 3.00x [-9.71x, 15.71x] | - |" in report
    )
    assert "morph-heuristic rep 2: p99 80.0 ms, max 80.0 ms INVALID" in report

    one = build_summary(_plan(tmp_path / "one", "fp"), {"fp": runs["fp"][:1]}, False)
    assert one["systems"]["fp"]["ci95"]["slo_violation_rate"] is None
    assert "Repetitions: 1 (one rep: intervals from resampling requests only)" in markdown(one)


def test_one_rep_gets_intervals_from_resampling_its_requests(tmp_path: Path) -> None:
    """The main job runs one rep: its figures still come with a 95% interval, from resampling
    the requests every system served (the same draw for fp and morph, so a ratio's interval
    is of paired requests), and the report and console say which interval it is."""
    import io

    from rich.console import Console

    from eval.bootstrap import DRAWS
    from eval.report import print_table

    fp = _records(0.05, 0.01)
    for r in fp[:4]:
        r.ttft_s = 0.8  # half of fp's requests miss the 0.5-s TTFT SLO
    morph = _records(0.05, 0.01)
    morph[0].ttft_s = 0.8  # morph misses one, and it is one that fp missed too
    runs = {"fp": [SystemRun("fp", 0, fp)],
            "morph-heuristic": [SystemRun("morph-heuristic", 0, morph)]}
    summary = build_summary(_plan(tmp_path, "fp,morph-heuristic"), runs, False)
    assert summary["bootstrap_draws"] == DRAWS
    lo, hi = summary["systems"]["fp"]["ci95_requests"]["slo_violation_rate"]
    assert lo < 0.5 < hi and 0.0 <= lo and hi <= 1.0
    lo, hi = summary["systems"]["morph-heuristic"]["ci95_requests"]["slo_violation_rate"]
    assert lo == 0.0 and 0.125 < hi < 0.5
    red_lo, red_hi = summary["vs_fp"]["morph-heuristic"]["ci95_requests"]["violation_reduction_pct"]
    assert red_lo < 75.0 < red_hi <= 100.0  # pooled: (4 - 1) / 4
    speed = summary["vs_fp"]["morph-heuristic"]["ci95_requests"]["p95_ttft_speedup"]
    assert speed[0] >= 1.0  # in every resample morph's P95 is at most fp's
    assert "resamples of its requests" in markdown(summary)
    out = io.StringIO()
    print_table(summary, Console(file=out, width=200))
    assert "morph-heuristic vs fp: SLO violations +75.0% [" in out.getvalue()


def test_static_k_searches_the_smallest_k_then_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """static-k bisects K on rep 0 (K=2 reaches morph-heuristic's 25% violations, K=1 does
    not), keeps the K=2 try as rep 0's result, saves K in the plan, and runs rep 1 at K=2."""
    _fake_quality(monkeypatch, [])
    plan = _plan(tmp_path, "fp,static-k,morph-heuristic", "--reps", "2")
    swaps: list = []
    started: list = []

    def replay(plan: Plan, server: Server, run: SystemRun) -> None:
        failed = {"fp": 4, "morph-heuristic": 2}.get(run.system, max(0, 4 - (plan.static_k or 0)))
        run.records.extend(_records(0.1, 0.01, failed=failed))

    _fake_servers(monkeypatch, replay, started)
    monkeypatch.setattr(exe, "quantize_first", lambda url, k: swaps.append(k))
    assert exe.execute(plan) == 0
    assert started == [("fp", 0), ("morph-heuristic", 0), ("static-k", 0), ("static-k", 0),
                       ("fp", 1), ("morph-heuristic", 1), ("static-k", 1)]  # fmt: skip
    assert swaps == [2, 1, 2]
    assert json.loads((tmp_path / "plan.json").read_text())["static_k"] == 2
    kept = json.loads((tmp_path / "static-k" / "rep0.json").read_text())
    assert sum(r["error"] is not None for r in kept["records"]) == 2  # the K=2 try
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["systems"]) == ["fp", "morph-heuristic", "static-k"]
    row = summary["systems"]["static-k"]
    assert row["k"] == 2 and row["slo_violation_rate"] == 0.25
    assert any("static-k: K=2, the smallest K" in n and "K=1: 37.5%" in n for n in summary["notes"])
    assert exe._order(plan, False) == ["fp", "morph-heuristic", "static-k"]
    assert "| static-k (K=2) | 12 | 4 |" in (tmp_path / "report.md").read_text()


def test_static_k_fixed_k_swaps_before_the_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(tmp_path, "static-k:3")
    assert servers.system_flags("static-k:3", 100, "x")[:2] == ["--morph-policy", "manual"]
    order: list = []

    def replay(plan: Plan, server: Server, run: SystemRun) -> None:
        order.append("replay")
        run.records.extend(_records(0.1, 0.01))

    _fake_servers(monkeypatch, replay)
    monkeypatch.setattr(exe, "quantize_first", lambda url, k: order.append(("swap", k)))
    _fake_quality(monkeypatch, [])
    assert exe.execute(plan) == 0
    assert order == [("swap", 3), "replay"]
    assert json.loads((tmp_path / "summary.json").read_text())["systems"]["static-k:3"]["k"] == 3

    def refused(url: str, k: int) -> None:
        raise RuntimeError("did not settle")

    monkeypatch.setattr(exe, "quantize_first", refused)
    assert exe.execute(_plan(tmp_path / "again", "static-k:3")) == 1
    failures = json.loads((tmp_path / "again" / "summary.json").read_text())["failures"]
    assert failures[0]["reason"].startswith("static-k: swapping the first 3 layers to int4")


def _make(tmp_path: Path, *argv: str) -> Plan:
    args = runmod.build_parser().parse_args(
        ["--window", "0:5", "--out", str(tmp_path / "run"), *argv]
    )
    return runmod.make_plan(args)


def test_profile_defaults_to_the_shipped_lis_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = _make(tmp_path)
    assert shipped.profile_name == "lis (shipped checkpoints/profiles/stories260K-int4.json)"
    assert shipped.profile_path == str(REPO / "checkpoints/profiles/stories260K-int4.json")
    lis = json.loads((REPO / "checkpoints/profiles/stories260K-int4.json").read_text())
    assert shipped.profile["layer_order"] == lis["layer_order"]
    calls: list = []
    monkeypatch.setattr(exe, "start_server", lambda *a: calls.append(a))
    exe.launch(shipped, "fp", 0)
    flags = calls[0][2]
    assert flags[flags.index("--morph-profile") + 1] == shipped.profile_path

    last = _make(tmp_path, "--profile", "last_to_first")
    assert last.profile["layer_order"] == [4, 3, 2, 1, 0]
    assert last.profile_path == str(tmp_path / "run" / "profile.json")
    first = _make(tmp_path, "--profile", "random:3")
    assert sorted(first.profile["layer_order"]) == [0, 1, 2, 3, 4]
    assert (
        _make(tmp_path, "--profile", "random:3").profile["layer_order"]
        == first.profile["layer_order"]
    )
    assert first.profile_name.startswith("random (seed 3)")

    def replay(plan: Plan, server: Server, run: SystemRun) -> None:
        run.records.extend(_records(0.1, 0.01))

    _fake_servers(monkeypatch, replay)
    _fake_quality(monkeypatch, [])
    assert exe.execute(first) == 0
    written = json.loads((tmp_path / "run" / "profile.json").read_text())
    assert written["layer_order"] == first.profile["layer_order"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["profile"] == first.profile_name
    assert "Layer order (profile): random (seed 3)" in (tmp_path / "run" / "report.md").read_text()


def test_slos_are_fixed_per_model_and_machine_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = json.loads(planmod.SLO_FILE.read_text())
    entry = table["stories260K"][planmod.machine_kind()]
    fixed = _make(tmp_path)
    assert (fixed.slo.ttft_s, fixed.slo.tpot_s) == (entry["ttft_s"], entry["tpot_s"])
    assert fixed.slo.how.startswith(
        f"fixed: eval/slos.json entry stories260K/{planmod.machine_kind()}"
    )
    assert not fixed.slo_measured
    doubled = _make(tmp_path, "--slo-scale", "2", "--slo-ttft", "0.3")
    assert (doubled.slo.ttft_s, doubled.slo.tpot_s) == (0.3, 2 * entry["tpot_s"])
    assert "the other SLO given on the command line" in doubled.slo.how
    measured = _make(tmp_path, "--slo", "measure")
    assert measured.slo is None and measured.slo_measured
    assert exe._order(measured, measured.slo_measured) == ["fp", "static-int4", "morph-heuristic"]

    monkeypatch.setattr(planmod, "machine_kind", lambda: "tpu-64core")
    unknown = _make(tmp_path)
    assert unknown.slo is None and unknown.slo_measured
    assert unknown.notes == [
        "no fixed SLOs for stories260K on tpu-64core in eval/slos.json: measured on the "
        "unloaded fp server instead"
    ]


def test_windows_beyond_the_burstiest(tmp_path: Path) -> None:
    windows, how = parse_windows("segments:600", 3600.0)
    assert windows == [(600.0 * i, 600.0 * (i + 1)) for i in range(6)]
    assert how == "6 consecutive 600-s segments of the whole trace"
    held, how = parse_windows("segments:600", 3600.0, [10.0, 700.0, 3000.0])
    assert held == [(0.0, 600.0), (600.0, 1200.0), (3000.0, 3600.0)]  # 3000 opens the last
    assert how.endswith(", 3 without requests left out")
    drawn, how = parse_windows("random:3:20:1", 3600.0)
    assert (
        drawn
        == parse_windows("random:3:20:1", 3600.0)[0]
        != parse_windows("random:3:20", 3600.0)[0]
    )
    assert len(drawn) == 3 and all(e - s == pytest.approx(20) and 0 <= s <= 3580 for s, e in drawn)
    assert how == "3 random windows of 20 s (seed 1)"
    one = _make(tmp_path, "--window", "random:1:20:4")
    lo, hi = one.trace.meta["window"]
    assert hi - lo == pytest.approx(20) and lo >= 0
    assert one.trace.meta["window_how"] == "1 random window of 20 s holding requests (seed 4)"
    assert one.trace.requests  # seed 4's first draw (3221 s) holds none: drawn again


def test_a_plan_saved_before_fixed_slos_resumes_as_it_ran(tmp_path: Path) -> None:
    """A run directory written before fixed SLOs and the LIS default measured its SLOs and
    quantized last to first: resuming it keeps doing so."""
    plan = _make(tmp_path)
    saved = plan_json(plan)
    for key in ("slo_measured", "profile", "static_k", "notes"):
        saved.pop(key)
    saved["options"].pop("slo")
    saved["slo"] = None
    run_dir.save_plan(plan.out_dir, saved)
    args = runmod.build_parser().parse_args(["--resume", str(plan.out_dir)])
    resumed = resume_plan(args, {"resume"})
    assert resumed.args.slo == "measure" and resumed.slo is None and resumed.slo_measured
    assert resumed.profile_name == "last_to_first"
    assert resumed.profile["layer_order"] == [4, 3, 2, 1, 0]
