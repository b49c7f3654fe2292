"""The run directory on disk: the saved plan and one file per finished system-rep.

An evaluation of several systems takes many minutes, and Ctrl-C, a job runner's kill or a
crashed machine can end it anywhere. So the plan is written before the first server starts, and
each system-rep is written whole the moment it ends, to a temporary file renamed over its place:
a kill never leaves half a file, and ``python -m eval.run --resume DIR`` finds exactly the
system-reps that finished and replays the others with the same requests and SLOs.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from eval.replay import RequestRecord

PLAN_FILE = "plan.json"
PLAN_VERSION = 1


@dataclass
class SystemRun:
    """One replay of one system: its records, timeline and the server state around it.

    ``failure`` says why the rep does not count as a valid measurement of its system (for
    example an RL policy that fell back to the heuristic); its numbers are still reported."""

    system: str
    rep: int
    records: list[RequestRecord] = field(default_factory=list)
    timeline: list[dict] = field(default_factory=list)
    state_start: dict | None = None
    state_end: dict | None = None
    failure: str | None = None

    def to_json(self) -> dict:
        """The rep file's content."""
        return {
            "system": self.system,
            "rep": self.rep,
            "failure": self.failure,
            "state_start": self.state_start,
            "state_end": self.state_end,
            "records": [r.to_json() for r in self.records],
            "timeline": self.timeline,
        }

    @classmethod
    def from_json(cls, data: dict) -> SystemRun:
        """A rep as ``to_json`` wrote it."""
        return cls(
            data["system"],
            int(data["rep"]),
            [RequestRecord(**r) for r in data["records"]],
            list(data["timeline"]),
            data.get("state_start"),
            data.get("state_end"),
            data.get("failure"),
        )


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers (and a later resume) see the old file or the
    new one, never a part: a temporary file in the same directory, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: object) -> None:
    """``data`` as indented JSON, written atomically."""
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def rep_path(out_dir: Path, system: str, rep: int) -> Path:
    """Where a finished system-rep is kept."""
    return out_dir / system / f"rep{rep}.json"


def save_run(out_dir: Path, run: SystemRun) -> None:
    """Keep a finished system-rep (atomically)."""
    write_json_atomic(rep_path(out_dir, run.system, run.rep), run.to_json())


def finished_runs(out_dir: Path, systems: list[str], reps: int) -> dict[tuple[str, int], SystemRun]:
    """The system-reps of the plan that have a rep file in ``out_dir``."""
    found = {}
    for system in systems:
        for rep in range(reps):
            path = rep_path(out_dir, system, rep)
            if path.is_file():
                found[(system, rep)] = SystemRun.from_json(json.loads(path.read_text()))
    return found


def save_plan(out_dir: Path, plan: dict) -> None:
    """The plan's JSON form (see ``eval.plan.plan_json``), atomically."""
    write_json_atomic(out_dir / PLAN_FILE, {"version": PLAN_VERSION, **plan})


def read_plan(out_dir: Path) -> dict:
    """The saved plan; FileNotFoundError or ValueError (with the file's name) when there is no
    usable one."""
    path = out_dir / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a run directory of eval.run")
    try:
        plan = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not JSON: {err}") from err
    if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION:
        raise ValueError(f"{path}: not a plan of this version of eval.run")
    return plan
