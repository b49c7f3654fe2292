"""The client's parsing of SGLang's streamed ``/generate`` answer, without a server (the
replay, the warm-up probe and the SLO probe all read streams through it; the live tests read
real streams)."""

from __future__ import annotations

import pytest

from sglang_morph.client import (
    MorphClient,
    completion_tokens,
    generate_payload,
    parse_stream_line,
)


def test_stream_lines_are_chunks_or_nothing() -> None:
    chunk = parse_stream_line(b'data: {"meta_info": {"completion_tokens": 3}, "text": "a"}\n')
    assert chunk is not None and completion_tokens(chunk) == 3
    assert parse_stream_line(b"data: [DONE]") is None
    assert parse_stream_line(b"") is None and parse_stream_line(b": keep-alive") is None
    assert completion_tokens({"text": "no meta yet"}) == 0
    with pytest.raises(ValueError):
        parse_stream_line(b"data: {not json")


def test_payload_runs_to_the_requested_length_greedily() -> None:
    body = generate_payload((5, 6, 7), 4)
    assert body["input_ids"] == [5, 6, 7] and body["stream"] is True
    assert body["sampling_params"] == {"max_new_tokens": 4, "ignore_eos": True, "temperature": 0.0}


def test_unloaded_latency_needs_a_warm_up_and_a_measured_prompt() -> None:
    with pytest.raises(ValueError, match="warm-up"):
        MorphClient("http://127.0.0.1:9").unloaded_latency([[1, 2, 3]], 4)
