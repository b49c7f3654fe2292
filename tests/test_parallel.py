"""Data parallelism on SGLang's CPU engine: two replicas, each a scheduler with its own morph
runtime; ``/morph/state`` lists both and an operator swap reaches both. (Tensor parallelism's
agreement is tested with two gloo processes in tests/test_tp_sync.py.)"""

from __future__ import annotations

import time

import pytest

from sglang_morph.server_process import Server

CPU_BINDING = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}
"""SGLang's CPU engine wants one rank per NUMA node unless told which cores each rank binds."""


@pytest.mark.slow
def test_two_replicas_each_run_the_runtime_and_take_the_swap() -> None:
    server = Server(
        ["--morph-policy", "manual", "--dp-size", "2", "--max-total-tokens", "2048"],
        env=CPU_BINDING,
    )
    try:
        before = server.client.generate("Once upon a time", 12)
        st = server.client.state()
        assert [r["quantized_layers"] for r in st["replicas"]] == [0, 0]
        server.client.swap([0, 1], "int4")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = server.client.state()
            if all(r["quantized_layers"] == 2 for r in st["replicas"]):
                break
            time.sleep(0.2)
        assert [r["quantized_layers"] for r in st["replicas"]] == [2, 2]
        server.client.swap([0, 1], "fp")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = server.client.state()
            if all(r["quantized_layers"] == 0 for r in st["replicas"]):
                break
            time.sleep(0.2)
        for _ in range(4):  # requests spread over both replicas: each restored exactly
            assert server.client.generate("Once upon a time", 12) == before
    finally:
        server.stop()
