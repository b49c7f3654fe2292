"""Open-loop trace replay against SGLang's native ``/generate`` endpoint, with streaming.

Why not ``sglang.bench_serving``: its Mooncake loader ignores ``input_length`` and builds every
prompt from ``"hi "`` x 128 plus a chat template, which overflows stories260K's 512-token context
and gives no control over lengths. This client sends ``input_ids`` of exactly the mapped length,
so each server sees the same tokens and the same amount of prefill and decode work.

Open loop: each request is sent at its trace arrival time whether or not earlier ones have
finished, so a slow server builds a queue instead of slowing the load down (a closed loop would
hide exactly the overload MorphServe targets).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from eval.traces import TraceRequest
from sglang_morph.client import completion_tokens, generate_payload, parse_stream_line
from sglang_morph.model_info import read_config

_PROBE_SEED = 7919
"""Seed of the latency probes' prompts, distinct from the replay's so no prefix is shared."""


@dataclass
class RequestRecord:
    """What one replayed request experienced; times in seconds, relative to the replay start."""

    index: int
    arrival_s: float
    """Scheduled arrival (the trace's)."""
    sent_s: float | None
    """When it was actually sent; differs from arrival_s only if the client lagged."""
    prompt_tokens: int
    requested_output_tokens: int
    output_tokens: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    error: str | None = None
    cached_tokens: int | None = None
    """Prompt tokens SGLang served from its prefix cache (its meta_info ``cached_tokens``);
    None when the server did not say."""
    output_ids: list[int] | None = None
    """The token ids the server generated, as streamed; None when it sent none."""

    @property
    def ok(self) -> bool:
        """Completed without error and produced at least one token."""
        return self.error is None and self.ttft_s is not None

    def to_json(self) -> dict:
        """A JSON-serialisable dict (one line of requests.jsonl)."""
        return asdict(self)


def usable_token_ids(model_path: str) -> np.ndarray:
    """Ids of the model's vocabulary minus its special tokens (BOS, EOS, UNK, PAD, added).

    Random prompts must avoid special ids: an EOS or BOS in the middle of a prompt changes
    attention patterns in ways no real prompt does.
    """
    path = Path(model_path)
    config = read_config(path)
    special = {config.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")} - {None}
    tokenizer = path / "tokenizer.json"
    if tokenizer.exists():
        added = json.loads(tokenizer.read_text()).get("added_tokens", [])
        special |= {tok["id"] for tok in added if tok.get("special")}
    flat: set[int] = set()
    for item in special:
        flat |= set(item) if isinstance(item, list) else {int(item)}
    return np.array([i for i in range(int(config["vocab_size"])) if i not in flat], dtype=np.int64)


def prompt_ids(vocab: np.ndarray, length: int, index: int, seed: int = 0) -> list[int]:
    """Deterministic prompt of ``length`` token ids for request ``index``.

    Seeded per (seed, index), so every system replays identical prompts whatever order or
    subset of requests it sees; uniformly random ids also defeat prefix caching, which would
    otherwise reward systems for accidental sharing between prompts.
    """
    rng = np.random.default_rng([seed, index])
    return rng.choice(vocab, size=length).tolist()


async def send_request(
    session: aiohttp.ClientSession,
    base_url: str,
    record: RequestRecord,
    input_ids: list[int],
    t0: float,
) -> RequestRecord:
    """Send one streamed request and fill ``record`` in place (errors are recorded, not raised).

    TTFT is measured from the send to the first chunk that reports a completion token; TPOT is
    the mean gap between the remaining tokens, ``(e2e - ttft) / (tokens - 1)``. The output ids
    and SGLang's count of prefix-cached prompt tokens are kept too.
    """
    sent = time.perf_counter()
    record.sent_s = sent - t0
    payload = generate_payload(input_ids, record.requested_output_tokens)
    try:
        async with session.post(f"{base_url}/generate", json=payload) as response:
            if response.status != 200:
                body = (await response.text())[:300]
                record.error = f"HTTP {response.status}: {body}"
                return record
            async for raw in response.content:
                chunk = parse_stream_line(raw)
                if chunk is None:
                    continue
                meta = chunk.get("meta_info") or {}
                finish = meta.get("finish_reason")
                error = chunk.get("error")
                if isinstance(finish, dict) and finish.get("type") == "abort":
                    error = error or finish.get("message") or "aborted"
                if error:
                    record.error = f"server error: {error}"[:300]
                    return record
                tokens = completion_tokens(chunk)
                if tokens > 0 and record.ttft_s is None:
                    record.ttft_s = time.perf_counter() - sent
                record.output_tokens = max(record.output_tokens, tokens)
                if "cached_tokens" in meta:
                    record.cached_tokens = int(meta["cached_tokens"])
                _add_output_ids(record, chunk.get("output_ids"), tokens)
        record.e2e_s = time.perf_counter() - sent
        if record.ttft_s is None:
            record.error = "stream ended without a token"
        elif record.output_tokens > 1:
            record.tpot_s = (record.e2e_s - record.ttft_s) / (record.output_tokens - 1)
    except asyncio.TimeoutError:
        record.error = "timeout"
    except (aiohttp.ClientError, ValueError) as err:  # ValueError: a chunk that is not JSON
        record.error = f"{type(err).__name__}: {err}"[:300]
    except asyncio.CancelledError:
        record.error = "interrupted"
        raise
    return record


def _add_output_ids(record: RequestRecord, ids: list[int] | None, tokens: int) -> None:
    """Keep a chunk's output ids. SGLang streams all ids so far by default (its last chunk is
    the whole output) and only the new ones with ``--incremental-streaming-output``; a chunk
    holding at least as many ids as the tokens it reports is the whole output so far, any other
    is a delta to append."""
    if ids is None:
        return
    if len(ids) >= tokens or record.output_ids is None:
        record.output_ids = [int(i) for i in ids]
    else:
        record.output_ids += [int(i) for i in ids]


class Replayer:
    """Replays requests open-loop. ``records`` gets each request's record when it is sent and
    the record is filled in when it finishes, so an interrupted replay still leaves everything
    that completed (and the in-flight ones marked ``interrupted``)."""

    def __init__(
        self,
        base_url: str,
        requests: Sequence[TraceRequest],
        prompts: Sequence[list[int]],
        request_timeout_s: float = 120.0,
        progress: bool = True,
        label: str = "replay",
    ) -> None:
        if len(prompts) != len(requests):
            raise ValueError("one prompt per request is needed")
        self.base_url = base_url.rstrip("/")
        self.requests = requests
        self.prompts = prompts
        self.request_timeout_s = request_timeout_s
        self.progress = progress
        self.label = label
        self.records: list[RequestRecord] = []

    async def run(self, t0: float | None = None) -> list[RequestRecord]:
        """Send every request at ``t0 + arrival_s`` and wait for all (each bounded by the
        request timeout, so the replay ends by the last arrival plus that timeout)."""
        t0 = time.perf_counter() if t0 is None else t0
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        # A fresh connection per request: reusing a keep-alive connection that the server is
        # closing at that moment resets it, and would count as a failed request.
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        with _progress(self.progress) as bar:
            task_id = bar.add_task(self.label, total=len(self.requests), failed=0)
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
                tasks = []
                for index, request in enumerate(self.requests):
                    delay = t0 + request.arrival_s - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(self._launch(session, index, t0))
                    tasks[-1].add_done_callback(
                        lambda _t, r=self.records[-1]: _advance(bar, task_id, r)
                    )
                await asyncio.gather(*tasks)
        return self.records

    def _launch(self, session: aiohttp.ClientSession, index: int, t0: float) -> asyncio.Task:
        request, ids = self.requests[index], self.prompts[index]
        record = RequestRecord(index, request.arrival_s, None, len(ids), request.output_tokens)
        self.records.append(record)
        return asyncio.create_task(send_request(session, self.base_url, record, ids, t0))


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def _advance(bar: Progress, task_id: int, record: RequestRecord) -> None:
    failed = int(bar.tasks[task_id].fields["failed"]) + (0 if record.ok else 1)
    bar.update(task_id, advance=1, failed=failed)


def probe_prompts(vocab: np.ndarray, input_tokens: int, count: int) -> list[list[int]]:
    """Prompts of an unloaded-latency probe (``MorphClient.unloaded_latency``): a warm-up and
    ``count`` measured ones, ids distinct from any replay's so no prefix is shared with it."""
    return [prompt_ids(vocab, input_tokens, index=i, seed=_PROBE_SEED) for i in range(count + 1)]
