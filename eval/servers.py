"""One server configuration per evaluated system: start it, wait for health, watch it, stop it.

Each system runs as its own ``python -m sglang_morph.launch_server`` subprocess with the same
model and the same memory budget, one after another, so that systems never compete for the
machine's cores and a crash in one cannot leak state into the next.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

REPO_ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = "sglang_morph.launch_server"
DEFAULT_RL_CHECKPOINT = "checkpoints/morph-ppo.zip"

SYSTEMS = ("fp", "static-int8", "static-int4", "morph-heuristic", "morph-rl")
"""The systems offered, in the order reports list them."""

TIMELINE_FIELDS = (
    "queue_len",
    "running_reqs",
    "quantized_layers",
    "kv_capacity_tokens",
    "kv_used_tokens",
)


class ServerError(RuntimeError):
    """A server that did not become healthy; the message carries its log tail."""


def system_flags(system: str, budget_bytes: int, rl_checkpoint: str) -> list[str]:
    """Launcher flags of ``system``; all systems share ``--morph-memory-budget``."""
    flags = {
        "fp": ["--morph-policy", "off"],
        "static-int8": ["--morph-static-format", "int8"],
        "static-int4": ["--morph-static-format", "int4"],
        "morph-heuristic": ["--morph-policy", "heuristic"],
        "morph-rl": ["--morph-policy", "rl", "--morph-checkpoint", rl_checkpoint],
    }
    if system not in flags:
        raise ValueError(f"unknown system {system!r}; offered: {', '.join(SYSTEMS)}")
    return flags[system] + ["--morph-memory-budget", str(budget_bytes)]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``host:port`` (checked before start, to fail clearly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Server:
    """A running server subprocess (its own process group, so stopping reaches SGLang's
    scheduler and detokenizer children too)."""

    process: subprocess.Popen
    base_url: str
    log_path: Path

    def log_tail(self, lines: int = 25, width: int = 240) -> str:
        """The last ``lines`` lines of the server log, each cut to ``width`` characters (SGLang
        logs its whole configuration on one line of several kilobytes)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        tail = text.splitlines()[-lines:]
        return "\n".join(line if len(line) <= width else line[:width] + " ..." for line in tail)


def start_server(
    model_path: str,
    port: int,
    flags: Sequence[str],
    log_path: Path,
    host: str = "127.0.0.1",
    health_timeout_s: float = 240.0,
) -> Server:
    """Launch the server and return once ``GET /health`` answers 200.

    Raises ServerError, with the log tail, when the port is taken, the process exits early or
    health does not come within ``health_timeout_s``.
    """
    if not port_is_free(port, host):
        raise ServerError(f"port {port} on {host} is already in use; pick another --port")
    cmd = [
        sys.executable, "-m", LAUNCHER,
        "--model-path", model_path, "--host", host, "--port", str(port), *flags,
    ]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        process = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    server = Server(process, f"http://{host}:{port}", log_path)
    try:
        _wait_healthy(server, health_timeout_s)
    except BaseException:  # also Ctrl-C: the server is in its own session and would live on
        stop_server(server)
        raise
    return server


def _wait_healthy(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerError(
                f"server exited with status {server.process.returncode} before becoming "
                f"healthy; log {server.log_path}:\n{server.log_tail()}"
            )
        if _healthy(server.base_url):
            return
        time.sleep(0.5)
    raise ServerError(
        f"server not healthy after {timeout_s:.0f} s; log {server.log_path}:\n{server.log_tail()}"
    )


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop_server(server: Server, grace_s: float = 20.0) -> None:
    """Terminate the server's process group, and kill it if it outlives ``grace_s``.

    The group is signalled even when the launcher has already exited: after a crash SGLang's
    detokenizer can outlive it and would keep a core busy for the rest of the evaluation.
    """
    pgid = server.process.pid  # start_new_session=True: the launcher leads its own group
    _signal_group(pgid, signal.SIGTERM)
    try:
        server.process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(pgid, signal.SIGKILL)
        server.process.wait(timeout=grace_s)
    deadline = time.monotonic() + grace_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def get_state(base_url: str, timeout_s: float = 5.0) -> dict | None:
    """``GET /morph/state`` as a dict, or None when the server has no morph runtime."""
    try:
        with urllib.request.urlopen(f"{base_url}/morph/state", timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def timeline_row(t: float, state: dict) -> dict:
    """One timeline sample: the load/capacity fields plus the non-fp layers' formats (which the
    token-weighted quality needs to know which model produced each token)."""
    row: dict = {"t": t}
    for key in TIMELINE_FIELDS:
        value = state.get(key)
        row[key] = len(value) if isinstance(value, list) else value
    row["formats"] = {
        str(layer["id"]): layer["format"]
        for layer in state.get("layers", [])
        if layer.get("format", "fp") != "fp"
    }
    row["transitions"] = state.get("transitions")
    return row


async def poll_state(base_url: str, t0: float, sink: list[dict], interval_s: float = 0.25) -> None:
    """Append a timeline row to ``sink`` every ``interval_s`` until cancelled.

    Samples that fail (server busy past the timeout, no morph runtime) are skipped: a gap in
    the timeline is better than stalling the replay.
    """
    timeout = aiohttp.ClientTimeout(total=max(1.0, 4 * interval_s))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            started = time.perf_counter()
            try:
                async with session.get(f"{base_url}/morph/state") as resp:
                    if resp.status == 200:
                        state = await resp.json()
                        # stamped on arrival: the scheduler answers between batches, so a
                        # reply to a poll sent during a long batch describes the later moment
                        sink.append(timeline_row(time.perf_counter() - t0, state))
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                pass
            await asyncio.sleep(max(0.0, interval_s - (time.perf_counter() - started)))
