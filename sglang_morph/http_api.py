"""The ``/morph/*`` HTTP routes, added to SGLang's FastAPI app in the launcher process.

State is read from the scheduler process through SGLang's get_internal_state channel (our hook
adds a ``morph`` key there); swaps go through set_internal_state. Nothing is answered from the
launcher's own memory, so what /morph/state shows is what the scheduler runs.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from sglang_morph.config import (
    FORMAT_BITS,
    ITERATIONS_ROUTE,
    KV_KEY,
    KV_ROUTE,
    STATE_ROUTE,
    SWAP_KEY_PREFIX,
    SWAP_ROUTE,
    TARGETS_ROUTE,
    TPOT_KEY,
    TTFT_KEY,
    MorphConfig,
)
from sglang_morph.iterations import read_tail


async def _scheduler_state() -> dict | None:
    """DP replica 0's state; with ``--dp-size`` > 1 it also lists every replica's under
    ``replicas`` (each replica is a scheduler with its own runtime and controller). Under TP a
    replica answers from its TP rank 0 (``sglang_morph.tp_sync``)."""
    from sglang.srt.entrypoints.http_server import get_global_state

    states = await get_global_state().tokenizer_manager.get_internal_state()
    morph = [s.get("morph") for s in states]
    if not morph or morph[0] is None:
        return None
    return morph[0] if len(morph) == 1 else {**morph[0], "replicas": morph}


async def morph_state() -> JSONResponse:
    """GET /morph/state: the scheduler's layer formats, KV capacity and counters."""
    state = await _scheduler_state()
    if state is None:
        return JSONResponse(
            {
                "error": "the sglang-morph plugin is not active in the scheduler process "
                "(see the server log for the plugin load error)"
            },
            status_code=503,
        )
    return JSONResponse(state)


async def morph_swap(request: Request) -> JSONResponse:
    """POST /morph/swap {"layers": [ids], "format": "int4"|"int8"|"fp"}."""
    try:
        body = await request.json()
    except ValueError:
        return _bad('body must be JSON: {"layers": [ids], "format": "int4"|"int8"|"fp"}')
    if not isinstance(body, dict):
        return _bad('body must be a JSON object {"layers": [ids], "format": ...}')
    fmt = body.get("format")
    if fmt not in FORMAT_BITS:
        return _bad(f"unknown format {fmt!r}; accepted: {', '.join(FORMAT_BITS)}")
    layers = body.get("layers")
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers)
    ):
        return _bad(f"layers must be a non-empty list of layer ids (integers >= 0), got {layers!r}")
    return await _command({f"{SWAP_KEY_PREFIX}{i}": FORMAT_BITS[fmt] for i in layers})


async def morph_kv(request: Request) -> JSONResponse:
    """POST /morph/kv {"tokens": N}: an operator's KV capacity limit (manual policy; 0 lifts
    it). Growth is bounded by the memory budget; a shrink waits for running requests."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        return _bad(f'body must be {{"tokens": N}} with N an integer >= 0, got {body!r}')
    return await _command({KV_KEY: tokens})


async def morph_targets(request: Request) -> JSONResponse:
    """POST /morph/targets {"ttft_s": S, "tpot_s": S}: the controller's latency targets (either
    or both; any policy). The harness sends the SLO it judges by; without one, the launcher's
    warm-up probe sends what it measured."""
    usage = 'body must be {"ttft_s": S, "tpot_s": S} with at least one positive number of seconds'
    try:
        body = await request.json()
    except ValueError:
        return _bad(usage)
    if not isinstance(body, dict) or not body or set(body) - {"ttft_s", "tpot_s"}:
        return _bad(f"{usage}, got {body!r}")
    values = {TTFT_KEY: body.get("ttft_s"), TPOT_KEY: body.get("tpot_s")}
    entries = {k: v for k, v in values.items() if v is not None}
    if not all(
        isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < float("inf")
        for v in entries.values()
    ):
        return _bad(f"{usage}, got {body!r}")
    return await _command({k: float(v) for k, v in entries.items()})


async def _command(entries: dict[str, float]) -> JSONResponse:
    from sglang.srt.entrypoints.http_server import get_global_state
    from sglang.srt.managers.io_struct import SetInternalStateReq

    ok = await get_global_state().tokenizer_manager.set_internal_state(
        SetInternalStateReq(server_args=entries))
    state = await _scheduler_state()
    if not ok or not all(ok):
        reason = (state or {}).get("last_error") or "refused by the scheduler"
        status = 409 if "policy" in reason else 400
        return JSONResponse({"error": reason}, status_code=status)
    return JSONResponse({"ok": True, "state": state})


async def morph_iterations(limit: int = 1000) -> JSONResponse:
    """GET /morph/iterations: the most recent forward records (simulator calibration)."""
    cfg = MorphConfig.from_env()
    path = cfg.extra.get("iteration_log") if cfg else None
    return JSONResponse(read_tail(path, limit) if path else [])


def _bad(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=400)


def install() -> None:
    """Add the routes to SGLang's app (before it starts serving)."""
    from sglang.srt.entrypoints.http_server import app
    from sglang.srt.utils.auth import AuthLevel, auth_level

    app.add_api_route(STATE_ROUTE, morph_state, methods=["GET"])
    app.add_api_route(
        SWAP_ROUTE, auth_level(AuthLevel.ADMIN_OPTIONAL)(morph_swap), methods=["POST"]
    )
    app.add_api_route(KV_ROUTE, auth_level(AuthLevel.ADMIN_OPTIONAL)(morph_kv),
                      methods=["POST"])
    app.add_api_route(TARGETS_ROUTE, auth_level(AuthLevel.ADMIN_OPTIONAL)(morph_targets),
                      methods=["POST"])
    app.add_api_route(ITERATIONS_ROUTE, morph_iterations, methods=["GET"])
