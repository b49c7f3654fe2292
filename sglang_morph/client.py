"""MorphClient: the one HTTP client of a server's ``/morph/*`` routes (and the few SGLang routes
the project's tools need), used by the tests, benchmarks, calibration, the engine environment
and the evaluation harness alike, and by the launcher's own warm-up probe (so it sits on the
serving floor, beside the routes it calls).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable, Sequence

import requests

from sglang_morph.config import (
    ITERATIONS_ROUTE,
    KV_ROUTE,
    STATE_ROUTE,
    SWAP_ROUTE,
    TARGETS_ROUTE,
)


def generate_payload(input_ids: Sequence[int], max_new_tokens: int) -> dict:
    """The streamed ``/generate`` body every latency measurement sends: greedy, EOS ignored so
    the output has exactly ``max_new_tokens`` tokens."""
    return {
        "input_ids": list(input_ids),
        "sampling_params": {
            "max_new_tokens": max_new_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
        },
        "stream": True,
    }


def parse_stream_line(raw: bytes) -> dict | None:
    """One chunk of SGLang's streamed ``/generate`` answer (a ``data: {...}`` line), or None for
    any other line (blank, ``data: [DONE]``). ValueError when the chunk is not JSON."""
    line = raw.strip()
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    return None if data == b"[DONE]" else json.loads(data)


def completion_tokens(chunk: dict) -> int:
    """Output tokens a stream chunk reports so far."""
    return int((chunk.get("meta_info") or {}).get("completion_tokens", 0))


class MorphRequestError(RuntimeError):
    """The server refused a ``/morph/*`` command; the message is the server's reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


class MorphClient:
    """Talks to one server at ``base_url`` (``http://host:port``)."""

    def __init__(self, base_url: str, *, admin_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}

    # -- reads --

    def health(self, timeout_s: float = 2.0) -> bool:
        """Whether ``GET /health`` answers 200 now."""
        try:
            return self.get("/health", timeout_s=timeout_s).status_code == 200
        except requests.RequestException:
            return False

    def state(self, timeout_s: float = 30.0) -> dict:
        """``GET /morph/state``; raises ``requests.RequestException`` when it cannot be read (no
        server, or no morph runtime: 404/503)."""
        r = self.get(STATE_ROUTE, timeout_s=timeout_s)
        r.raise_for_status()
        return r.json()

    def try_state(self, timeout_s: float = 5.0) -> dict | None:
        """``GET /morph/state``, or None when it cannot be read."""
        try:
            return self.state(timeout_s)
        except (requests.RequestException, ValueError):
            return None

    def wait_settled(self, timeout_s: float) -> dict:
        """The state once every layer has its desired format and the KV resize is done;
        RuntimeError if that takes longer than ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.state()
            if all(x["format"] == x["desired"] for x in st["layers"]) and st["kv_resize_complete"]:
                return st
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not settle within {timeout_s:g} s")
            time.sleep(0.05)

    def iterations(self, limit: int = 100_000, timeout_s: float = 60.0) -> list[dict]:
        """``GET /morph/iterations``: up to ``limit`` of the newest scheduler-iteration records."""
        r = self.get(ITERATIONS_ROUTE, params={"limit": limit}, timeout_s=timeout_s)
        r.raise_for_status()
        return r.json()

    # -- commands --

    def swap(self, layers: Sequence[int], fmt: str, timeout_s: float = 60.0) -> dict:
        """``POST /morph/swap``: move ``layers`` to ``fmt`` (manual policy); returns the state
        after the command, MorphRequestError with the server's reason when refused."""
        return self._command(SWAP_ROUTE, {"layers": list(layers), "format": fmt}, timeout_s)

    def set_kv_limit(self, tokens: int, timeout_s: float = 60.0) -> dict:
        """``POST /morph/kv``: an operator KV limit in tokens (0 lifts it)."""
        return self._command(KV_ROUTE, {"tokens": tokens}, timeout_s)

    def set_targets(
        self, ttft_s: float | None = None, tpot_s: float | None = None, timeout_s: float = 60.0
    ) -> dict:
        """``POST /morph/targets``: the controller's TTFT and/or TPOT targets in seconds (any
        policy; the harness sends the SLO it judges by, the launcher its warm-up probe's)."""
        body = {k: v for k, v in (("ttft_s", ttft_s), ("tpot_s", tpot_s)) if v is not None}
        return self._command(TARGETS_ROUTE, body, timeout_s)

    def _command(self, path: str, body: dict, timeout_s: float) -> dict:
        r = self.post(path, body, timeout_s=timeout_s)
        if r.status_code != 200:
            try:
                reason = r.json().get("error", r.text)
            except ValueError:
                reason = r.text
            raise MorphRequestError(r.status_code, reason)
        return r.json()["state"]

    def generate(self, text: str, max_new_tokens: int = 30, timeout_s: float = 60.0) -> str:
        """Greedy completion of ``text`` through SGLang's native ``/generate``."""
        r = self.post(
            "/generate",
            {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens}},
            timeout_s=timeout_s,
        )
        r.raise_for_status()
        return r.json()["text"]

    def timed_generate(
        self, input_ids: Sequence[int], max_new_tokens: int, timeout_s: float = 60.0
    ) -> tuple[float, float | None]:
        """Stream one greedy request of ``input_ids`` (EOS ignored, so it runs to
        ``max_new_tokens``) and return (TTFT, TPOT) in seconds as a client sees them; TPOT is
        None for a one-token output. RuntimeError when no token came."""
        payload = generate_payload(input_ids, max_new_tokens)
        start = time.perf_counter()
        first, tokens = None, 0
        with requests.post(self.base_url + "/generate", json=payload, stream=True,
                           timeout=timeout_s, headers=self.headers) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                chunk = parse_stream_line(line)
                count = completion_tokens(chunk) if chunk else 0
                if count > 0 and first is None:
                    first = time.perf_counter() - start
                tokens = max(tokens, count)
        if first is None:
            raise RuntimeError("the stream ended without a token")
        total = time.perf_counter() - start
        return first, (total - first) / (tokens - 1) if tokens > 1 else None

    def unloaded_latency(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> tuple[float, float]:
        """Median TTFT and TPOT of one request per prompt, sent one after another to an
        otherwise idle server; the first is a warm-up and not counted. Measured targets are
        ``UNLOADED_SLO_MULTIPLE`` times these. RuntimeError when a request fails."""
        if len(prompts) < 2:
            raise ValueError("unloaded_latency needs a warm-up prompt and at least one more")
        samples = [self.timed_generate(p, max(2, max_new_tokens)) for p in prompts][1:]
        return (
            statistics.median(s[0] for s in samples),
            statistics.median(s[1] for s in samples if s[1] is not None),
        )

    # -- plain HTTP, for routes without a method here --

    def get(self, path: str, *, timeout_s: float = 30.0, **kw) -> requests.Response:
        headers = {**self.headers, **kw.pop("headers", {})}
        return requests.get(self.base_url + path, timeout=timeout_s, headers=headers, **kw)

    def post(self, path: str, body: object, *, timeout_s: float = 60.0, **kw) -> requests.Response:
        headers = {**self.headers, **kw.pop("headers", {})}
        return requests.post(
            self.base_url + path, json=body, timeout=timeout_s, headers=headers, **kw
        )

    # -- polling --

    async def poll_state(self, on_state: Callable[[dict], None], interval_s: float) -> None:
        """Call ``on_state(state)`` with ``GET /morph/state`` every ``interval_s`` until
        cancelled. Each read runs inside the scheduler loop, so the interval is part of the load
        a measured server carries. Failed reads (server busy past the timeout, no morph runtime)
        are skipped: a gap is better than stalling the caller."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=max(1.0, 4 * interval_s))
        async with aiohttp.ClientSession(timeout=timeout, headers=self.headers) as session:
            while True:
                started = time.perf_counter()
                try:
                    async with session.get(self.base_url + STATE_ROUTE) as resp:
                        if resp.status == 200:
                            on_state(await resp.json())
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    pass
                await asyncio.sleep(max(0.0, interval_s - (time.perf_counter() - started)))
