"""A PPO-trained controller, run in numpy from the actor file exported beside its checkpoint.

A checkpoint is three files with one stem: ``NAME.zip`` (stable-baselines3's PPO, for training
and export), ``NAME.json`` (metadata: observation version and size, action space, training
set-up) and ``NAME.actor.npz`` (the actor network's weights, written by
``python -m rl_controller.actor_export NAME.zip``). Serving reads only the last two: a decision
is then a few small matrix products (no torch dispatch on the scheduler's hot path, no SB3 in
the scheduler process). ``RLPolicy.load`` refuses anything it cannot run exactly as trained and
says which file is wrong and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from rl_controller.controller import Controller
from rl_controller.heuristic import HeuristicPolicy
from rl_controller.observation import OBS_SIZE, OBS_VERSION, LoadSnapshot, observation_vector
from rl_controller.policy import RL_ACTIONS, Action, RLActions

ACTIVATIONS = {"Tanh": np.tanh, "ReLU": lambda x: np.maximum(x, 0.0)}
"""Activations the numpy actor implements, by the name of SB3's torch module."""

ACTOR_SUFFIX = ".actor.npz"
LOGIT_ATOL = 1e-4
"""How far the numpy actor's log-probabilities may be from SB3's on the recorded probes."""

Layer = tuple[np.ndarray, np.ndarray, str | None]
"""One actor layer: weight (out x in), bias, activation name (None: linear)."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or trained for other observations/actions."""


class PolicyOutputError(ValueError):
    """The network gave no usable decision for this snapshot (non-finite output)."""


def metadata_path(checkpoint: str | Path) -> Path:
    """The metadata JSON that belongs to a checkpoint ``NAME.zip``: ``NAME.json``."""
    return Path(checkpoint).with_suffix(".json")


def actor_path(checkpoint: str | Path) -> Path:
    """The exported actor that belongs to a checkpoint ``NAME.zip``: ``NAME.actor.npz``."""
    return Path(checkpoint).with_suffix(ACTOR_SUFFIX)


def file_sha256(path: str | Path) -> str:
    """Hex digest of a file: ties an exported actor to the exact checkpoint it came from."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def action_metadata(actions: RLActions = RL_ACTIONS) -> dict:
    """How checkpoints record the action heads (training writes it, loading reads it back):
    the actor's outputs are run with exactly the deltas and fractions they were trained for."""
    return {"action_mode": "delta", "action_space": actions.space,
            "delta_actions": list(actions.deltas), "kv_fractions": list(actions.kv_fractions)}


def recorded_actions(meta: dict, path: Path) -> RLActions:
    """The action heads a checkpoint's metadata records; CheckpointError when this code cannot
    run them (another KV head, deltas not of the form -1..n, an inconsistent record)."""
    try:
        actions = RLActions(tuple(int(d) for d in meta.get("delta_actions") or ()))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint metadata {path}: {err}; retrain it") from err
    recorded = {key: meta.get(key) for key in action_metadata()}
    if recorded != action_metadata(actions):
        raise CheckpointError(
            f"checkpoint metadata {path} says actions {recorded}; this code runs layer deltas "
            f"-1..n and KV fractions {list(RL_ACTIONS.kv_fractions)} (e.g. "
            f"{action_metadata()}): retrain it"
        )
    return actions


def read_metadata(checkpoint: str | Path) -> dict:
    """The checkpoint's metadata, checked against this code's observation and action
    definitions."""
    path = metadata_path(checkpoint)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(
            f"checkpoint metadata {path} does not exist (training writes it beside "
            f"{Path(checkpoint).name})"
        ) from err
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint metadata {path}: {err.strerror}") from err
    except ValueError as err:
        raise CheckpointError(f"checkpoint metadata {path} is not JSON: {err}") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint metadata {path} is not a JSON object")
    if meta.get("obs_version") != OBS_VERSION or meta.get("obs_size") != OBS_SIZE:
        raise CheckpointError(
            f"checkpoint metadata {path} says observation version {meta.get('obs_version')} "
            f"(size {meta.get('obs_size')}); this code builds version {OBS_VERSION} "
            f"(size {OBS_SIZE}): retrain it"
        )
    recorded_actions(meta, path)
    return meta


def forward(layers: list[Layer], obs: np.ndarray) -> np.ndarray:
    """Action logits of an actor given as ``layers`` for one observation vector, in float32
    (the dtype SB3 trained and recorded the probes in)."""
    x = np.asarray(obs, dtype=np.float32)
    for weight, bias, activation in layers:
        x = weight @ x + bias
        if activation is not None:
            x = ACTIVATIONS[activation](x)
    return x


def head_slices(nvec: tuple[int, ...]) -> tuple[slice, ...]:
    """Where each head's logits lie in the actor's output (layer delta, then KV fraction), as
    SB3's MultiDiscrete distribution splits it. A policy computes them once: a decision runs
    every tick, and ``np.split`` alone would cost about as much as the network."""
    return tuple(slice(end - n, end) for n, end in zip(nvec, np.cumsum(nvec).tolist()))


def log_probs(logits: np.ndarray, nvec: tuple[int, ...]) -> np.ndarray:
    """Logits normalised per head (sizes ``nvec``), as SB3's MultiDiscrete distribution reports
    them (each head a categorical), concatenated along the last axis."""
    normalised = []
    for head in (logits[..., span] for span in head_slices(nvec)):
        top = head.max(axis=-1, keepdims=True)
        normalised.append(head - top - np.log(np.sum(np.exp(head - top), axis=-1, keepdims=True)))
    return np.concatenate(normalised, axis=-1)


class RLPolicy:
    """Greedy (argmax per head) decisions of a PPO actor network over the layer deltas and KV
    fractions it was trained with (``RLActions``, from its metadata), in numpy.

    The observation holds fractions and the action is a delta and a fraction, so nothing here
    depends on the model's layer count or KV size: a policy trained on one model runs on
    another.
    """

    name = "rl"

    def __init__(
        self, layers: list[Layer], meta: dict, actions: RLActions, path: str | None = None
    ) -> None:
        """``layers``: the actor, input to logits; ``actions``: the heads its metadata records;
        ``path``: the checkpoint it came from."""
        self.layers = layers
        self.meta = meta
        self.path = path
        self.actions = actions
        self._heads = head_slices(actions.nvec)

    @classmethod
    def load(cls, checkpoint: str | Path) -> RLPolicy:
        """The policy of ``NAME.zip`` from ``NAME.json`` and ``NAME.actor.npz`` (numpy only);
        CheckpointError names the file at fault and what was expected."""
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise CheckpointError(f"checkpoint {checkpoint} does not exist")
        meta = read_metadata(checkpoint)
        actions = recorded_actions(meta, metadata_path(checkpoint))
        nvec = actions.nvec
        actor = actor_path(checkpoint)
        if not actor.is_file():
            raise CheckpointError(
                f"actor file {actor} does not exist: export it with "
                f"`python -m rl_controller.actor_export {checkpoint}`"
            )
        try:
            with np.load(actor, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as err:  # a damaged npz fails in many ways (zipfile, format, OS)
            raise CheckpointError(f"cannot read actor file {actor}: {err}") from err
        layers = _layers_from_arrays(arrays, actor, nvec)
        if str(arrays["checkpoint_sha256"]) != file_sha256(checkpoint):
            raise CheckpointError(
                f"actor file {actor} was exported from another version of {checkpoint}: "
                f"export it again with `python -m rl_controller.actor_export {checkpoint}`"
            )
        got = log_probs(np.stack([forward(layers, p) for p in arrays["probes"]]), nvec)
        if not np.allclose(got, arrays["probe_log_probs"], atol=LOGIT_ATOL):
            raise CheckpointError(
                f"actor file {actor}: its network does not reproduce the log-probabilities "
                "recorded from SB3 at export"
            )
        return cls(layers, meta, actions, str(checkpoint))

    def logits(self, obs: np.ndarray) -> np.ndarray:
        """Action logits of the actor for one observation vector."""
        return forward(self.layers, obs)

    def decide(self, snap: LoadSnapshot) -> Action:
        """Current layers plus the argmax delta, within [0, num_layers], and the argmax KV
        fraction (SB3's deterministic action); PolicyOutputError when the output cannot be
        trusted."""
        # Python floats from here: on a handful of logits, numpy's per-call overhead (isfinite,
        # a slice and argmax per head) would cost as much as the network.
        logits = self.logits(observation_vector(snap)).tolist()
        if not math.isfinite(sum(logits)):  # NaN and infinities propagate through the sum
            raise PolicyOutputError(f"non-finite policy output {logits}")
        best = [max(range(span.start, span.stop), key=logits.__getitem__) - span.start
                for span in self._heads]
        action = self.actions.action(best, snap.quantized_layers)
        return Action(min(max(action.layers, 0), snap.num_layers), action.kv_fraction)


def arrays_from_layers(layers: list[Layer]) -> dict[str, np.ndarray]:
    """The actor file's arrays for ``layers`` (``w<i>``, ``b<i>``, ``activations``)."""
    arrays: dict[str, np.ndarray] = {
        "activations": np.array([a or "" for _, _, a in layers], dtype=str)
    }
    for i, (weight, bias, _) in enumerate(layers):
        arrays[f"w{i}"], arrays[f"b{i}"] = weight, bias
    return arrays


def _layers_from_arrays(
    arrays: dict[str, np.ndarray], actor: Path, nvec: tuple[int, ...]
) -> list[Layer]:
    """The actor's layers, checked to map OBS_SIZE features to one logit per action of each
    head (``nvec``, from the checkpoint's metadata)."""
    expected = ("activations", "checkpoint_sha256", "probes", "probe_log_probs")
    missing = [k for k in expected if k not in arrays]
    if missing:
        raise CheckpointError(f"actor file {actor} lacks {missing}: export it again")
    layers: list[Layer] = []
    width = OBS_SIZE
    for i, name in enumerate(arrays["activations"].tolist()):
        weight = np.asarray(arrays.get(f"w{i}"), dtype=np.float32)
        bias = np.asarray(arrays.get(f"b{i}"), dtype=np.float32)
        if weight.ndim != 2 or weight.shape[1] != width or bias.shape != weight.shape[:1]:
            raise CheckpointError(
                f"actor file {actor}: layer {i} has weight {weight.shape} and bias {bias.shape};"
                f" expected (n, {width}) and (n,)"
            )
        if name and name not in ACTIVATIONS:
            raise CheckpointError(
                f"actor file {actor}: layer {i} uses activation {name!r}; supported: "
                f"{', '.join(ACTIVATIONS)}"
            )
        layers.append((weight, bias, name or None))
        width = weight.shape[0]
    if not layers or width != sum(nvec):
        raise CheckpointError(
            f"actor file {actor} has {width if layers else 0} action logits; its metadata "
            f"records MultiDiscrete({list(nvec)}), which needs {sum(nvec)}: export it again "
            "from its checkpoint, or retrain it"
        )
    return layers


class FallbackPolicy:
    """The RL policy with the heuristic as its stand-in, as a plain ``Policy`` (decide ->
    clipped ``Action``) for offline tools that step an environment; counts the ticks the
    heuristic decided."""

    name = "rl+fallback"

    def __init__(self, rl: RLPolicy, heuristic: HeuristicPolicy | None = None) -> None:
        self.controller = Controller(rl, heuristic or HeuristicPolicy(), rl.path)
        self.fallbacks = 0

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> FallbackPolicy:
        """The RL policy of ``path`` with the heuristic behind it; CheckpointError when the
        checkpoint cannot be run (never a silent switch to the heuristic)."""
        return cls(RLPolicy.load(path))

    def decide(self, snap: LoadSnapshot) -> Action:
        """The RL action, or the heuristic's when RL fails on this snapshot, clipped as the
        runtime clips it."""
        decision = self.controller.decide(snap)
        self.fallbacks += decision.fell_back
        return Action(decision.target, decision.kv_fraction)
