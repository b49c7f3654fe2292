"""A log of scheduler iterations: what each batch held and how long its iteration took.

The simulator is calibrated from these samples and the swap stall is compared with them. The log
is a JSONL file (path in the morph config) so that reading it costs the scheduler nothing.

An iteration is timed twice. ``forward_s`` is the model forward alone (``run_batch``).
``loop_s`` is the whole pass of the scheduler loop that ran it, from entering
``get_next_batch_to_run`` (controller tick, scheduling) through the forward, sending the results
and receiving new requests, to the next entry: the time the next batch really waits. On the
2-core CPU the loop around the forward adds a fifth to a third, which a simulator fitted to
forwards alone misses (its P95 TTFT came out a third of the engine's). Idle passes (no batch)
are not logged: the loop's idle sleep happens after the pass entry, so it never enters
``loop_s``.
"""

from __future__ import annotations

import json
from collections import deque


class IterationLog:
    """Appends one record per forward once the loop comes round; keeps recent decode times."""

    def __init__(self, path: str | None) -> None:
        self._fh = open(path, "a", buffering=1) if path else None
        self.decode_s: deque[float] = deque(maxlen=256)
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
            if self._fh is not None:
                self._fh.write(json.dumps(rec) + "\n")
        self._pass_start_s = now_s

    def record(self, batch, start_s: float, forward_s: float, quantized_layers: int) -> None:
        """One forward that began at ``start_s`` (perf_counter) and took ``forward_s``."""
        decode = bool(batch.forward_mode.is_decode())
        prefill_tokens = 0 if decode else int(batch.extend_num_tokens or 0)
        n = len(batch.reqs)
        if decode:
            self.decode_s.append(forward_s)
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
        if not self.decode_s:
            return None
        ordered = sorted(self.decode_s)
        return ordered[len(ordered) // 2]
