"""The morph configuration: parsed once by the launcher, handed to every SGLang process.

SGLang spawns its scheduler process (no fork), so the configuration travels in the environment
variable ``SGLANG_MORPH_CONFIG`` as JSON; the plugin's ``register()`` reads it in each process.
Without that variable the plugin stays passive and SGLang runs unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

ENV_VAR = "SGLANG_MORPH_CONFIG"
POLICIES = ("off", "manual", "heuristic", "rl")
FORMATS = ("fp", "int8", "int4")
QUANTIZED_FORMATS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
QUANT_METHODS = ("rtn", "awq")
FORMAT_BITS = {"fp": 16, "int8": 8, "int4": 4}
"""Formats as numbers: SGLang's set_internal_state channel carries numeric values only."""
STATE_ROUTE = "/morph/state"
SWAP_ROUTE = "/morph/swap"
KV_ROUTE = "/morph/kv"
ITERATIONS_ROUTE = "/morph/iterations"
TARGETS_ROUTE = "/morph/targets"
"""The server's ``/morph/*`` routes: defined here once, served by ``http_api`` and called by
``client``."""
COMMAND_KEY_PREFIX = "morph."
SWAP_KEY_PREFIX = "morph.layer."
KV_KEY = "morph.kv_tokens"
TTFT_KEY = "morph.ttft_slo_s"
TPOT_KEY = "morph.tpot_slo_s"
PROVISIONAL_TTFT_SLO_S = 1.0
"""The TTFT target the controller uses until the warm-up probe has measured one (only when
``--morph-ttft-slo`` is not given)."""
UNLOADED_SLO_MULTIPLE = 5.0
"""A latency target measured rather than given is this multiple of the unloaded median (TTFT
and TPOT of a few sequential requests): the rule of the server's warm-up targets, of
``eval.run --slo measure`` and of the simulator's calibration, so all three judge alike."""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_bytes(text: str) -> int:
    """Parse ``65536``, ``64MB``, ``1.5GiB`` ... into bytes (KB = 1000, KiB = 1024)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(
            f"invalid byte size {text!r}: expected a number with an optional suffix "
            "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
        )
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    binary = "I" in unit
    letter = unit.replace("I", "").replace("B", "")
    scale = 1024 ** "KMGT".index(letter) * 1024 if binary and letter else _UNITS[letter]
    if binary and not letter:
        raise ValueError(f"invalid byte size {text!r}: 'iB' needs a prefix such as KiB")
    return int(number * scale)


RESTORE_WINDOW_S = 10.0
"""Default of ``--morph-restore-window``, the shortest restore stabilization window
(``rl_controller.stabilizer``): chosen on validation windows of the simulator and on simulated
steady loads (docs/controller.md has the sweep)."""
RESTORE_MAX_WINDOW_S = 120.0
"""Default of ``--morph-restore-max-window``, the longest the window grows to."""
RESTORE_LOAD_DROP = 0.25
"""Default of ``--morph-restore-load-drop``: restores also wait for the smoothed arrival rate to
fall this fraction below its peak since the layers were quantized (0: no such wait); chosen like
the windows (docs/controller.md)."""
RESTORE_LOAD_TAU_S = 20.0
"""Time constant of the arrival-rate smoothing the load drop is judged on: long enough that a
Poisson clump of a few seconds does not look like a change of load."""


DOMINANCE_MIN_GAIN = 0.10
"""How much lower, relatively, the learned controller's SLO violations or quality cost must be
than the heuristic's (the other no higher) for it to count as beating the heuristic."""
DOMINANCE_MAX_TRANSITIONS = 1.5
"""The most layer transitions the learned controller may make, as a multiple of the
heuristic's, and still count as beating it: quality bought by swapping layers back and forth
every few ticks is chattering, not control. Training's choice and ``eval.dominance`` share
both figures."""


@dataclass(frozen=True)
class RestoreRule:
    """The restore stabilization rule (``rl_controller.stabilizer``): the shortest window, the
    longest it grows to, the load drop restores wait for, and the smoothing of that load.

    One value, because the runtime and the training environment must apply the same rule: a
    policy is trained under the rule it will serve under, and a checkpoint records it. The
    checks live here, once, so the server's ``--morph-restore-*`` options and the offline
    commands' ``--restore-*`` options are refused alike.
    """

    window_s: float = RESTORE_WINDOW_S
    """The shortest window (0: restores are never held)."""
    max_window_s: float = RESTORE_MAX_WINDOW_S
    """The longest the window grows to under repeated regretted restores, and the probe period
    under a load that does not fall (at least ``window_s``)."""
    load_drop: float = RESTORE_LOAD_DROP
    """How far below its peak the smoothed arrival rate must be for a restore (0: restores do
    not wait for the load)."""
    load_tau_s: float = RESTORE_LOAD_TAU_S
    """Time constant of the arrival-rate smoothing."""

    def __post_init__(self) -> None:
        """Raise ValueError naming the option that is wrong and what it accepts."""
        if not 0 <= self.window_s < math.inf:
            raise ValueError("--[morph-]restore-window must be 0 or more seconds, "
                             f"got {self.window_s:g}")
        if not self.window_s <= self.max_window_s < math.inf:
            raise ValueError("--[morph-]restore-max-window must be at least the restore window "
                             f"({self.window_s:g} s), got {self.max_window_s:g}")
        if not 0 <= self.load_drop < 1:
            raise ValueError("--[morph-]restore-load-drop must be a fraction in [0, 1), "
                             f"got {self.load_drop:g}")
        if not 0 < self.load_tau_s < math.inf:
            raise ValueError("load_tau_s must be a positive number of seconds, "
                             f"got {self.load_tau_s:g}")

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> RestoreRule:
        """The rule a checkpoint was trained under, from its metadata keys
        ``restore_window_s``, ``restore_max_window_s`` and ``restore_load_drop``. Checkpoints
        older than each key were trained without that part: window 0, max window the window,
        load drop 0; the max window is never below the window."""
        window = meta.get("restore_window_s", 0.0)
        return cls(window_s=window,
                   max_window_s=max(window, meta.get("restore_max_window_s", window)),
                   load_drop=meta.get("restore_load_drop", 0.0))

    def metadata(self) -> dict[str, float]:
        """The keys a checkpoint records its rule under (what ``from_metadata`` reads back)."""
        return {"restore_window_s": self.window_s, "restore_max_window_s": self.max_window_s,
                "restore_load_drop": self.load_drop}

    def overridden(
        self,
        window_s: float | None = None,
        max_window_s: float | None = None,
        load_drop: float | None = None,
    ) -> RestoreRule:
        """This rule with the settings a command line gives (None: this rule's), as the
        ``--[morph-]restore-*`` options override a checkpoint's or the default rule; checked
        like any other."""
        given = {"window_s": window_s, "max_window_s": max_window_s, "load_drop": load_drop}
        return replace(self, **{k: v for k, v in given.items() if v is not None})


DEFAULT_RESTORE_RULE = RestoreRule()
"""The rule of the ``--morph-restore-*`` defaults, the default of every stabilizer and
environment."""


@dataclass
class MorphConfig:
    """Everything the scheduler-side runtime needs to know, JSON-serialisable."""

    policy: str = "off"
    memory_budget_bytes: int | None = None
    quant_format: str = "int4"
    group_size: int = 32
    quant_method: str = "rtn"
    static_format: str | None = None
    profile_path: str | None = None
    checkpoint_path: str | None = None
    tick_interval_s: float = 0.05
    restore_window_s: float = RESTORE_WINDOW_S
    restore_max_window_s: float = RESTORE_MAX_WINDOW_S
    restore_load_drop: float = RESTORE_LOAD_DROP
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    kv_segment_tokens: int = 64
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError naming the bad field and the accepted values."""
        _one_of("--morph-policy", self.policy, POLICIES)
        _one_of("--morph-format", self.quant_format, QUANTIZED_FORMATS)
        _one_of("--morph-group-size", self.group_size, GROUP_SIZES)
        _one_of("--morph-quant-method", self.quant_method, QUANT_METHODS)
        if self.static_format is not None:
            _one_of("--morph-static-format", self.static_format, QUANTIZED_FORMATS)
            if self.policy not in ("off", "manual"):
                raise ValueError(
                    "--morph-static-format quantizes every layer for the whole run; it accepts "
                    f"--morph-policy off or manual, not {self.policy!r}"
                )
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise ValueError("--morph-memory-budget must be positive")
        if self.kv_segment_tokens <= 0:
            raise ValueError("--morph-kv-segment-tokens must be a positive number of tokens")
        for flag, value in (("--morph-ttft-slo", self.ttft_slo_s),
                            ("--morph-tpot-slo", self.tpot_slo_s)):
            if value is not None and not 0 < value < float("inf"):
                raise ValueError(f"{flag} must be a positive number of seconds, got {value}")
        if not self.tick_interval_s >= 0:
            raise ValueError("--morph-tick-interval must be 0 or more seconds")
        _ = self.restore_rule  # building the rule checks the --morph-restore-* values

    @property
    def restore_rule(self) -> RestoreRule:
        """The restore stabilization rule of the ``--morph-restore-*`` options (the fields
        stay flat: the configuration travels as JSON and is rebuilt field by field)."""
        return RestoreRule(self.restore_window_s, self.restore_max_window_s,
                           self.restore_load_drop)

    @property
    def enabled(self) -> bool:
        """Whether the runtime changes the model at all (``off`` is plain SGLang)."""
        return self.policy != "off" or self.static_format is not None

    def to_env(self) -> None:
        """Publish this configuration to the processes SGLang is about to spawn."""
        os.environ[ENV_VAR] = json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> MorphConfig | None:
        """The configuration the launcher published, or None for a plain SGLang process."""
        raw = os.environ.get(ENV_VAR)
        return None if not raw else cls(**json.loads(raw))


def _one_of(flag: str, value: object, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(
            f"invalid value {value!r} for {flag}; accepted: {', '.join(map(str, accepted))}"
        )


def add_quant_args(parser: argparse.ArgumentParser) -> None:
    """The model and quantization options shared by the offline tools (profile, quality), so
    both accept the same names, defaults and choices as the server's ``--morph-*`` options."""
    parser.add_argument("--model-path", default=None, help="HF model dir (default: stories260K)")
    parser.add_argument("--format", default="int4", choices=QUANTIZED_FORMATS)
    parser.add_argument("--group-size", type=int, default=32, choices=GROUP_SIZES)
    parser.add_argument("--quant-method", default="rtn", choices=QUANT_METHODS)
