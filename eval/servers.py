"""One server configuration per evaluated system: start it, wait for health, watch it, stop it.

Each system runs as its own ``python -m sglang_morph.launch_server`` subprocess with the same
model and the same memory budget, one after another, so that systems never compete for the
machine's cores and a crash in one cannot leak state into the next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

from sglang_morph.client import MorphClient
from sglang_morph.paths import DEFAULT_CHECKPOINT
from sglang_morph.server_process import HEALTH_TIMEOUT_S, Server

LAUNCHER = "sglang_morph.launch_server"
DEFAULT_RL_CHECKPOINT = str(DEFAULT_CHECKPOINT)

SYSTEMS = ("fp", "static-int8", "static-int4", "static-k", "morph-heuristic", "morph-rl")
"""The systems offered, in the order reports list them. ``static-k:K`` serves the first K
layers of the profile order in int4 for the whole run; ``static-k`` finds K itself (the
smallest reaching morph-heuristic's SLO violations, see eval.execute)."""
STATIC_K = "static-k"
STATIC_K_FORMAT = "int4"

TIMELINE_FIELDS = (
    "queue_len",
    "running_reqs",
    "quantized_layers",
    "kv_capacity_tokens",
    "kv_used_tokens",
)


def static_k(system: str) -> int | None:
    """K of ``static-k:K``; None for every other system (``static-k`` included, whose K is
    searched). ValueError when K is not a whole number >= 0."""
    name, sep, k = system.partition(":")
    if name != STATIC_K or not sep:
        return None
    if not k.isdigit():
        raise ValueError(f"{system}: K must be a whole number >= 0")
    return int(k)


def system_flags(system: str, budget_bytes: int, rl_checkpoint: str) -> list[str]:
    """Launcher flags of ``system``; all systems share ``--morph-memory-budget``. A static-k
    server runs the manual policy: the harness swaps its K layers before the replay
    (``quantize_first``) and nothing changes them afterwards."""
    flags = {
        "fp": ["--morph-policy", "off"],
        "static-int8": ["--morph-static-format", "int8"],
        "static-int4": ["--morph-static-format", "int4"],
        STATIC_K: ["--morph-policy", "manual", "--morph-format", STATIC_K_FORMAT],
        "morph-heuristic": ["--morph-policy", "heuristic"],
        "morph-rl": ["--morph-policy", "rl", "--morph-checkpoint", rl_checkpoint],
    }
    name = STATIC_K if system.partition(":")[0] == STATIC_K else system
    if name not in flags:
        raise ValueError(f"unknown system {system!r}; offered: {', '.join(SYSTEMS)}")
    return flags[name] + ["--morph-memory-budget", str(budget_bytes)]


def quantize_first(base_url: str, k: int, timeout_s: float = 120.0) -> dict:
    """Swap the first ``k`` layers of the server's own layer order to int4 and wait until the
    swap and the KV growth it pays for are complete; returns the settled ``/morph/state``.
    RuntimeError when the server does not settle in ``timeout_s``."""
    client = MorphClient(base_url)
    state = client.state()
    if k > 0:
        client.swap(state["layer_order"][:k], STATIC_K_FORMAT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = client.state()
        settled = all(x["format"] == x["desired"] for x in state["layers"])
        if settled and state.get("kv_resize_complete", True):
            return state
        time.sleep(0.1)
    raise RuntimeError(f"static-k: the swap of {k} layers did not settle in {timeout_s:g} s")


def start_server(
    model_path: str,
    port: int | None,
    flags: Sequence[str],
    log_path: Path,
    host: str = "127.0.0.1",
    health_timeout_s: float = HEALTH_TIMEOUT_S,
) -> Server:
    """Launch one system's server on ``port`` (a free one when None) and return once
    ``GET /health`` answers 200 (ServerError, with the log tail, otherwise; the limit is 240 s,
    or ``MORPH_TEST_HEALTH_TIMEOUT`` on a machine loaded by tests)."""
    return Server(
        ["--model-path", model_path, *flags],
        port=port,
        host=host,
        log_path=log_path,
        module=LAUNCHER,
        health_timeout_s=health_timeout_s,
    )


def stop_server(server: Server, grace_s: float = 20.0) -> None:
    """Stop the server's whole process group (``Server.stop``)."""
    server.stop(grace_s)


def get_state(base_url: str, timeout_s: float = 5.0) -> dict | None:
    """``GET /morph/state`` as a dict, or None when the server has no morph runtime."""
    return MorphClient(base_url).try_state(timeout_s)


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


STATE_POLL_S = 0.25
"""How often the harness reads /morph/state. Each read runs in the scheduler loop (SGLang's
get_internal_state) and takes scheduler time, so this is part of the load every measured system
carries; ``envs.calibrate`` reads at the same rate while it measures."""


async def poll_state(
    base_url: str, t0: float, sink: list[dict], interval_s: float = STATE_POLL_S
) -> None:
    """Append a timeline row to ``sink`` every ``interval_s`` until cancelled (failed reads
    leave a gap). Rows are stamped on arrival: the scheduler answers between batches, so a
    reply to a poll sent during a long batch describes the later moment."""

    def on_state(state: dict) -> None:
        sink.append(timeline_row(time.perf_counter() - t0, state))

    await MorphClient(base_url).poll_state(on_state, interval_s)


async def replay_polling(replayer, base_url: str, timeline: list[dict]) -> None:
    """``replayer``'s whole replay, with ``/morph/state`` read into ``timeline`` every
    ``STATE_POLL_S`` meanwhile (the load every measured server carries); ``replayer`` is an
    ``eval.replay.Replayer``."""
    t0 = time.perf_counter()
    poller = asyncio.create_task(poll_state(base_url, t0, timeline))
    try:
        await replayer.run(t0)
    finally:
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
