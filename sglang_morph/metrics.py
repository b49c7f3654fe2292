"""Morph gauges in SGLang's Prometheus metrics (``--enable-metrics``).

Created in the scheduler process, after SGLang has set up its multiprocess collector, with the
same ``mostrecent`` mode SGLang uses for its own pool gauges, so ``GET /metrics`` shows them.
"""

from __future__ import annotations


class MorphMetrics:
    """Gauges updated at the runtime's tick only when their value changed."""

    def __init__(self) -> None:
        from prometheus_client import Gauge

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"sglang_morph:{name}", doc, multiprocess_mode="mostrecent")

        self.gauges = {
            "quantized_layers": gauge("quantized_layers", "Decoder layers running quantized."),
            "kv_capacity_tokens": gauge("kv_capacity_tokens", "Usable KV cache capacity."),
            "kv_quarantined_tokens": gauge(
                "kv_quarantined_tokens", "KV slots above the limit still held after a shrink."),
            "transitions": gauge("transitions", "Layer format transitions since start."),
            "fallbacks": gauge("fallbacks", "RL policy fallbacks to the heuristic."),
            "restore_window_seconds": gauge(
                "restore_window_seconds", "Restore stabilization window in force."),
            "held_restores": gauge("held_restores", "Ticks at which a restore was held back."),
        }
        self.last: dict[str, float] = {}

    def update(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            if self.last.get(name) != value:
                self.gauges[name].set(value)
                self.last[name] = value


def metrics_enabled() -> bool:
    """Whether SGLang was started with --enable-metrics."""
    from sglang.srt.runtime_context import get_observability

    return bool(get_observability().enable_metrics)
