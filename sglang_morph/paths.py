"""Where the project's own files are, always as absolute paths.

A server started by a harness runs with another working directory (SGLang must import installed
packages only), so a relative path handed to it silently points elsewhere. Every default lives
here, anchored at the checkout, and every path a user gives is made absolute with ``absolute``
before it leaves the process that parsed it.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_DIR = REPO_ROOT / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINT_DIR / "morph-ppo.zip"
"""The shipped RL policy (its metadata is ``morph-ppo.json`` beside it)."""
PROFILE_DIR = CHECKPOINT_DIR / "profiles"
CALIBRATION_DIR = REPO_ROOT / "envs" / "calibrations"
DEFAULT_CALIBRATION = CALIBRATION_DIR / "stories260K-cpu.json"
"""The simulator's iteration-time model fitted to the live engine on this machine kind."""


def default_profile(fmt: str = "int4", method: str = "rtn") -> Path:
    """The shipped layer-importance profile of the embedded model for ``fmt``/``method``."""
    suffix = "-awq" if method == "awq" else ""
    return PROFILE_DIR / f"stories260K-{fmt}{suffix}.json"


def absolute(path: str | os.PathLike) -> str:
    """``path`` as an absolute path: relative paths are taken from the current directory (where
    the user typed them), and ``~`` is expanded."""
    return str(Path(path).expanduser().resolve())


def repo_relative(path: str | os.PathLike) -> str:
    """``path`` relative to the checkout when it lies inside it or beside it (the shared data
    folder next to the checkout: ``../shared/...``), for metadata and reports that must not
    carry machine paths; anything else unchanged."""
    p = Path(path).resolve()
    if p.is_relative_to(REPO_ROOT):
        return str(p.relative_to(REPO_ROOT))
    if p.is_relative_to(REPO_ROOT.parent) and REPO_ROOT.parent != Path(p.anchor):
        return str(Path("..") / p.relative_to(REPO_ROOT.parent))
    return str(path)
