"""SGLang plugin entry point (``sglang.srt.plugins`` group), loaded by SGLang in every process.

``register()`` runs in the launcher, the scheduler and the detokenizer. It stays passive unless
the launcher published a morph configuration, so plain ``python -m sglang.launch_server`` is
untouched by having sglang-morph installed. In the scheduler process the hooks build one
MorphRuntime after the model is loaded and call its ``tick()`` at the scheduler's safe point.

``hooks(cfg)`` is the one list of what the plugin attaches: the launcher resolves every target
before SGLang starts, and the scheduler checks each one carries its hook before it serves,
because SGLang's HookRegistry only logs a hook it cannot attach and serves on without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sglang_morph.compat import MorphSetupError, check_hooks_attached, check_sglang_version
from sglang_morph.config import COMMAND_KEY_PREFIX, MorphConfig
from sglang_morph.faults import Faults

logger = logging.getLogger("sglang_morph")

SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
INTERNAL_STATE = (
    "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController"
)
TOKEN_ALLOCATOR = "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator"

_runtime = None  # the scheduler process's MorphRuntime (one scheduler rank per process)
_registered: list[tuple[str, object]] = []  # (target, hook) as register() registered them


@dataclass(frozen=True)
class Hook:
    """One SGLang target the plugin attaches to, and how (a HookType name)."""

    target: str
    kind: str
    fn: Callable | None
    """The hook; None for the elastic allocator class, imported only when registered."""


def hooks(cfg: MorphConfig) -> list[Hook]:
    """Every hook ``cfg`` needs; the allocator is replaced only when a budget sizes KV."""
    out = [
        Hook(f"{SCHEDULER}.__init__", "AFTER", _after_scheduler_init),
        Hook(f"{SCHEDULER}.get_next_batch_to_run", "AROUND", _around_next_batch),
        Hook(f"{SCHEDULER}.run_batch", "AROUND", _around_run_batch),
        Hook(f"{SCHEDULER}.handle_generate_request", "AFTER", _after_generate_request),
        Hook(f"{INTERNAL_STATE}.get_internal_state", "AFTER", _after_get_state),
        Hook(f"{INTERNAL_STATE}.set_internal_state", "AROUND", _around_set_state),
    ]
    if cfg.memory_budget_bytes is not None and cfg.enabled:
        out.insert(0, Hook(TOKEN_ALLOCATOR, "REPLACE", None))
    return out


def hook_targets(cfg: MorphConfig) -> list[str]:
    """The dotted SGLang paths ``cfg``'s hooks attach to (checked by the launcher)."""
    return [h.target for h in hooks(cfg)]


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

    planned = hooks(cfg)
    try:
        missing = Faults.from_env().missing_hook()
    except ValueError:  # malformed: the runtime raises it at start-up, naming the variable
        missing = None
    if missing is not None:
        planned.append(Hook(missing, "AFTER", _after_generate_request))
    _registered.clear()
    for hook in planned:
        fn = ElasticTokenToKVPoolAllocator if hook.fn is None else hook.fn
        HookRegistry.register(hook.target, fn, HookType[hook.kind])
        _registered.append((hook.target, fn))


def _after_scheduler_init(result, scheduler, *args, **kwargs) -> None:
    """Build the runtime once the model and KV pool exist, before the event loop starts.

    Any failure here (an RL checkpoint that cannot be run included) propagates and stops the
    scheduler: the server never starts half-configured or with another policy than asked for.
    A registered hook that SGLang could not attach is such a failure (MorphSetupError naming
    the target and the pinned SGLang version).
    """
    global _runtime
    from sglang_morph.runtime import MorphRuntime

    check_hooks_attached(_registered)
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
    swaps = {k: v for k, v in args_in.items() if k.startswith(COMMAND_KEY_PREFIX)}
    if not swaps or _runtime is None:
        return original(controller, recv_req, *args, **kwargs)
    from sglang.srt.managers.io_struct import SetInternalStateReqOutput

    return SetInternalStateReqOutput(updated=bool(_runtime.guarded(_runtime.handle_swaps, swaps)))


def _after_generate_request(result, scheduler, *args, **kwargs) -> None:
    """Count arrivals for the observation's arrival rate."""
    if _runtime is not None:
        _runtime.on_arrival()
