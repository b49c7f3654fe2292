"""The controller's latency targets when the user gives none: measured at warm-up.

A server started without ``--morph-ttft-slo`` would otherwise judge its queue against a
guessed TTFT target, which on a fast model is far too lax (the controller waits for a queue it
should have prevented) and on a slow one too strict. Once the server is healthy, the launcher
sends a few sequential unloaded requests as a client would, takes the median TTFT and TPOT, and
sets the targets to ``UNLOADED_SLO_MULTIPLE`` times them (the SLO rule the evaluation uses) through
``POST /morph/targets``; the scheduler logs them and ``/morph/state`` shows them with their
source. Targets the user gave on the command line are kept.
"""

from __future__ import annotations

import logging
import threading
import time

from sglang_morph.client import MorphClient
from sglang_morph.config import UNLOADED_SLO_MULTIPLE

logger = logging.getLogger("sglang_morph")

PROBE_REQUESTS = 5
PROBE_INPUT_TOKENS = 64
PROBE_OUTPUT_TOKENS = 16
HEALTH_WAIT_S = 600.0


def probe_prompt(vocab_size: int, length: int = PROBE_INPUT_TOKENS) -> list[int]:
    """A fixed prompt of ordinary token ids (clear of the special ids at the start)."""
    low = min(3, vocab_size - 1)
    return [low + i % (vocab_size - low) for i in range(length)]


def measure_targets(
    client: MorphClient, vocab_size: int, requests: int = PROBE_REQUESTS
) -> tuple[float, float]:
    """(TTFT, TPOT) targets in seconds: ``UNLOADED_SLO_MULTIPLE`` x the medians of
    ``requests`` sequential unloaded requests (after one warm-up). RuntimeError when a probe
    request fails."""
    ttft, tpot = client.unloaded_latency(
        [probe_prompt(vocab_size)] * (requests + 1), PROBE_OUTPUT_TOKENS
    )
    return UNLOADED_SLO_MULTIPLE * ttft, UNLOADED_SLO_MULTIPLE * tpot


def _probe(client: MorphClient, vocab_size: int, keep_ttft: bool, keep_tpot: bool) -> None:
    deadline = time.monotonic() + HEALTH_WAIT_S
    while not client.health() or client.try_state() is None:
        if time.monotonic() > deadline:
            logger.error(
                "sglang-morph warm-up probe: no healthy server after %.0f s; the "
                "controller keeps its provisional targets",
                HEALTH_WAIT_S,
            )
            return
        time.sleep(0.5)
    try:
        ttft, tpot = measure_targets(client, vocab_size)
        client.set_targets(None if keep_ttft else ttft, None if keep_tpot else tpot)
    except Exception as err:  # noqa: BLE001 - the server serves on; the log says why
        logger.error("sglang-morph warm-up probe failed, provisional targets kept: %r", err)
        return
    logger.warning(
        "sglang-morph warm-up probe: targets TTFT %.1f ms, TPOT %.2f ms (%g x the median of %d "
        "unloaded requests)",
        1000 * ttft,
        1000 * tpot,
        UNLOADED_SLO_MULTIPLE,
        PROBE_REQUESTS,
    )


def start_probe(
    base_url: str, admin_key: str | None, vocab_size: int, keep_ttft: bool, keep_tpot: bool
) -> threading.Thread:
    """Probe in a daemon thread of the launcher once the server answers; targets given on the
    command line (``keep_*``) are not replaced."""
    client = MorphClient(base_url, admin_key=admin_key)
    thread = threading.Thread(
        target=_probe, args=(client, vocab_size, keep_ttft, keep_tpot),
        name="morph-warmup-probe", daemon=True,
    )  # fmt: skip
    thread.start()
    return thread
