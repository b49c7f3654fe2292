"""Checks that the installed SGLang is the pinned release, with a one-line error otherwise.

The plugin hooks SGLang internals (scheduler, memory pool, linear layers) whose shapes change
between releases, so running against another version would fail in obscure ways mid-serving.
"""

from __future__ import annotations

import sys
from importlib import metadata

from sglang_morph import SGLANG_VERSION


class MorphSetupError(RuntimeError):
    """A configuration problem found before any server process starts."""


def installed_sglang_version() -> str | None:
    """The installed SGLang distribution's version, or None when it is not installed."""
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def check_sglang_version(found: str | None = None) -> None:
    """Raise MorphSetupError unless SGLang ``SGLANG_VERSION`` exactly is installed."""
    found = installed_sglang_version() if found is None else found
    if found is None:
        raise MorphSetupError(
            f"SGLang is not installed; sglang-morph needs sglang=={SGLANG_VERSION} "
            "(run scripts/setup.sh)"
        )
    if found != SGLANG_VERSION:
        raise MorphSetupError(
            f"sglang-morph needs sglang=={SGLANG_VERSION} exactly, but sglang=={found} is "
            f"installed (pip install sglang=={SGLANG_VERSION}, or run scripts/setup.sh)"
        )


def main() -> int:
    """``python -m sglang_morph.compat``: print the check's result for set-up scripts."""
    try:
        check_sglang_version()
    except MorphSetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"sglang-morph: sglang=={SGLANG_VERSION} found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
