"""The soak benchmark's bookkeeping: the looping load keeps its rate, and growth is judged on
maxima so that bounded buffers read flat and steady growth does not."""

from __future__ import annotations

from eval.soak import growth, judge, looping_load, minute_of_requests
from eval.traces import Trace, TraceRequest


def _row(rss: int, log: int, arrivals: int) -> dict:
    return {"processes": {"sched[1]": {"rss_bytes": rss, "open_fds": 20}},
            "internal_sizes": {"arrivals": arrivals}, "iteration_log_bytes": log}


def test_looping_load_has_the_asked_rate_across_laps() -> None:
    trace = Trace("t", tuple(TraceRequest(float(i), 10, 5) for i in range(0, 600, 2)))
    load = looping_load(trace, minutes=10, rate=2.0)
    counts = [len(minute_of_requests(load, m)) for m in range(12)]
    assert all(115 <= c <= 125 for c in counts), counts  # 2 req/s, also past the first lap
    assert all(0 <= r.arrival_s < 60 for r in minute_of_requests(load, 7))


def test_growth_flags_steady_growth_but_not_a_sawtooth() -> None:
    rows = [_row(100 + 10 * m, (m % 3) * 1000 + 1000, 50) for m in range(30)]
    g = growth(rows, warmup=5)
    assert g["sched[1].rss_bytes"] > 0.05  # grows every minute: caught
    assert abs(g["iteration_log_bytes"]) < 1e-9  # fills and rotates: flat maxima
    assert g["runtime.arrivals"] == 0.0 and g["sched[1].open_fds"] == 0.0


def test_bounded_buffers_fail_only_past_their_bound() -> None:
    rows = [_row(100, 1000, 10 * m) for m in range(30)]  # a buffer filling toward its bound
    for r in rows:
        r["internal_bounds"] = {"arrivals": 400, "iteration_log_bytes": 5000}
    assert judge(rows, warmup=5, max_growth=0.05) == {}
    rows[-1]["internal_sizes"]["arrivals"] = 401
    assert set(judge(rows, warmup=5, max_growth=0.05)) == {"runtime.arrivals"}
    rows[-1]["processes"]["sched[1]"]["rss_bytes"] = 200  # unbounded memory doubling: growth
    assert "sched[1].rss_bytes" in judge(rows, warmup=5, max_growth=0.05)
