"""Reading a layer-importance profile (the JSON ``python -m sglang_morph.profile`` writes).

Torch-free, so the serving runtime, the launcher and the harness read profiles without importing
the offline profiler (torch + transformers); the profiler writes what this reads.
"""

from __future__ import annotations

import json
from pathlib import Path

from sglang_morph.paths import default_profile


class ProfileError(ValueError):
    """A file that is not a usable layer profile."""


def load_profile(path: str | Path) -> dict:
    """A profile, checked for the fields the runtime reads; ProfileError names what is wrong."""
    try:
        profile = json.loads(Path(path).read_text())
    except OSError as err:
        raise ProfileError(f"cannot read layer profile {path}: {err.strerror or err}") from err
    except ValueError as err:
        raise ProfileError(f"{path} is not JSON: {err}") from err
    if not isinstance(profile, dict):
        raise ProfileError(f"{path} is not a layer profile: expected a JSON object")
    missing = {"format", "num_layers", "layers", "layer_order"} - set(profile)
    if missing:
        raise ProfileError(f"{path} is not a layer profile: missing {sorted(missing)}")
    if sorted(profile["layer_order"]) != list(range(profile["num_layers"])):
        raise ProfileError(f"{path}: layer_order is not a permutation of the model's layers")
    return profile


LAST_TO_FIRST = "last_to_first"
"""The ``--morph-profile`` keyword for no profile: layers are quantized last to first."""


def shipped_profile(model: str, num_layers: int, fmt: str, method: str,
                    group_size: int) -> Path | None:
    """The profile the project ships for ``model`` (the name the profiler recorded: the
    embedded model's name, else its path), format, method and group size, when it has one:
    the server should quantize in the project's measured order without being told where that
    order lives. The layer count must match too; int8 has no groups."""
    path = default_profile(fmt, method)
    try:
        profile = load_profile(path)
    except ProfileError:
        return None
    same = (profile.get("model") == model
            and profile["num_layers"] == num_layers
            and profile["format"] == fmt
            and profile.get("quant_method", "rtn") == method
            and (fmt != "int4" or profile.get("group_size") == group_size))
    return path if same else None


def layer_order(profile: dict) -> list[int]:
    """Layers in the order to quantize them (least important first)."""
    return [int(i) for i in profile["layer_order"]]


def act_scale_lists(profile: dict) -> dict | None:
    """The AWQ input scales a profile carries (``{layer: {linear: [floats]}}``), None for RTN."""
    return profile.get("act_scales") or None
