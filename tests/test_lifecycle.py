"""Servers end with whoever started them, however that owner ends, and a harness notices when
its server ends first.

The harness is killed with SIGKILL while its server is serving (no cleanup code of the harness
runs); within 10 s no process of that server is left and its port can be bound again, so the
next run on the same port can start. And when a server's scheduler is killed mid-replay, SGLang's
launcher exits and the harness fails that system-rep at once, with the reason, instead of
waiting for every request in flight to time out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sglang_morph.client import MorphClient
from sglang_morph.server_process import free_port, port_is_free, process_tree

REPO = Path(__file__).resolve().parent.parent


def _processes_with(fragment: str) -> list[int]:
    """Pids whose command line contains ``fragment``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if fragment in cmd:
            found.append(int(pid))
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: a killed process whose parent has not reaped it yet (a zombie)
    holds no memory, port or core."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_killed_harness_leaves_no_server_and_the_port_works_again(tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "eval.run", "--window", "0:30", "--time-scale", "1",
           "--systems", "fp", "--port", str(port), "--out", str(tmp_path / "run"),
           "--slo-ttft", "1", "--slo-tpot", "0.2"]
    harness = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    client = MorphClient(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 300
        while not client.health() and time.monotonic() < deadline:
            assert harness.poll() is None, "the harness ended before its server was up"
            time.sleep(0.5)
        assert client.health(), "the harness's server never became healthy"
        launchers = _processes_with(f"launch_server --host 127.0.0.1 --port {port}")
        assert len(launchers) == 1, f"expected one launcher on port {port}, found {launchers}"
        server_pids = process_tree(launchers[0])
        assert len(server_pids) >= 3, "launcher, scheduler and detokenizer expected"
        harness.send_signal(signal.SIGKILL)
        harness.wait(timeout=10)
        deadline = time.monotonic() + 10
        while (any(map(_alive, server_pids)) or not port_is_free(port)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.2)
        assert port_is_free(port)  # a new server can bind it
        assert [pid for pid in server_pids if _alive(pid)] == []
    finally:
        harness.kill()
        harness.wait()


def _scheduler_of(port: int) -> int:
    """The pid of the SGLang scheduler serving ``port`` (it names itself sglang::scheduler)."""
    launchers = _processes_with(f"launch_server --host 127.0.0.1 --port {port}")
    assert len(launchers) == 1, f"expected one launcher on port {port}, found {launchers}"
    for pid in process_tree(launchers[0]):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"sglang::scheduler"):
            return pid
    raise AssertionError(f"no scheduler process below launcher {launchers[0]}")


def test_dead_server_fails_its_system_rep_and_the_next_system_runs(tmp_path: Path) -> None:
    port = free_port()
    request_timeout = 600
    out = tmp_path / "run"
    # 12 s of arrivals (12 requests), each decoding 150 tokens: requests are in flight throughout.
    cmd = [sys.executable, "-m", "eval.run", "--window", "0:12", "--time-scale", "1",
           "--output-min", "150", "--systems", "fp,static-int4", "--port", str(port),
           "--out", str(out), "--slo-ttft", "1", "--slo-tpot", "0.2",
           "--request-timeout", str(request_timeout)]
    with open(tmp_path / "harness.log", "wb") as log:
        harness = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    client = MorphClient(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # the fp server serves its replay (after health:
            assert harness.poll() is None, "the harness ended before the fp replay"
            state = client.try_state() if client.health() else None  # not SGLang's warm-up)
            if state is not None and state["running_reqs"] > 0:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the fp replay never started")
        os.kill(_scheduler_of(port), signal.SIGKILL)
        killed = time.monotonic()
        while b"starting static-int4" not in (tmp_path / "harness.log").read_bytes():
            assert harness.poll() is None and time.monotonic() - killed < 60, (
                "the harness did not go on to the next system within 60 s of the kill")
            time.sleep(0.2)
        status = harness.wait(timeout=request_timeout)
        elapsed = time.monotonic() - killed
    finally:
        harness.kill()
        harness.wait()
    summary = json.loads((out / "summary.json").read_text())
    assert status == 1, (tmp_path / "harness.log").read_text()[-3000:]
    assert elapsed < request_timeout / 3, elapsed  # static-int4's start and replay, mostly
    [failure] = summary["failures"]
    assert failure["system"] == "fp" and failure["rep"] == 0
    assert failure["reason"].startswith("server exited with status "), failure
    assert " during the replay: " in failure["reason"] and "crashed" in failure["reason"]
    static = summary["systems"]["static-int4"]
    assert static["failures"] == [] and static["completed"] == summary["trace"]["requests"]
