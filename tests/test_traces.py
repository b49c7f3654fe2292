"""Trace loading and shaping: every format, its errors, windows, bursts and the length mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.traces import (
    LengthMapping,
    Trace,
    TraceError,
    TraceRequest,
    burstiest_window,
    load_trace,
    map_lengths,
    request_from_row,
    request_row,
    scale_time,
    select_window,
)

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:04.5000000,100,10
2023-11-16 18:17:03.9799600,4808,10
2023-11-16 18:17:06.0000000,3000,400
"""

BURSTGPT = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5,ChatGPT,472,18,490,Conversation log
0,ChatGPT,1000,0,1000,Conversation log
2.5,GPT-4,200,30,230,API log
"""


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _mooncake_lines(rows: list[dict]) -> str:
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def test_azure_csv_is_sorted_and_relative(tmp_path: Path) -> None:
    trace = load_trace(_write(tmp_path, "a.csv", AZURE))
    assert trace.meta["format"] == "azure"
    assert [r.input_tokens for r in trace.requests] == [4808, 100, 3000]
    assert trace.requests[0].arrival_s == 0.0
    assert trace.requests[1].arrival_s == pytest.approx(0.52004)
    assert trace.duration_s == pytest.approx(2.02004)
    assert trace.meta["time_scale"] == 1.0 and trace.meta["window"] is None


def test_burstgpt_drops_failed_rows(tmp_path: Path) -> None:
    trace = load_trace(_write(tmp_path, "b.csv", BURSTGPT))
    assert trace.meta["format"] == "burstgpt"
    assert trace.requests == (TraceRequest(0.0, 200, 30), TraceRequest(2.5, 472, 18))


def test_mooncake_jsonl_milliseconds(tmp_path: Path) -> None:
    rows = [
        {"timestamp": 0, "input_length": 6955, "output_length": 52, "hash_ids": [0, 1]},
        {"timestamp": 1500, "input_length": 10, "output_length": 3, "hash_ids": [2]},
    ]
    trace = load_trace(_write(tmp_path, "m.jsonl", _mooncake_lines(rows)))
    assert trace.meta["format"] == "mooncake"
    assert trace.requests[1] == TraceRequest(1.5, 10, 3, (2,))


def test_mooncake_hash_ids_survive_shaping_and_the_saved_plan(tmp_path: Path) -> None:
    rows = [
        {"timestamp": 0, "input_length": 1024, "output_length": 8, "hash_ids": [0, 1]},
        {"timestamp": 2000, "input_length": 900, "output_length": 4, "hash_ids": [0, 2]},
        {"timestamp": 3000, "input_length": 10, "output_length": 3},
    ]
    trace = load_trace(_write(tmp_path, "m.jsonl", _mooncake_lines(rows)))
    assert [r.hash_ids for r in trace.requests] == [(0, 1), (0, 2), None]
    shaped = map_lengths(scale_time(select_window(trace, 1.0, 3.0), 2.0), LengthMapping())
    assert shaped.requests == (TraceRequest(0.5, 56, 4, (0, 2)),)
    for request in (*trace.requests, *shaped.requests):
        assert request_from_row(json.loads(json.dumps(request_row(request)))) == request
    assert request_row(trace.requests[2]) == [3.0, 10, 3]  # plans without ids keep their form
    azure = load_trace(_write(tmp_path, "a.csv", AZURE))
    assert all(r.hash_ids is None for r in azure.requests)


@pytest.mark.parametrize("bad", ['"0,1"', "[0, -1]", "[0, 1.5]", '["a"]'])
def test_mooncake_bad_hash_ids_name_file_and_line(tmp_path: Path, bad: str) -> None:
    text = f'{{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": {bad}}}\n'
    path = _write(tmp_path, "m.jsonl", text)
    with pytest.raises(TraceError, match=f"{path}:1: hash_ids"):
        load_trace(path)


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    rows = [{"timestamp": 0, "input_length": 1, "output_length": 1}]
    path = _write(tmp_path, "m.txt", _mooncake_lines(rows))
    assert load_trace(path, fmt="mooncake").requests[0].input_tokens == 1
    with pytest.raises(TraceError, match="unknown trace format"):
        load_trace(path, fmt="parquet")


@pytest.mark.parametrize(
    "name,text,line,what",
    [
        ("a.csv", AZURE.replace("3000,400", "3000,abc"), 4, "GeneratedTokens"),
        ("a.csv", AZURE.replace("100,10", "100"), 2, "fields"),
        ("a.csv", AZURE.replace("2023-11-16 18:17:06", "yesterday"), 4, "TIMESTAMP"),
        ("b.csv", BURSTGPT.replace("472,18", "472,-18"), 2, "Response tokens"),
        ("m.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 1}\n{oops\n', 2, "JSON"),
        ("m.jsonl", '{"timestamp": 0, "input_length": 1}\n', 1, "output_length"),
    ],
)
def test_malformed_rows_name_file_and_line(
    tmp_path: Path, name: str, text: str, line: int, what: str
) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(TraceError) as info:
        load_trace(path)
    assert f"{path}:{line}:" in str(info.value)
    assert what in str(info.value)


def test_unknown_name_lists_accepted(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="azure-code, azure-conv"):
        load_trace("azure-nope")
    with pytest.raises(TraceError, match="cannot tell the trace format"):
        load_trace(_write(tmp_path, "x.csv", "a,b\n1,2\n"))
    with pytest.raises(TraceError, match="no requests"):
        load_trace(_write(tmp_path, "e.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"))


def _synthetic(arrivals: list[float]) -> Trace:
    return Trace("synthetic", tuple(TraceRequest(t, 1600, 400) for t in arrivals), {})


def test_select_window_and_errors() -> None:
    trace = _synthetic([0.0, 1.0, 2.0, 3.0, 10.0])
    window = select_window(trace, 1.0, 3.0)
    assert [r.arrival_s for r in window.requests] == [0.0, 1.0]
    assert window.duration_s == 2.0
    assert window.meta["window"] == [1.0, 3.0]
    for start, end in [(-1, 2), (5, 4), (10, 12), (11, 12), (3, 3)]:
        with pytest.raises(TraceError, match="outside trace"):
            select_window(trace, start, end)


def test_window_records_source_seconds_after_scaling() -> None:
    trace = scale_time(_synthetic([0.0, 4.0, 8.0, 20.0]), 2.0)
    assert [r.arrival_s for r in trace.requests] == [0.0, 2.0, 4.0, 10.0]
    window = select_window(trace, 2.0, 6.0)
    assert window.meta["window"] == [4.0, 12.0]
    assert window.meta["time_scale"] == 2.0
    assert scale_time(window, 2.0).duration_s == 2.0
    with pytest.raises(TraceError):
        scale_time(trace, 0)


def test_burstiest_window_finds_known_burst() -> None:
    background = [float(t) for t in range(0, 100, 5)]
    burst = [40.0 + 0.1 * i for i in range(30)]
    trace = _synthetic(sorted(background + burst))
    start, end = burstiest_window(trace, 5.0)
    assert 39.0 <= start <= 40.0 and end - start == 5.0
    window = select_window(trace, start, end)
    assert len(window.requests) >= 30
    with pytest.raises(TraceError):
        burstiest_window(trace, 1000.0)


def test_burstiest_window_at_the_end_stays_inside() -> None:
    trace = _synthetic([0.0, 50.0, 99.0, 99.5, 100.0])
    start, end = burstiest_window(trace, 10.0)
    assert (start, end) == (90.0, 100.0)


def test_map_lengths_clips_and_is_deterministic() -> None:
    trace = Trace(
        "t",
        (TraceRequest(0.0, 16 * 20, 4 * 7), TraceRequest(1.0, 1, 100000)),
        {"time_scale": 1.0},
    )
    mapping = LengthMapping(output_div=4)
    mapped = map_lengths(trace, mapping)
    assert [(r.input_tokens, r.output_tokens) for r in mapped.requests] == [(20, 7), (8, 150)]
    assert mapped == map_lengths(trace, mapping)
    assert mapped.meta["length_mapping"]["input_div"] == 16
    assert trace.meta.get("length_mapping") is None
    with pytest.raises(TraceError):
        map_lengths(trace, LengthMapping(input_min=10, input_max=5))


def test_named_trace_loads_if_data_present() -> None:
    try:
        trace = load_trace("azure-code")
    except TraceError:
        pytest.skip("azure-code trace not available here")
    assert len(trace.requests) == 8819
    assert trace.name == "azure-code"


def test_named_mooncake_trace_has_its_hash_ids() -> None:
    try:
        trace = load_trace("mooncake")
    except TraceError:
        pytest.skip("mooncake trace not available here")
    assert trace.name == "mooncake" and trace.meta["format"] == "mooncake"
    assert len(trace.requests) == 3993
    assert all(r.hash_ids for r in trace.requests)
    first_blocks = [r.hash_ids[0] for r in trace.requests]
    assert len(set(first_blocks)) < len(first_blocks)  # prompts share prefixes
