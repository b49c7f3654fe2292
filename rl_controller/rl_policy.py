"""A PPO-trained controller, and the wrapper that keeps serving safe when it cannot be trusted.

``RLPolicy.load`` reads a stable-baselines3 checkpoint and its metadata JSON (same stem,
``.json``), refuses anything that was trained on other observation features, and copies the
actor network into numpy: a decision is then three small matrix products (microseconds, no torch
dispatch on the scheduler's hot path). ``FallbackPolicy`` is what the runtime should use: it
never raises, and answers with the heuristic whenever the network is unavailable or its output
is not finite.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from rl_controller.heuristic import HeuristicPolicy
from rl_controller.observation import OBS_SIZE, OBS_VERSION, LoadSnapshot, observation_vector
from rl_controller.policy import DELTA_ACTIONS

logger = logging.getLogger(__name__)

_ACTIVATIONS = {"Tanh": np.tanh, "ReLU": lambda x: np.maximum(x, 0.0)}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or trained for other observations/actions."""


class PolicyOutputError(ValueError):
    """The network gave no usable decision for this snapshot (non-finite output, wrong model)."""


def metadata_path(checkpoint: str | Path) -> Path:
    """The metadata JSON that belongs to a checkpoint ``NAME.zip``: ``NAME.json``."""
    return Path(checkpoint).with_suffix(".json")


def read_metadata(checkpoint: str | Path) -> dict:
    """The checkpoint's metadata, checked against this code's observation definition."""
    path = metadata_path(checkpoint)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint metadata {path}: {err}") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint metadata {path} is not a JSON object")
    if meta.get("obs_version") != OBS_VERSION or meta.get("obs_size") != OBS_SIZE:
        raise CheckpointError(
            f"checkpoint {checkpoint} was trained on observation version "
            f"{meta.get('obs_version')} (size {meta.get('obs_size')}); this code builds version "
            f"{OBS_VERSION} (size {OBS_SIZE}): retrain it"
        )
    return meta


class RLPolicy:
    """Greedy (argmax) decisions of a PPO actor network over ``DELTA_ACTIONS``, in numpy."""

    name = "rl"

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray, str | None]], meta: dict):
        """``layers``: (weight, bias, activation name or None) of the actor, input to logits."""
        self.layers = layers
        self.meta = meta
        self.num_layers = int(meta["num_layers"])

    @classmethod
    def load(cls, path: str | Path) -> RLPolicy:
        """Load ``path`` (a .zip) and its metadata; CheckpointError on any problem."""
        if not Path(path).is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        meta = read_metadata(path)
        try:
            # Imported here: the runtime can run the heuristic even where SB3 is broken.
            from stable_baselines3 import PPO

            policy = PPO.load(str(path), device="cpu").policy
            layers = _actor_layers(policy)
        except CheckpointError:
            raise
        except Exception as err:  # a corrupt zip fails in many ways (zipfile, torch, pickle)
            raise CheckpointError(f"cannot load checkpoint {path}: {err}") from err
        n_actions = layers[-1][0].shape[0]
        if meta.get("action_mode") != "delta" or n_actions != len(DELTA_ACTIONS):
            raise CheckpointError(
                f"checkpoint {path} has {n_actions} actions in mode {meta.get('action_mode')!r};"
                f" this code expects mode 'delta' with actions {DELTA_ACTIONS}"
            )
        rl = cls(layers, meta)
        _check_matches_torch(rl, policy, path)
        return rl

    def logits(self, obs: np.ndarray) -> np.ndarray:
        """Action logits of the actor for one observation vector."""
        x = obs.astype(np.float64)
        for weight, bias, activation in self.layers:
            x = weight @ x + bias
            if activation is not None:
                x = _ACTIVATIONS[activation](x)
        return x

    def decide(self, snap: LoadSnapshot) -> int:
        """Current layers plus the argmax delta, within [0, num_layers]; PolicyOutputError
        when the output cannot be trusted."""
        if snap.num_layers != self.num_layers:
            raise PolicyOutputError(
                f"policy trained for {self.num_layers} layers, server has {snap.num_layers}"
            )
        logits = self.logits(observation_vector(snap))
        if not np.all(np.isfinite(logits)):
            raise PolicyOutputError(f"non-finite policy output {logits.tolist()}")
        target = snap.quantized_layers + DELTA_ACTIONS[int(np.argmax(logits))]
        return min(max(target, 0), snap.num_layers)


def _actor_layers(policy) -> list[tuple[np.ndarray, np.ndarray, str | None]]:
    """The actor path of an SB3 ActorCriticPolicy (MLP extractor, then action head)."""
    import torch

    modules = [*policy.mlp_extractor.policy_net, policy.action_net]
    layers: list[tuple[np.ndarray, np.ndarray, str | None]] = []
    for module in modules:
        if isinstance(module, torch.nn.Linear):
            layers.append(
                (module.weight.detach().double().numpy(), module.bias.detach().double().numpy(),
                 None)
            )
        elif type(module).__name__ in _ACTIVATIONS and layers and layers[-1][2] is None:
            weight, bias, _ = layers[-1]
            layers[-1] = (weight, bias, type(module).__name__)
        else:
            raise CheckpointError(f"unsupported module in the actor network: {module}")
    return layers


def _check_matches_torch(rl: RLPolicy, policy, path: str | Path) -> None:
    """The numpy copy must reproduce SB3's own logits, or the copy is wrong, not the input."""
    import torch

    probe = np.linspace(0.0, 1.0, OBS_SIZE, dtype=np.float32)
    with torch.no_grad():
        dist = policy.get_distribution(torch.as_tensor(probe).unsqueeze(0))
        expected = dist.distribution.logits.squeeze(0).double().numpy()
    got = rl.logits(probe)
    got = got - np.log(np.sum(np.exp(got - got.max()))) - got.max()  # SB3 normalises logits
    if not np.allclose(got, expected, atol=1e-4):
        raise CheckpointError(f"checkpoint {path}: numpy actor does not match the SB3 policy")


class FallbackPolicy:
    """RL when it works, the heuristic when it does not; counts and logs every fallback."""

    name = "rl+fallback"

    def __init__(
        self, rl: RLPolicy | None, heuristic: HeuristicPolicy | None = None,
        load_error: str | None = None,
    ) -> None:
        self.rl = rl
        self.heuristic = heuristic or HeuristicPolicy()
        self.load_error = load_error
        self.fallbacks = 0

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, heuristic: HeuristicPolicy | None = None
    ) -> FallbackPolicy:
        """Never raises: a checkpoint that fails to load leaves the heuristic in charge."""
        try:
            return cls(RLPolicy.load(path), heuristic)
        except CheckpointError as err:
            logger.warning("RL checkpoint unusable, the heuristic decides instead: %s", err)
            return cls(None, heuristic, load_error=str(err))

    def decide(self, snap: LoadSnapshot) -> int:
        """The RL target, or the heuristic's when RL is unavailable or not finite.

        The heuristic is consulted every tick, even while RL decides, so that its dwell and
        idle clocks are current the moment it takes over (it costs microseconds)."""
        fallback = self.heuristic.decide(snap)
        if self.rl is None:
            reason = f"checkpoint failed to load: {self.load_error}"
        else:
            try:
                return self.rl.decide(snap)
            except PolicyOutputError as err:
                reason = str(err)
        self.fallbacks += 1
        logger.warning("RL policy fallback #%d to the heuristic: %s", self.fallbacks, reason)
        return fallback
