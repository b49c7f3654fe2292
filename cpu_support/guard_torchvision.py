"""Make PyPI's torchvision importable beside a CPU-only torch.

SGLang 0.5.23 imports ``torchvision.transforms`` at start-up (configs -> nano_nemotron_vl ->
internvl_utils). PyPI's torchvision wheel is linked against CUDA torch, so its ``_C`` ops do not
load beside the CPU torch build, and two unguarded ``register_fake`` decorators in
``torchvision/_meta_registrations.py`` then raise ``operator torchvision::nms does not exist``.
This script guards exactly those two registrations (idempotent). torchvision's detection ops stay
unavailable, which SGLang's text models never use.

Usage: python cpu_support/guard_torchvision.py
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

MARK = "# guarded by sglang-morph cpu_support"
GUARD = f'''
{MARK}
def _morph_fake_if_registered(name):
    import torch as _torch
    namespace, op = name.split("::")
    if hasattr(getattr(_torch.ops, namespace), op):
        return _torch.library.register_fake(name)
    return lambda fn: fn
'''


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("guard_torchvision: torchvision is not installed", file=sys.stderr)
        return 1
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if MARK in text:
        return 0
    for op in ("nms", "qnms"):
        old = f'@torch.library.register_fake("torchvision::{op}")'
        if old not in text:
            print(f"guard_torchvision: {old} not found in {path}", file=sys.stderr)
            return 1
        text = text.replace(old, f'@_morph_fake_if_registered("torchvision::{op}")')
    head, sep, rest = text.partition("\n\n\n")
    path.write_text(head + GUARD + sep + rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
