"""The exit-status rule of every command: input the user must change (an option's value, a file
it names) exits with status 2 and one line ``error: ...`` on stderr, before any server starts or
any long computation runs; a failure while running exits with status 1.

Why one rule: a script (CI, a shell loop, the evaluation harness) tells "fix the command line"
from "it broke" by the status alone, and the line naming the option and what it accepts is all a
user needs to fix a typo; a traceback for a wrong path buries that line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

USAGE_STATUS = 2
FAILURE_STATUS = 1

T = TypeVar("T")


class UsageError(ValueError):
    """Input the user must change on the command line; the message names the option and what
    it accepts."""


def exit_with(err: object, status: int = USAGE_STATUS) -> NoReturn:
    """Print ``error: <err>`` on stderr and exit with ``status`` (2: usage, 1: failure)."""
    print(f"error: {err}", file=sys.stderr)
    sys.exit(status)


def positive_int(text: str) -> int:
    """argparse type: a whole number > 0."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, got {text!r}")
    return value


def _number(text: str, accepted: Callable[[float], bool], expected: str) -> float:
    """``text`` as a float when ``accepted`` holds for it, else argparse's error naming
    ``expected``."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not accepted(value):  # NaN fails every comparison, so it is refused too
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, lambda v: 0 < v < float("inf"), "a number > 0")


def seconds(text: str) -> float:
    """argparse type: a finite number of seconds >= 0 (0 turns a delay off)."""
    return _number(text, lambda v: 0 <= v < float("inf"), "a number of seconds >= 0")


def share(text: str) -> float:
    """argparse type: a fraction in [0, 1) (0 turns a rule off)."""
    return _number(text, lambda v: 0 <= v < 1, "a fraction >= 0 and < 1")


def output_path(flag: str, path: str | os.PathLike) -> Path:
    """``path`` once its directory exists (created if needed) and is writable.

    Checked up front so that a run of minutes or hours does not end in a write that fails;
    raises UsageError naming ``flag`` otherwise.
    """
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{flag} {out} is a directory; give a file path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(
            f"{flag} {out}: cannot create directory {out.parent}: {err.strerror or err}"
        ) from err
    if not os.access(out.parent, os.W_OK):
        raise UsageError(f"{flag} {out}: directory {out.parent} is not writable")
    return out


def read_input(flag: str, load: Callable[[], T]) -> T:
    """``load()``, which reads the file (or named asset) that ``flag`` gives: any error reading
    or parsing it becomes a UsageError naming ``flag``, raised before the command's work."""
    try:
        return load()
    except OSError as err:
        where = f"{err.filename}: {err.strerror}" if err.filename and err.strerror else err
        raise UsageError(f"{flag}: {where}") from err
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{flag}: {err}") from err
