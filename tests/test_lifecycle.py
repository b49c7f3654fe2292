"""Servers end with whoever started them, however that owner ends.

The harness is killed with SIGKILL while its server is serving (no cleanup code of the harness
runs); within 10 s no process of that server is left and its port is free, so the next run on
the same port starts and serves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sglang_morph.client import MorphClient
from sglang_morph.server_process import Server, free_port, port_is_free

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


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (SGLang's scheduler and detokenizer rename
    themselves, so they are found by parentage, not by command line)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


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
        server_pids = _descendants(launchers[0])
        assert len(server_pids) >= 3, "launcher, scheduler and detokenizer expected"
        harness.send_signal(signal.SIGKILL)
        harness.wait(timeout=10)
        deadline = time.monotonic() + 10
        while (any(map(_alive, server_pids)) or not port_is_free(port)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.2)
        assert port_is_free(port)
        assert [pid for pid in server_pids if _alive(pid)] == []
    finally:
        harness.kill()
        harness.wait()

    server = Server(["--morph-policy", "off"], port=port)
    try:
        assert server.client.generate("Once upon a time", 8)
    finally:
        server.stop()
