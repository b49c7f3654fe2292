"""A log of scheduler iterations: what each forward held and how long it took.

The simulator is calibrated from these samples and the swap stall is compared with them. The log
is a JSONL file (path in the morph config) so that reading it costs the scheduler nothing.
"""

from __future__ import annotations

import json
from collections import deque


class IterationLog:
    """Appends one record per forward; keeps recent decode times in memory."""

    def __init__(self, path: str | None) -> None:
        self._fh = open(path, "a", buffering=1) if path else None
        self.decode_s: deque[float] = deque(maxlen=256)

    def record(self, batch, forward_s: float, quantized_layers: int) -> None:
        mode = batch.forward_mode
        decode = bool(mode.is_decode())
        prefill_tokens = 0 if decode else int(batch.extend_num_tokens or 0)
        n = len(batch.reqs)
        if decode:
            self.decode_s.append(forward_s)
        if self._fh is not None:
            rec = {
                "batch_tokens": n if decode else prefill_tokens,
                "prefill_tokens": prefill_tokens,
                "decode_reqs": n if decode else 0,
                "quantized_layers": quantized_layers,
                "forward_s": forward_s,
            }
            self._fh.write(json.dumps(rec) + "\n")

    def median_decode_s(self) -> float | None:
        if not self.decode_s:
            return None
        ordered = sorted(self.decode_s)
        return ordered[len(ordered) // 2]
