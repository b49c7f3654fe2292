"""eval.run: outputs on synthetic results, input errors before any server, interrupts, and
(slow) a real end-to-end replay against sglang_morph servers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import unused_port

from eval import run as runmod
from eval import servers
from eval.metrics import Slo
from eval.replay import Replayer, RequestRecord
from eval.report import comparisons
from eval.servers import poll_state, start_server, stop_server
from eval.traces import Trace, TraceRequest
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


def _plan(tmp_path: Path, systems: str, *extra: str) -> runmod.Plan:
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
    return runmod.Plan(
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

    module = types.ModuleType("eval.quality")
    module.evaluate_formats = evaluate_formats  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "eval.quality", module)


def test_outputs_on_synthetic_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    _fake_quality(monkeypatch, calls)
    plan = _plan(tmp_path, "fp,static-int4,morph-heuristic")
    slo = Slo(0.5, 0.1, "absolute")
    fp = runmod.SystemRun("fp", 0, _records(1.0, 0.05, failed=2), [{"t": 0.0, "formats": {}}])
    fp.state_start, fp.state_end = {"transitions": 0}, {"transitions": 0}
    static = runmod.SystemRun("static-int4", 0, _records(0.2, 0.05))  # no timeline: nominal
    timeline = [
        {"t": 0.0, "formats": {}, "queue_len": 0, "running_reqs": 0, "quantized_layers": 0,
         "kv_capacity_tokens": 768, "kv_used_tokens": 0},
        {"t": 2.0, "formats": {"4": "int4"}, "queue_len": 3, "running_reqs": 2,
         "quantized_layers": 1, "kv_capacity_tokens": 900, "kv_used_tokens": 500},
    ]  # fmt: skip
    morph = runmod.SystemRun("morph-heuristic", 0, _records(0.25, 0.05), timeline)
    morph.state_start, morph.state_end = {"transitions": 1}, {"transitions": 3}
    runs = {"fp": [fp], "static-int4": [static], "morph-heuristic": [morph]}

    cache: dict = {}
    notes: list[str] = []
    quality = {s: runmod.system_quality(plan, s, r, cache, notes) for s, r in runs.items()}
    assert quality["fp"][:2] == (3.5, 0.0)  # fp: k = 0 and KL forced to 0
    assert quality["static-int4"][0] == pytest.approx(4.0)
    assert 3.5 < quality["morph-heuristic"][0] < 3.6
    assert {} in calls and {4: "int4"} in calls and {i: "int4" for i in range(5)} in calls
    assert len(calls) == len(cache) == 3  # fp, all-int4, one layer: each computed once

    summary = runmod.build_summary(plan, slo, runs, False, quality, notes)
    runmod.write_outputs(plan, summary, runs, figures=True)

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
    ],
)
def test_bad_input_fails_before_any_server(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def no_server(*_: object, **__: object) -> None:
        raise AssertionError("a server was started")

    monkeypatch.setattr(runmod, "start_server", no_server)
    assert runmod.main(argv) == 2
    assert message in capsys.readouterr().err


def test_malformed_trace_file_names_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,10,x\n")
    monkeypatch.setattr(runmod, "start_server", None)
    assert runmod.main(["--trace", str(path)]) == 2
    assert f"{path}:2:" in capsys.readouterr().err


def test_interrupt_still_writes_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan(tmp_path, "fp,morph-heuristic")
    started: list[str] = []

    def launch(plan: runmod.Plan, system: str, rep: int, slo: Slo | None) -> Server:
        started.append(system)
        return types.SimpleNamespace(url="http://127.0.0.1:1")  # type: ignore[return-value]

    def replay(plan: runmod.Plan, server: Server, run: runmod.SystemRun) -> None:
        run.records.extend(_records(0.1, 0.01)[:5])
        if run.system == "morph-heuristic":
            raise KeyboardInterrupt

    monkeypatch.setattr(runmod, "launch", launch)
    monkeypatch.setattr(runmod, "replay_system", replay)
    monkeypatch.setattr(runmod, "stop_server", lambda server: None)
    assert runmod.execute(plan) == 130
    assert started == ["fp", "morph-heuristic"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert summary["systems"]["morph-heuristic"]["completed"] == 5
    assert "INTERRUPTED" in (tmp_path / "report.md").read_text()


def test_server_that_fails_is_noted_and_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(tmp_path, "fp,static-int4")
    _fake_quality(monkeypatch, [])

    def launch(plan: runmod.Plan, system: str, rep: int, slo: Slo | None) -> Server:
        if system == "static-int4":
            raise ServerError("server exited with status 1\nlog tail")
        return types.SimpleNamespace(url="http://127.0.0.1:1")  # type: ignore[return-value]

    def replay(plan: runmod.Plan, server: Server, run: runmod.SystemRun) -> None:
        run.records.extend(_records(0.1, 0.01))

    monkeypatch.setattr(runmod, "launch", launch)
    monkeypatch.setattr(runmod, "replay_system", replay)
    monkeypatch.setattr(runmod, "stop_server", lambda server: None)
    assert runmod.execute(plan) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["systems"]) == ["fp"]
    assert any("static-int4 rep 0: server failed to start" in n for n in summary["notes"])


def test_no_fp_server_means_no_slo_and_a_clear_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(tmp_path, "static-int4")
    plan.args.slo_ttft = None  # the SLOs must be measured on an fp server, which fails

    def launch(plan: runmod.Plan, system: str, rep: int, slo: Slo | None) -> Server:
        raise ServerError("server exited with status 1")

    monkeypatch.setattr(runmod, "launch", launch)
    assert runmod.execute(plan) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["slo"] is None and summary["systems"] == {}
    assert "fp server needed to measure the SLOs" in summary["notes"][0]
    assert "SLO: not measured" in (tmp_path / "report.md").read_text()


def test_fp_goes_first_when_slos_are_measured(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "static-int4,fp")
    assert runmod._order(plan, needs_calibration=True) == ["fp", "static-int4"]
    assert runmod._order(plan, needs_calibration=False) == ["static-int4", "fp"]


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
    """A short, light window replayed to fp and static-int4 servers: every request completes."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "eval.run", "--trace", "azure-code", "--window", "0:20",
        "--time-scale", "1", "--systems", "fp,static-int4", "--out", str(out), "--port", "31590",
        "--request-timeout", "60",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trace"]["requests"] > 0 and summary["slo"]["ttft_s"] > 0
    for name in ("fp", "static-int4"):
        row = summary["systems"][name]
        assert SYSTEM_FIELDS <= set(row)
        assert row["failed"] == 0 and row["completed"] == summary["trace"]["requests"]
    assert summary["systems"]["static-int4"]["quantized_layers_at_start"] == 5
    assert (out / "report.md").exists() and (out / "ttft_cdf.png").exists()
