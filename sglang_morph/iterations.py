"""A log of scheduler iterations: what each batch held and how long its iteration took.

The simulator is calibrated from these samples and the swap stall is compared with them. The log
is a JSONL file (path in the morph config) so that reading it costs the scheduler nothing; it is
rotated at ``MAX_LOG_BYTES`` (the previous file kept as ``PATH.1``), so a server that runs for
days keeps a bounded log, and ``read_tail`` reads only the end of it.

An iteration is timed twice. ``forward_s`` is the model forward alone (``run_batch``).
``loop_s`` is the whole pass of the scheduler loop that ran it, from entering
``get_next_batch_to_run`` (controller tick, scheduling) through the forward, sending the results
and receiving new requests, to the next entry: the time the next batch really waits, which a
simulator fitted to forwards alone would miss (docs/controller.md). Idle passes (no batch) are
not logged: the loop's idle sleep happens after the pass entry, so it never enters ``loop_s``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sglang_morph.timings import Timings

MAX_LOG_BYTES = 32 * 2**20
"""Size at which the log is rotated. Two files (current and previous) then always hold at least
this much, more than the largest tail ``GET /morph/iterations`` returns."""

MAX_TAIL_RECORDS = 100_000
"""Most records one ``read_tail`` returns."""

_BLOCK = 1 << 16


def previous_path(path: str | Path) -> Path:
    """Where the log's previous file goes when it is rotated."""
    return Path(f"{path}.1")


class IterationLog:
    """Appends one record per forward once the loop comes round; keeps recent decode times."""

    def __init__(self, path: str | None, max_bytes: int = MAX_LOG_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._fh = open(path, "a", buffering=1) if path else None
        self.decode = Timings()
        self._pass_start_s: float | None = None
        self._open: tuple[dict, float] | None = None
        """The last forward's record and its pass start, waiting for the next pass entry."""

    def loop_pass(self, now_s: float) -> None:
        """The scheduler entered ``get_next_batch_to_run`` at ``now_s`` (perf_counter): this
        ends the iteration of the previous forward, whose record is written now."""
        if self._open is not None:
            rec, pass_start_s = self._open
            self._open = None
            rec["loop_s"] = now_s - pass_start_s
            self._write(rec)
        self._pass_start_s = now_s

    def record(self, batch, start_s: float, forward_s: float, quantized_layers: int) -> None:
        """One forward that began at ``start_s`` (perf_counter) and took ``forward_s``."""
        decode = bool(batch.forward_mode.is_decode())
        prefill_tokens = 0 if decode else int(batch.extend_num_tokens or 0)
        n = len(batch.reqs)
        if decode:
            self.decode.add(forward_s)
        rec = {
            "batch_tokens": n if decode else prefill_tokens,
            "prefill_tokens": prefill_tokens,
            "decode_reqs": n if decode else 0,
            "quantized_layers": quantized_layers,
            "context_tokens": int(batch.seq_lens_cpu.sum()),
            "start_s": start_s,
            "forward_s": forward_s,
        }
        self._open = (rec, start_s if self._pass_start_s is None else self._pass_start_s)

    def median_decode_s(self) -> float | None:
        return self.decode.median()

    def bytes_on_disk(self) -> int:
        """Size of the log's current and previous files (bounded by rotation)."""
        if self.path is None:
            return 0
        return sum(p.stat().st_size for p in (Path(self.path), previous_path(self.path))
                   if p.exists())

    def bytes_bound(self) -> int:
        """The most bytes the two files can hold: each is rotated on the first record that
        takes it past ``max_bytes``, and a record is far below 4 KiB."""
        return 2 * (self.max_bytes + 4096)

    def _write(self, rec: dict) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(rec) + "\n")
        if self._fh.tell() >= self.max_bytes:
            self._fh.close()
            os.replace(self.path, previous_path(self.path))
            self._fh = open(self.path, "a", buffering=1)


def read_tail(path: str | Path, limit: int) -> list[dict]:
    """The newest ``limit`` records (at most ``MAX_TAIL_RECORDS``) of the log at ``path`` and
    its previous file, oldest first, reading only as much of the files' ends as they need.

    A record being written at this moment (no newline yet) is left out.
    """
    limit = max(1, min(limit, MAX_TAIL_RECORDS))
    lines = _tail_lines(Path(path), limit)
    if len(lines) < limit:
        lines = _tail_lines(previous_path(path), limit - len(lines)) + lines
    return [json.loads(line) for line in lines]


def _tail_lines(path: Path, limit: int) -> list[bytes]:
    """The last ``limit`` complete, non-empty lines of ``path`` (none if it does not exist)."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return []
    with fh:
        end = fh.seek(0, os.SEEK_END)
        pos, data = end, b""
        while pos > 0 and data.count(b"\n") <= limit:
            step = min(_BLOCK, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
    parts = data[: data.rfind(b"\n") + 1].split(b"\n")
    if pos > 0:
        parts = parts[1:]  # it may have begun before what was read
    return [line for line in parts if line.strip()][-limit:]
