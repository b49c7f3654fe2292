"""SGLang plugin entry point (``sglang.srt.plugins`` group), loaded by SGLang in every process.

``register()`` runs in the launcher, the scheduler and the detokenizer. It stays passive unless
the launcher published a morph configuration, so plain ``python -m sglang.launch_server`` is
untouched by having sglang-morph installed. In the scheduler process the hooks build one
MorphRuntime after the model is loaded and call its ``tick()`` at the scheduler's safe point.
"""

from __future__ import annotations

import logging
import time

from sglang_morph.compat import MorphSetupError, check_sglang_version
from sglang_morph.config import KV_KEY, SWAP_KEY_PREFIX, MorphConfig

logger = logging.getLogger("sglang_morph")

SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
INTERNAL_STATE = (
    "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController"
)
TOKEN_ALLOCATOR = "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator"

_runtime = None  # the scheduler process's MorphRuntime (one scheduler rank per process)


def register() -> None:
    """Install the morph hooks when the launcher published a configuration."""
    cfg = MorphConfig.from_env()
    if cfg is None:
        return
    try:
        check_sglang_version()
    except MorphSetupError as err:
        logger.error("sglang-morph disabled: %s", err)
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sglang_morph.kv.elastic_allocator import ElasticTokenToKVPoolAllocator

    if cfg.memory_budget_bytes is not None and cfg.enabled:
        HookRegistry.register(TOKEN_ALLOCATOR, ElasticTokenToKVPoolAllocator, HookType.REPLACE)
    HookRegistry.register(f"{SCHEDULER}.__init__", _after_scheduler_init, HookType.AFTER)
    HookRegistry.register(f"{SCHEDULER}.get_next_batch_to_run", _around_next_batch, HookType.AROUND)
    HookRegistry.register(f"{SCHEDULER}.run_batch", _around_run_batch, HookType.AROUND)
    HookRegistry.register(
        f"{SCHEDULER}.handle_generate_request", _after_generate_request, HookType.AFTER
    )
    HookRegistry.register(f"{INTERNAL_STATE}.get_internal_state", _after_get_state, HookType.AFTER)
    HookRegistry.register(
        f"{INTERNAL_STATE}.set_internal_state", _around_set_state, HookType.AROUND
    )


def _after_scheduler_init(result, scheduler, *args, **kwargs) -> None:
    """Build the runtime once the model and KV pool exist, before the event loop starts.

    Any failure here (an RL checkpoint that cannot be run included) propagates and stops the
    scheduler: the server never starts half-configured or with another policy than asked for.
    """
    global _runtime
    from sglang_morph.runtime import MorphRuntime

    _runtime = MorphRuntime(scheduler, MorphConfig.from_env())
    logger.warning("sglang-morph runtime active in scheduler process: %s", _runtime.summary())


def _around_next_batch(original, scheduler, *args, **kwargs):
    """The safe tick: nothing is in flight at the entry of get_next_batch_to_run."""
    if _runtime is not None:
        _runtime.iterations.loop_pass(time.perf_counter())
        _runtime.loop_pass()
    return original(scheduler, *args, **kwargs)


def _around_run_batch(original, scheduler, batch, *args, **kwargs):
    """Time each forward for the iteration log (simulator calibration, stall measurements)."""
    if _runtime is None:
        return original(scheduler, batch, *args, **kwargs)
    start = time.perf_counter()
    result = original(scheduler, batch, *args, **kwargs)
    _runtime.record_iteration(batch, start, time.perf_counter() - start)
    return result


def _after_get_state(result, controller, *args, **kwargs) -> None:
    """Publish the runtime's state through SGLang's get_internal_state channel."""
    if _runtime is not None:
        result.internal_state["morph"] = _runtime.state()


def _around_set_state(original, controller, recv_req, *args, **kwargs):
    """Operator swaps arrive on SGLang's set_internal_state channel as numeric entries
    ``{"morph.layer.<id>": <format bits>}`` (the channel carries numbers only)."""
    args_in = recv_req.server_args or {}
    swaps = {k: v for k, v in args_in.items() if k.startswith(SWAP_KEY_PREFIX) or k == KV_KEY}
    if not swaps or _runtime is None:
        return original(controller, recv_req, *args, **kwargs)
    from sglang.srt.managers.io_struct import SetInternalStateReqOutput

    return SetInternalStateReqOutput(updated=bool(_runtime.guarded(_runtime.handle_swaps, swaps)))


def _after_generate_request(result, scheduler, *args, **kwargs) -> None:
    """Count arrivals for the observation's arrival rate."""
    if _runtime is not None:
        _runtime.on_arrival()
