"""``MorphServe-v0``: a gymnasium environment in which a controller picks the int4 layer count
and the KV limit.

One step is one controller tick (``tick_s`` of served time). The observation is
``observation_vector`` of the backend's ``LoadSnapshot`` (the same features the runtime feeds a
policy). Two action modes:

- ``"delta"`` (default, used for training): ``MultiDiscrete([n + 2, 3])`` (``RLActions``), a
  layer delta = restore one layer / hold / quantize 1..n more (n = 1 by default: a burst then
  takes L ticks to reach all layers, 0.25 s at the default 0.05-s tick, the runtime's), and the
  KV limit as an index into ``KV_FRACTIONS`` (``RLActions.action`` maps the pair to an
  ``Action``). Holding is the same action in every state, so exploring does not mean churning.
- ``"target"``: ``Discrete(L + 1)``, the absolute target of ``Policy.decide``, or a policy's
  ``Action`` (layers and KV fraction); used to evaluate any policy (the RL policy turns its
  action pair into an ``Action`` itself).

Targets outside ``[0, L]`` or restoring layers whose KV is in use are clipped by
``clip_action``, KV fractions by ``clip_kv_fraction``; both are counted. Restores then pass
the runtime's ``RestoreStabilizer`` (held ones are counted too), so every policy, the one in
training included, acts under the rule it serves under. An episode replays one
window of a trace (a random one per reset, from the env's seeded generator, or
``options={"window": i}``) and is truncated at its end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np

from envs.backend import ServingBackend
from envs.calibration import IterationModel, load_calibration, load_replica
from envs.reward import (
    DEFAULT_QUALITY_TABLE,
    RewardWeights,
    tick_terms,
    validate_quality_table,
)
from envs.simulator import ReplicaConfig, Simulator
from eval.traces import LengthMapping, Trace, load_trace, map_lengths, scale_time, select_window
from rl_controller.observation import OBS_SIZE, LoadSnapshot, observation_vector
from rl_controller.policy import (
    RL_ACTIONS,
    Action,
    RLActions,
    clip_action,
    clip_kv_fraction,
)
from rl_controller.stabilizer import RestoreStabilizer
from sglang_morph.config import DEFAULT_RESTORE_RULE, RestoreRule
from sglang_morph.paths import DEFAULT_CALIBRATION

Window = tuple[float, float]


def prepare_trace(name_or_path: str, mapping: LengthMapping, time_scale: float) -> Trace:
    """A trace as the simulator replays it: lengths mapped to the model, time compressed."""
    return scale_time(map_lengths(load_trace(name_or_path), mapping), time_scale)


def _calibration_file(calibration: IterationModel | str | Path | None) -> str | Path:
    """The calibration file whose replica section (capacity, SLO, budget) the environment
    serves: the one named, else the default (an in-memory model has no replica)."""
    return calibration if isinstance(calibration, (str, Path)) else DEFAULT_CALIBRATION


TRAIN_FRAC = 0.7
"""Default share of a trace (its leading part) that training, and calibration, may replay."""
VAL_FRAC = 0.15
"""Default share after the training part whose windows choose among trained candidates (seeds,
reward weights); the rest of the trace is the test part, replayed once, for the report."""


def split_windows(
    trace: Trace, window_s: float, train_frac: float
) -> tuple[list[Window], list[Window]]:
    """Consecutive ``window_s`` windows; those ending within the first ``train_frac`` of the
    trace train, those starting after it evaluate (none straddles the split), so evaluation
    never replays a second that training saw."""
    split = trace.duration_s * train_frac
    starts = np.arange(0.0, trace.duration_s - window_s + 1e-9, window_s)
    windows = [(float(s), float(s + window_s)) for s in starts]
    return (
        [w for w in windows if w[1] <= split],
        [w for w in windows if w[0] >= split],
    )


def split_protocol(
    trace: Trace, window_s: float, train_frac: float, val_frac: float
) -> tuple[list[Window], list[Window], list[Window]]:
    """(train, validation, test) windows by time: training in the leading ``train_frac`` of the
    trace, validation in the next ``val_frac``, test after it; no window straddles a split."""
    train, rest = split_windows(trace, window_s, train_frac)
    _, test = split_windows(trace, window_s, train_frac + val_frac)
    val = [w for w in rest if w not in test and w[1] <= trace.duration_s * (train_frac + val_frac)]
    return train, val, test


@dataclass
class EpisodeStats:
    """Totals of one episode, for evaluation tables and training metadata."""

    requests: int
    late: int = 0
    tpot_late: int = 0
    generated_tokens: int = 0
    quality_cost: float = 0.0
    swapped_layers: int = 0
    clipped_actions: int = 0
    held_restores: int = 0
    """Ticks at which ``RestoreStabilizer`` held a restore back."""
    swaps_by_minute: list[int] = field(default_factory=list)
    """Layer swaps in each minute of the episode (the steady-load target is per minute)."""
    ticks: int = 0
    layer_ticks: int = 0
    kv_fraction_ticks: float = 0.0
    """Sum over ticks of the KV fraction applied (divided by ``ticks``: the mean limit)."""
    reward: float = 0.0
    ttfts: list[float] = field(default_factory=list)


class MorphEnv(gym.Env):
    """Serving one trace window with a controllable number of int4 layers and KV limit."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        trace: Trace | str = "azure-code",
        windows: Sequence[Window] | None = None,
        *,
        window_s: float = 60.0,
        time_scale: float = 1.0,
        length_mapping: LengthMapping | None = None,
        backend: str | ServingBackend = "simulator",
        calibration: IterationModel | str | Path | None = None,
        replica: ReplicaConfig | None = None,
        quality_table: Sequence[float] | None = None,
        weights: RewardWeights | None = None,
        tick_s: float = 0.05,
        action_mode: str = "delta",
        actions: RLActions = RL_ACTIONS,
        restore: RestoreRule = DEFAULT_RESTORE_RULE,
    ) -> None:
        """``trace`` is a prepared Trace, or a name/path prepared here with ``length_mapping``
        (default LengthMapping()) and ``time_scale``. ``windows`` default to all consecutive
        ``window_s`` windows. ``backend`` is ``"simulator"``, ``"engine"`` (starts a real server:
        ``envs.engine_backend``) or an object implementing ``ServingBackend``.
        ``action_mode``, ``actions``: see the module docstring. ``restore``: the runtime's
        restore stabilization rule (``--morph-restore-*``), applied to every policy here too,
        so a policy is trained and judged under the rule it serves under."""
        if isinstance(trace, str):
            trace = prepare_trace(trace, length_mapping or LengthMapping(), time_scale)
        self.trace = trace
        self.windows = list(windows) if windows is not None else split_windows(
            trace, window_s, 1.0
        )[0]
        if not self.windows:
            raise ValueError(f"no {window_s:g}-s window fits trace {trace.name!r}")
        if replica is None:
            replica = ReplicaConfig.from_calibration(_calibration_file(calibration))
        self.replica = replica
        layers = self.replica.num_layers
        self.quality_table = validate_quality_table(quality_table or DEFAULT_QUALITY_TABLE)
        if len(self.quality_table) != layers + 1:
            raise ValueError(
                f"quality table has {len(self.quality_table)} entries; {layers} layers need "
                f"{layers + 1} (k = 0..{layers})"
            )
        self.weights = weights or RewardWeights()
        self.tick_s = tick_s
        self.backend = self._make_backend(backend, calibration)
        if action_mode not in ("delta", "target"):
            raise ValueError(f"unknown action_mode {action_mode!r}; accepted: delta, target")
        self.action_mode = action_mode
        self.actions = actions
        self.action_space: gym.spaces.Space = (
            gym.spaces.MultiDiscrete(actions.nvec) if action_mode == "delta"
            else gym.spaces.Discrete(layers + 1)
        )
        self.observation_space = gym.spaces.Box(0.0, 1.0, (OBS_SIZE,), np.float32)
        self.snapshot: LoadSnapshot | None = None
        self.window: Window = self.windows[0]
        self.stats = EpisodeStats(requests=0)
        self._duration = 0.0
        self.restore = restore
        self._stabilizer = RestoreStabilizer(restore)  # renewed per episode

    def _make_backend(
        self, backend: str | ServingBackend, calibration: IterationModel | str | Path | None
    ) -> ServingBackend:
        if not isinstance(backend, str):
            return backend
        if backend == "engine":
            # Imported here: the simulator alone needs no HTTP client stack.
            from envs.engine_backend import EngineBackend

            # A fresh manual-policy server with the calibration's budget, judged by the
            # replica's SLOs; for a running server or other options pass an
            # EngineBackend(url=...) instance instead.
            budget = load_replica(_calibration_file(calibration)).get("budget_bytes")
            return EngineBackend(ttft_slo_s=self.replica.ttft_slo_s,
                                 tpot_slo_s=self.replica.tpot_slo_s,
                                 budget=None if budget is None else str(budget))
        if backend != "simulator":
            raise ValueError(f"unknown backend {backend!r}; accepted: simulator, engine")
        if not isinstance(calibration, IterationModel):
            calibration = load_calibration(calibration or DEFAULT_CALIBRATION)
        return Simulator(calibration, self.replica)

    def close(self) -> None:
        """Release the backend (stops the server a ``"engine"`` backend started)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def reset(
        self, *, seed: int | None = None, options: dict | None = None
    ) -> tuple[np.ndarray, dict]:
        """Start a window: ``options["window"]`` (an index) or a seeded random one."""
        super().reset(seed=seed)
        if options and "window" in options:
            index = int(options["window"])
        else:
            index = int(self.np_random.integers(len(self.windows)))
        self.window = self.windows[index]
        window = select_window(self.trace, *self.window)
        self._duration = window.duration_s
        self.snapshot = self.backend.reset(window)
        self.stats = EpisodeStats(requests=len(window.requests))
        self._stabilizer = RestoreStabilizer(self.restore)
        return observation_vector(self.snapshot), {"window": self.window}

    def step(
        self, action: np.ndarray | Sequence[int] | int | Action
    ) -> tuple[np.ndarray, float, bool, bool, dict]:
        """One tick with ``action``: a policy's ``Action`` (layers and KV fraction, in either
        mode), else per ``action_mode`` the RL action's two indices (layer delta, KV fraction)
        or a layer target (with the full KV budget)."""
        if self.snapshot is None:
            raise RuntimeError("call reset() before step()")
        snap = self.snapshot
        if isinstance(action, Action):
            wanted = action
        elif self.action_mode == "delta":
            wanted = self.actions.action(np.asarray(action).tolist(), snap.quantized_layers)
        else:
            wanted = Action(int(np.asarray(action)))
        target, layers_clipped = clip_action(wanted.layers, snap)
        fraction, kv_clipped = clip_kv_fraction(wanted.kv_fraction, snap)
        clipped = layers_clipped or kv_clipped
        held = self._stabilizer.held
        now = self.stats.ticks * self.tick_s
        target = self._stabilizer.apply(target, snap.quantized_layers, now, snap.arrival_rate)
        result = self.backend.advance(self.tick_s, target, fraction)
        terms = tick_terms(result, target, self.quality_table)
        reward = terms.reward(self.weights)
        s = self.stats
        s.late += terms.late
        s.tpot_late += terms.tpot_late
        s.generated_tokens += result.generated_tokens
        s.quality_cost += terms.quality
        s.swapped_layers += terms.swapped
        minute = int(now // 60.0)
        s.swaps_by_minute.extend([0] * (minute + 1 - len(s.swaps_by_minute)))
        s.swaps_by_minute[minute] += terms.swapped
        s.clipped_actions += clipped
        s.held_restores += self._stabilizer.held - held
        s.ticks += 1
        s.layer_ticks += target
        s.kv_fraction_ticks += fraction
        s.reward += reward
        s.ttfts.extend(r.ttft_s for r in result.finished)
        self.snapshot = result.snapshot
        truncated = s.ticks * self.tick_s >= self._duration - 1e-9
        info: dict = {"clipped": clipped, "target": target, "kv_fraction": fraction,
                      "late": terms.late, "tpot_late": terms.tpot_late}
        if truncated:
            info["morph_episode"] = {
                "late": s.late, "tpot_late": s.tpot_late, "requests": s.requests,
                "quality_cost": s.quality_cost, "generated_tokens": s.generated_tokens,
                "swapped_layers": s.swapped_layers,
            }
        return observation_vector(self.snapshot), reward, False, truncated, info
