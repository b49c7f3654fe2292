"""Request traces: loading public production traces and shaping them for a small model.

The evaluation replays real arrival patterns (Azure LLM inference 2023, BurstGPT, Mooncake)
because MorphServe's claims are about bursts; synthetic Poisson load would hide them. The traces'
token lengths (p50 input > 1,000 tokens) exceed stories260K's 512-token context, and its CPU
throughput is far below a GPU's, so every replay states a window, a time scale and a length
mapping. Those three transformations live here, and each one records itself in ``Trace.meta``
so that reports can print exactly what was replayed. Mooncake also says which prompts share a
prefix (its ``hash_ids``); requests keep them, so a replay exercises SGLang's prefix cache as
the trace dictates (prompt tokens: ``eval.prompts``).
"""

from __future__ import annotations

import bisect
import calendar
import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

NAMED_TRACES = {"azure-code": "azure-code", "azure-conv": "azure-conv", "mooncake": "mooncake"}
"""Trace names accepted by ``load_trace`` -> asset names of ``sglang_morph.data.resolve``."""

FORMATS = ("azure", "burstgpt", "mooncake")
_FORMAT_HELP = "Azure 2023 CSV, BurstGPT CSV, Mooncake JSONL"
_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")
_EPS = 1e-9
MOONCAKE_BLOCK_TOKENS = 512
"""Prompt tokens per Mooncake ``hash_ids`` entry (the trace's block size)."""


class TraceError(ValueError):
    """A trace that cannot be loaded or a transformation that does not fit it."""


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: when it arrives and how many tokens go in and come out.

    ``hash_ids`` (Mooncake only; None for traces without them) names the prompt's blocks of
    ``MOONCAKE_BLOCK_TOKENS`` source tokens in order: requests with equal leading ids share that
    prefix, which is what a prefix cache can reuse.
    """

    arrival_s: float
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Trace:
    """A named, time-sorted request sequence; ``meta`` says how it was derived from its source.

    ``arrival_s`` is relative to the start of the trace (or of the selected window). ``meta``
    holds ``source``, ``format``, ``window`` (seconds of the source trace, or None),
    ``time_scale`` (speed-up applied) and ``length_mapping`` (a LengthMapping as a dict, or None);
    windows also set ``span_s``, their length in this trace's seconds, because a window usually
    ends some time after its last arrival.
    """

    name: str
    requests: tuple[TraceRequest, ...]
    meta: dict = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        """Length of the trace: its window's length when windowed, else the last arrival."""
        if "span_s" in self.meta:
            return float(self.meta["span_s"])
        return self.requests[-1].arrival_s if self.requests else 0.0


@dataclass(frozen=True)
class LengthMapping:
    """How production token counts are shrunk to fit a small model's context.

    Each length becomes ``clip(round(x / div), min, max)``. The defaults keep
    ``input_max + output_max = 450`` inside stories260K's 512-token context. Prompts shrink 16x
    (Azure's are ~1,000-1,500 tokens) while outputs keep their production length (clipped): the
    decode phase is what holds KV for long, so shrinking it would turn a KV-bound burst into a
    prefill-bound one, which is not the regime MorphServe addresses.
    """

    input_div: float = 16
    input_min: int = 8
    input_max: int = 300
    output_div: float = 1
    output_min: int = 4
    output_max: int = 150


def load_trace(name_or_path: str, fmt: str | None = None, data_dir: str | None = None) -> Trace:
    """Load a named trace (``azure-code``, ``azure-conv``) or a trace file.

    ``fmt`` is one of ``azure``, ``burstgpt``, ``mooncake``; without it the format is detected
    from the file's extension and CSV header. Malformed rows raise TraceError naming the file
    and the line, so a broken trace fails before any server starts.
    """
    if fmt is not None and fmt not in FORMATS:
        raise TraceError(f"unknown trace format {fmt!r}; accepted: {', '.join(FORMATS)}")
    path = _locate(name_or_path, data_dir)
    fmt = fmt or _detect_format(path)
    loaders = {"azure": _load_azure, "burstgpt": _load_burstgpt, "mooncake": _load_mooncake}
    rows = loaders[fmt](path)
    if not rows:
        raise TraceError(f"{path}: no requests in the trace")
    rows.sort(key=lambda r: r.arrival_s)
    t0 = rows[0].arrival_s
    requests = tuple(replace(r, arrival_s=r.arrival_s - t0) for r in rows)
    name = name_or_path if name_or_path in NAMED_TRACES else path.stem
    meta = {
        "source": str(path),
        "format": fmt,
        "window": None,
        "time_scale": 1.0,
        "length_mapping": None,
    }
    return Trace(name, requests, meta)


def select_window(trace: Trace, start_s: float, end_s: float) -> Trace:
    """Requests arriving in ``[start_s, end_s)``, re-timed to start at 0.

    Seconds are those of ``trace`` (after any earlier scaling); ``meta['window']`` records the
    window in seconds of the source trace so that reports stay comparable across time scales.
    """
    duration = trace.duration_s
    if not (0 <= start_s < end_s) or start_s >= duration or end_s > duration + _EPS:
        raise TraceError(
            f"window {start_s:g}:{end_s:g} s is outside trace {trace.name!r}, which spans "
            f"0:{duration:g} s (start must be >= 0 and < end, end <= {duration:g})"
        )
    arrivals = [r.arrival_s for r in trace.requests]
    lo = bisect.bisect_left(arrivals, start_s - _EPS)
    hi = bisect.bisect_left(arrivals, end_s - _EPS)
    requests = tuple(replace(r, arrival_s=r.arrival_s - start_s) for r in trace.requests[lo:hi])
    scale = float(trace.meta.get("time_scale", 1.0))
    offset = (trace.meta.get("window") or [0.0, 0.0])[0]
    meta = dict(trace.meta)
    meta["window"] = [offset + start_s * scale, offset + end_s * scale]
    meta["span_s"] = end_s - start_s
    return Trace(trace.name, requests, meta)


def burstiest_window(trace: Trace, length_s: float) -> tuple[float, float]:
    """The ``length_s``-long window ``[start, start + length_s)`` holding the most arrivals.

    Criterion: the largest request count, which is always reached by a window that starts at an
    arrival (or ends at the trace's end); ties go to the earliest window. Request count rather
    than token count is used because queueing, the pressure MorphServe relieves, follows arrivals.
    """
    duration = trace.duration_s
    if length_s <= 0 or length_s > duration + _EPS:
        raise TraceError(
            f"burst window length {length_s:g} s must be > 0 and fit in trace "
            f"{trace.name!r}, which spans {duration:g} s"
        )
    arrivals = [r.arrival_s for r in trace.requests]
    last_start = max(0.0, duration - length_s)
    starts = [t for t in arrivals if t <= last_start] + [last_start]
    best_start, best_count = starts[0], -1
    for start in starts:
        count = bisect.bisect_left(arrivals, start + length_s) - bisect.bisect_left(arrivals, start)
        if count > best_count:
            best_start, best_count = start, count
    return best_start, best_start + length_s


def scale_time(trace: Trace, speedup: float) -> Trace:
    """Compress time by ``speedup`` (arrival_s / speedup), to load a slow server as hard as a
    fast one was loaded in production. Successive scalings multiply in ``meta['time_scale']``."""
    if not speedup > 0 or math.isinf(speedup):
        raise TraceError(f"time scale must be a positive finite speed-up, got {speedup!r}")
    requests = tuple(replace(r, arrival_s=r.arrival_s / speedup) for r in trace.requests)
    meta = dict(trace.meta)
    meta["time_scale"] = float(trace.meta.get("time_scale", 1.0)) * speedup
    if "span_s" in meta:
        meta["span_s"] = meta["span_s"] / speedup
    return Trace(trace.name, requests, meta)


def map_lengths(trace: Trace, mapping: LengthMapping) -> Trace:
    """Shrink every request's lengths with ``mapping``; deterministic (pure arithmetic)."""
    if mapping.input_div <= 0 or mapping.output_div <= 0:
        raise TraceError("length mapping divisors must be positive")
    if not (1 <= mapping.input_min <= mapping.input_max):
        raise TraceError("length mapping needs 1 <= input_min <= input_max")
    if not (1 <= mapping.output_min <= mapping.output_max):
        raise TraceError("length mapping needs 1 <= output_min <= output_max")
    m = mapping
    requests = tuple(
        replace(
            r,
            input_tokens=_clip(r.input_tokens / m.input_div, m.input_min, m.input_max),
            output_tokens=_clip(r.output_tokens / m.output_div, m.output_min, m.output_max),
        )
        for r in trace.requests
    )
    meta = dict(trace.meta)
    meta["length_mapping"] = asdict(mapping)
    return Trace(trace.name, requests, meta)


def poisson_load(trace: Trace, rate: float, seconds: float, seed: int) -> tuple[TraceRequest, ...]:
    """Constant-rate Poisson arrivals over ``seconds``, each request's lengths those of a
    request of ``trace`` drawn at random (seeded: every policy gets the same requests)."""
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * seconds * 2) + 16))
    times = times[times < seconds]
    shapes = rng.integers(len(trace.requests), size=len(times))
    return tuple(replace(trace.requests[i], arrival_s=float(t), hash_ids=None)
                 for i, t in zip(shapes, times, strict=True))


def request_row(request: TraceRequest) -> list:
    """A request as a JSON row (a saved plan's): ``[arrival_s, input, output]``, plus the list of
    hash ids when it has them, so plans of traces without them keep their old form."""
    row: list = [request.arrival_s, request.input_tokens, request.output_tokens]
    if request.hash_ids is not None:
        row.append(list(request.hash_ids))
    return row


def request_from_row(row: list) -> TraceRequest:
    """The request ``request_row`` wrote."""
    hash_ids = tuple(int(h) for h in row[3]) if len(row) > 3 else None
    return TraceRequest(float(row[0]), int(row[1]), int(row[2]), hash_ids)


def _clip(value: float, low: int, high: int) -> int:
    return max(low, min(high, round(value)))


def _locate(name_or_path: str, data_dir: str | None) -> Path:
    if name_or_path in NAMED_TRACES:
        from sglang_morph.data import resolve

        try:
            return Path(resolve(NAMED_TRACES[name_or_path], data_dir))
        except FileNotFoundError as err:
            raise TraceError(f"trace {name_or_path!r} is not available: {err}") from err
    path = Path(name_or_path)
    if not path.is_file():
        raise TraceError(
            f"unknown trace {name_or_path!r}: neither a named trace "
            f"({', '.join(NAMED_TRACES)}) nor an existing file ({_FORMAT_HELP})"
        )
    return path


def _detect_format(path: Path) -> str:
    if path.suffix.lower() in (".jsonl", ".json"):
        return "mooncake"
    with open(path, newline="", encoding="utf-8") as fh:
        header = [c.strip() for c in next(csv.reader(fh), [])]
    if all(c in header for c in _AZURE_COLUMNS):
        return "azure"
    if all(c in header for c in _BURSTGPT_COLUMNS):
        return "burstgpt"
    if header and header[0].startswith("{"):
        return "mooncake"
    raise TraceError(
        f"{path}: cannot tell the trace format from its header {header[:6]}; expected "
        f"{_FORMAT_HELP} (Azure columns {', '.join(_AZURE_COLUMNS)}; BurstGPT columns "
        f"{', '.join(_BURSTGPT_COLUMNS)}) or pass fmt= one of {', '.join(FORMATS)}"
    )


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs with the required ``columns`` checked."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = [c.strip() for c in next(reader, [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise TraceError(f"{path}:1: header lacks column(s) {', '.join(missing)}")
        rows = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise TraceError(
                    f"{path}:{reader.line_num}: expected {len(header)} fields, got {len(values)}"
                )
            rows.append(
                (reader.line_num, dict(zip(header, (v.strip() for v in values), strict=True)))
            )
    return rows


def _load_azure(path: Path) -> list[TraceRequest]:
    rows = []
    for line, row in _read_csv(path, _AZURE_COLUMNS):
        where = f"{path}:{line}"
        rows.append(
            TraceRequest(
                _timestamp(row["TIMESTAMP"], where),
                _count(row["ContextTokens"], "ContextTokens", where),
                _count(row["GeneratedTokens"], "GeneratedTokens", where),
            )
        )
    return rows


def _load_burstgpt(path: Path) -> list[TraceRequest]:
    rows = []
    for line, row in _read_csv(path, _BURSTGPT_COLUMNS):
        where = f"{path}:{line}"
        arrival = _number(row["Timestamp"], "Timestamp", where)
        response = _count(row["Response tokens"], "Response tokens", where)
        if response == 0:  # BurstGPT logs failed requests with no response: not served load
            continue
        request = _count(row["Request tokens"], "Request tokens", where)
        rows.append(TraceRequest(arrival, request, response))
    return rows


def _load_mooncake(path: Path) -> list[TraceRequest]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TraceError(f"{where}: not a JSON object ({err.msg})") from err
            if not isinstance(record, dict):
                raise TraceError(f"{where}: expected a JSON object per line")
            for key in ("timestamp", "input_length", "output_length"):
                if key not in record:
                    raise TraceError(f"{where}: missing field {key!r}")
            rows.append(
                TraceRequest(
                    _number(record["timestamp"], "timestamp", where) / 1000.0,
                    _count(record["input_length"], "input_length", where),
                    _count(record["output_length"], "output_length", where),
                    _hash_ids(record.get("hash_ids"), where),
                )
            )
    return rows


def _hash_ids(value: object, where: str) -> tuple[int, ...] | None:
    """Mooncake's block ids: absent or null means none; otherwise a list of non-negative ints."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise TraceError(f"{where}: hash_ids must be a list of non-negative integers")
    return tuple(_count(h, "hash_ids entry", where) for h in value)


def _number(text: object, column: str, where: str) -> float:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TraceError(f"{where}: {column} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise TraceError(f"{where}: {column} is not finite: {text!r}")
    return value


def _count(text: object, column: str, where: str) -> int:
    value = _number(text, column, where)
    if value < 0 or value != int(value):
        raise TraceError(f"{where}: {column} must be a non-negative integer, got {text!r}")
    return int(value)


def _timestamp(text: str, where: str) -> float:
    """Seconds since the epoch of an Azure ``YYYY-MM-DD HH:MM:SS.fffffff`` timestamp (UTC).

    Parsed by hand because Azure writes 7 fractional digits, which Python 3.10's
    ``datetime.fromisoformat`` rejects.
    """
    head, _, frac = text.partition(".")
    try:
        whole = calendar.timegm(time.strptime(head, "%Y-%m-%d %H:%M:%S"))
        return whole + (float("0." + frac) if frac else 0.0)
    except ValueError:
        raise TraceError(
            f"{where}: TIMESTAMP is not 'YYYY-MM-DD HH:MM:SS[.fraction]': {text!r}"
        ) from None
