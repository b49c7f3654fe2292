"""``python -m rl_controller.actor_export CHECKPOINT.zip``: the PPO actor as a numpy file.

Serving runs the policy with numpy alone (``rl_controller.rl_policy``), so the actor network of
an SB3 checkpoint is copied once, here, into ``NAME.actor.npz`` beside ``NAME.zip``: its weights
and activations, the checkpoint's sha256 (a re-trained zip is never run with a stale actor) and
SB3's own log-probabilities on a set of probe observations. The copy is refused unless numpy
reproduces those log-probabilities, and ``RLPolicy.load`` checks them again.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rl_controller.observation import OBS_SIZE
from rl_controller.policy import KV_FRACTIONS, RLActions
from rl_controller.rl_policy import (
    ACTIVATIONS,
    LOGIT_ATOL,
    CheckpointError,
    Layer,
    RLPolicy,
    actor_path,
    arrays_from_layers,
    file_sha256,
    forward,
    log_probs,
)
from sglang_morph.cli import FAILURE_STATUS, exit_with


def probe_observations(n_random: int = 16, seed: int = 0) -> np.ndarray:
    """Observations the export is checked on: the corners of [0, 1]^OBS_SIZE, a ramp, and
    uniform random points (features all lie in [0, 1])."""
    rng = np.random.default_rng(seed)
    fixed = [np.zeros(OBS_SIZE), np.ones(OBS_SIZE), np.linspace(0.0, 1.0, OBS_SIZE)]
    return np.vstack([*fixed, rng.random((n_random, OBS_SIZE))]).astype(np.float32)


def export_actor(zip_path: str | Path) -> Path:
    """Write ``NAME.actor.npz`` beside ``zip_path`` (an SB3 PPO ``NAME.zip``) and return its
    path; CheckpointError when the checkpoint cannot be loaded, has layers the numpy actor does
    not implement, or numpy does not reproduce SB3's log-probabilities.

    ``NAME.json`` must be written too before the policy can be served (``RLPolicy.load`` reads
    both); the order of the two does not matter.
    """
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise CheckpointError(f"checkpoint {zip_path} does not exist")
    try:
        from stable_baselines3 import PPO

        policy = PPO.load(str(zip_path), device="cpu").policy
    except Exception as err:  # a corrupt zip fails in many ways (zipfile, torch, pickle)
        raise CheckpointError(f"cannot load checkpoint {zip_path}: {err}") from err
    actions = _action_heads(policy, zip_path)
    layers = _actor_layers(policy, zip_path)
    probes = probe_observations()
    expected = _sb3_log_probs(policy, probes)
    got = log_probs(np.stack([forward(layers, p) for p in probes]), actions.nvec)
    if not np.allclose(got, expected, atol=LOGIT_ATOL):
        worst = float(np.abs(got - expected).max())
        raise CheckpointError(
            f"checkpoint {zip_path}: the numpy actor's log-probabilities differ from SB3's by "
            f"{worst:.3g} (tolerance {LOGIT_ATOL:g})"
        )
    out = actor_path(zip_path)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(
            fh, **arrays_from_layers(layers), probes=probes, probe_log_probs=expected,
            checkpoint_sha256=np.array(file_sha256(zip_path)),
        )
    os.replace(tmp, out)
    return out


def _action_heads(policy, zip_path: Path) -> RLActions:
    """The heads the checkpoint was trained with; CheckpointError for a space this code cannot
    read as a layer delta and a KV fraction (e.g. the earlier ``Discrete(3)`` layer delta
    alone): its actor's outputs would be read as the wrong heads."""
    from gymnasium.spaces import MultiDiscrete

    space = policy.action_space
    nvec = tuple(space.nvec.tolist()) if isinstance(space, MultiDiscrete) else ()
    if len(nvec) != 2 or nvec[0] < 3 or nvec[1] != len(KV_FRACTIONS):
        raise CheckpointError(
            f"checkpoint {zip_path} was trained with action space {space}; this code expects "
            f"MultiDiscrete([n, {len(KV_FRACTIONS)}]): layer deltas -1..n-2, KV fractions "
            f"{list(KV_FRACTIONS)}: retrain it"
        )
    return RLActions.up_to(nvec[0] - 2)


def _actor_layers(policy, zip_path: Path) -> list[Layer]:
    """The actor path of an SB3 ActorCriticPolicy (MLP extractor, then action head)."""
    import torch

    modules = [*policy.mlp_extractor.policy_net, policy.action_net]
    layers: list[Layer] = []
    for module in modules:
        if isinstance(module, torch.nn.Linear):
            weight = module.weight.detach().double().numpy()
            layers.append((weight, module.bias.detach().double().numpy(), None))
        elif type(module).__name__ in ACTIVATIONS and layers and layers[-1][2] is None:
            weight, bias, _ = layers[-1]
            layers[-1] = (weight, bias, type(module).__name__)
        else:
            raise CheckpointError(
                f"checkpoint {zip_path}: unsupported module in the actor network: {module} "
                f"(supported: Linear, {', '.join(ACTIVATIONS)})"
            )
    return layers


def _sb3_log_probs(policy, probes: np.ndarray) -> np.ndarray:
    """SB3's log-probabilities for each probe observation: every head's categorical
    (normalised) logits, concatenated in head order."""
    import torch

    with torch.no_grad():
        dist = policy.get_distribution(torch.as_tensor(probes))
        return torch.cat([head.logits for head in dist.distribution], dim=1).double().numpy()


def main(argv: Sequence[str] | None = None) -> None:
    """Export, then load the result the way the server will. A checkpoint that cannot be
    exported is the user's input to change: one line and exit status 2; a write that fails, 1."""
    parser = argparse.ArgumentParser(prog="python -m rl_controller.actor_export",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="SB3 PPO checkpoint NAME.zip (NAME.json beside it)")
    args = parser.parse_args(argv)
    try:
        out = export_actor(args.checkpoint)
        RLPolicy.load(args.checkpoint)
    except CheckpointError as err:
        exit_with(err)
    except OSError as err:
        exit_with(f"cannot write the actor beside {args.checkpoint}: {err}", FAILURE_STATUS)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
