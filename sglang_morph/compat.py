"""Checks that the installed SGLang is the pinned release, with a one-line error otherwise.

The plugin hooks SGLang internals (scheduler, memory pool, linear layers) whose shapes change
between releases, so running against another version would fail in obscure ways mid-serving.
"""

from __future__ import annotations

import pkgutil
import sys
from collections.abc import Iterable
from importlib import metadata
from types import CellType

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


def _resolve(target: str) -> object:
    """The object at the dotted ``target`` (its module imported), as SGLang's HookRegistry
    resolves it; raises ImportError or AttributeError when it does not exist."""
    owner, _, attr = target.rpartition(".")
    return getattr(pkgutil.resolve_name(owner), attr)


def _hook_error(target: str, problem: str) -> MorphSetupError:
    return MorphSetupError(
        f"SGLang hook target {target} {problem}; sglang-morph needs sglang=={SGLANG_VERSION}"
    )


def check_hook_targets(targets: Iterable[str]) -> None:
    """Raise MorphSetupError naming the first of ``targets`` that does not resolve.

    SGLang's HookRegistry only logs a target it cannot attach and serves on without it, so a
    renamed scheduler method would quietly leave the plugin half installed; the launcher
    resolves every target first and refuses to start instead.
    """
    for target in targets:
        try:
            _resolve(target)
        except (ImportError, AttributeError, ValueError) as err:
            raise _hook_error(target, f"does not exist ({type(err).__name__})") from err


def _carries(obj: object, hook: object) -> bool:
    """Whether ``obj`` is ``hook`` or a HookRegistry wrapper chain that calls ``hook``."""
    seen = 0
    while obj is not None and seen < 64:  # a chain of wrappers, one per registered hook
        cells = getattr(obj, "__closure__", None) or ()
        if obj is hook or any(_cell_value(c) is hook for c in cells):
            return True
        obj, seen = getattr(obj, "__wrapped__", None), seen + 1
    return False


def _cell_value(cell: CellType) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not filled yet
        return None


def check_hooks_attached(hooks: Iterable[tuple[str, object]]) -> None:
    """Raise MorphSetupError naming the first ``(target, hook)`` whose target does not carry
    ``hook`` after SGLang applied the registered hooks (in the process that serves)."""
    for target, hook in hooks:
        try:
            current = _resolve(target)
        except (ImportError, AttributeError, ValueError) as err:
            raise _hook_error(target, "does not exist, so its hook was not attached") from err
        if not _carries(current, hook):
            raise _hook_error(target, "exists but its hook was not attached")


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
