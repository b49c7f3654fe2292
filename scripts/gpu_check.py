"""What a GPU run of sglang-morph rests on, measured on one 8B-shaped decoder layer (bf16).

Needs torch with CUDA only: it imports nothing from SGLang, and from this project only the
quantizers and kernels (``sglang_morph.quant``, torch-only) and the exit-status rule
(``sglang_morph.cli``, standard library only). It reports:

1. ``matmul``: the layer's four linears (qkv, o, gate_up, down of Llama-3-8B) per batch size,
   bf16 ``F.linear`` against our int8 and int4 weight-only matmuls, with the kernel each took;
2. ``swap``: the layer's full-precision weights to pinned host memory and back (the copies the
   swapper makes in the background) and the commit itself (rebinding tensors at the tick);
3. ``kv``: backing and releasing 1 GiB of KV memory, through the caching allocator's
   expandable segments (CUDA virtual memory: map/unmap) when torch allows them, else a plain
   allocation and free; the JSON says which;
4. ``cuda_graph``: whether a CUDA graph captured once per configuration (number of quantized
   layers) still replays correctly after swaps move the weights, and whether recapturing after
   each swap does; compared to eager at every step.

Without CUDA it exits 1 with one line. ``--device cpu --dry-run`` runs the same code on tiny
shapes on the CPU (eager stand-ins for graphs, unpinned host memory), so the script is tested
where no GPU exists; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, not an install

from sglang_morph.cli import FAILURE_STATUS, UsageError, exit_with, output_path  # noqa: E402
from sglang_morph.quant import kernel_name, quantize_weight  # noqa: E402
from sglang_morph.quant.matmul import quantized_matmul  # noqa: E402

HIDDEN, MLP, KV_HEADS, HEAD_DIM = 4096, 14336, 8, 128
"""Llama-3-8B: 32 query heads and 8 KV heads of 128 over a 4096-wide residual stream."""
DRY_HIDDEN, DRY_MLP, DRY_KV_HEADS, DRY_HEAD_DIM = 64, 128, 2, 16
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DRY_BATCHES = (1, 4)
GROUP_SIZE = 128
KV_BYTES = 1 << 30
DRY_KV_BYTES = 1 << 20
GRAPH_LAYERS = 4
LINEARS = ("qkv", "o", "gate_up", "down")


def layer_shapes(hidden: int, mlp: int, kv_heads: int, head_dim: int) -> dict[str, tuple]:
    """(out, in) of each linear of one Llama decoder layer."""
    qkv = hidden + 2 * kv_heads * head_dim
    return {
        "qkv": (qkv, hidden),
        "o": (hidden, hidden),
        "gate_up": (2 * mlp, hidden),
        "down": (hidden, mlp),
    }


def make_layer(shapes: dict[str, tuple], device: torch.device, seed: int) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return {
        name: (torch.randn(shape, generator=gen) * shape[1] ** -0.5).to(device, torch.bfloat16)
        for name, shape in shapes.items()
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after two warm-up runs."""
    for _ in range(2):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- 1. matmul --


def check_matmul(layer: dict, batches, device: torch.device, reps: int) -> list[dict]:
    quantized = {
        fmt: {n: quantize_weight(w, fmt, GROUP_SIZE) for n, w in layer.items()}
        for fmt in ("int8", "int4")
    }
    rows = []
    for batch in batches:
        xs = {
            n: torch.randn(batch, w.shape[1], device=device, dtype=torch.bfloat16)
            for n, w in layer.items()
        }

        def run_bf16(xs=xs) -> list:
            return [F.linear(xs[n], w) for n, w in layer.items()]

        row = {"batch": batch, "bf16_ms": 1e3 * timed(run_bf16, device, reps)}
        for fmt, qws in quantized.items():

            def run_quantized(xs=xs, qws=qws) -> list:
                return [quantized_matmul(xs[n], q) for n, q in qws.items()]

            row[f"{fmt}_ms"] = 1e3 * timed(run_quantized, device, reps)
            row[f"{fmt}_kernel"] = kernel_name(qws["down"])
            err = max(
                float((quantized_matmul(xs[n], q) - F.linear(xs[n], layer[n])).abs().max())
                for n, q in qws.items()
            )
            row[f"{fmt}_max_abs_err"] = err
        rows.append(row)
    return rows


def check_staging(layer: dict, device: torch.device, reps: int) -> dict:
    """The int4 copies moved to the device per swap: a host copy in the CPU kernel's layout
    (repacked on every move) against one ``staged_for`` the device at start-up (a copy); the
    two must give identical products."""
    host = {n: quantize_weight(w.cpu().float(), "int4", GROUP_SIZE) for n, w in layer.items()}
    staged = {n: q.staged_for(device) for n, q in host.items()}
    x = torch.randn(4, layer["down"].shape[1], device=device, dtype=torch.bfloat16)
    same = bool(
        torch.equal(quantized_matmul(x, host["down"].to(device)),
                    quantized_matmul(x, staged["down"].to(device)))
    )  # fmt: skip
    return {
        "repack_per_swap_ms": 1e3
        * timed(lambda: [q.to(device) for q in host.values()], device, reps),
        "staged_move_ms": 1e3
        * timed(lambda: [q.to(device) for q in staged.values()], device, reps),
        "identical_products": same,
    }


# -- 2. swap --


def check_swap(layer: dict, device: torch.device, reps: int) -> dict:
    """The background copies of a swap (device -> pinned host, host -> device) and the
    commit, which only rebinds tensors (the number the scheduler waits for)."""
    pinned = device.type == "cuda"
    host = {n: torch.empty(w.shape, dtype=w.dtype, pin_memory=pinned) for n, w in layer.items()}
    nbytes = sum(w.numel() * w.element_size() for w in layer.values())

    def to_host() -> None:
        for n, w in layer.items():
            host[n].copy_(w, non_blocking=pinned)

    def to_device() -> None:
        for n, t in host.items():
            layer[n] = t.to(device, non_blocking=pinned)

    d2h, h2d = timed(to_host, device, reps), timed(to_device, device, reps)
    params = {n: torch.nn.Parameter(w, requires_grad=False) for n, w in layer.items()}
    empty = torch.empty(0, dtype=torch.bfloat16, device=device)

    def commit() -> None:  # as LayerSwapper.commit: rebind weight data, nothing copied
        for n, p in params.items():
            p.data = empty
            p.data = layer[n]

    return {
        "layer_bytes": nbytes,
        "pinned_host": pinned,
        "to_host_ms": 1e3 * d2h,
        "to_device_ms": 1e3 * h2d,
        "to_host_GBps": nbytes / d2h / 1e9,
        "to_device_GBps": nbytes / h2d / 1e9,
        "commit_rebind_ms": 1e3 * timed(commit, device, reps),
    }


# -- 3. KV --


def _expandable_segments(on: bool) -> str | None:
    """Switch the caching allocator's expandable segments (CUDA virtual memory) for segments
    made from now on; the error when this torch refuses."""
    try:
        torch.cuda.memory._set_allocator_settings(f"expandable_segments:{on}")
    except (RuntimeError, AttributeError) as err:
        return str(err)
    return None


def check_kv(nbytes: int, device: torch.device, reps: int) -> dict:
    """Back and release ``nbytes`` the way an elastic KV pool would on this device; only
    around this check are segments expandable, so the other checks run on the default."""
    if device.type != "cuda":
        method = "cpu allocation and free (dry run)"
    elif (err := _expandable_segments(True)) is None:
        method = "CUDA VMM map/unmap via the caching allocator's expandable_segments"
    else:
        method = f"cudaMalloc/cudaFree via torch.empty + empty_cache (no VMM: {err})"
    try:
        return {"bytes": nbytes, "method": method, **_map_unmap(nbytes, device, reps)}
    finally:
        if device.type == "cuda":
            _expandable_segments(False)


def _map_unmap(nbytes: int, device: torch.device, reps: int) -> dict:
    maps, unmaps = [], []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        block = torch.empty(nbytes, dtype=torch.uint8, device=device)
        block[:: 1 << 16].fill_(1)  # touch it: the pages must really be backed
        _sync(device)
        maps.append(time.perf_counter() - start)
        start = time.perf_counter()
        del block
        if device.type == "cuda":
            torch.cuda.empty_cache()  # hands the segment back: unmap, or cudaFree
        _sync(device)
        unmaps.append(time.perf_counter() - start)
    return {"map_ms": 1e3 * statistics.median(maps), "unmap_ms": 1e3 * statistics.median(unmaps)}


# -- 4. CUDA graphs across swaps --


class SwappableStack:
    """A few decoder-layer-shaped blocks whose layers swap between bf16 and int4 as the
    layer swapper does: quantized copies come from host, full-precision weights go to host and
    come back as new device tensors (so addresses move)."""

    def __init__(self, shapes: dict, layers: int, device: torch.device) -> None:
        self.device = device
        self.fp = [make_layer(shapes, device, 100 + i) for i in range(layers)]
        self.q_host = [
            {n: quantize_weight(w.cpu().float(), "int4", GROUP_SIZE) for n, w in layer.items()}
            for layer in self.fp
        ]
        self.host: list[dict | None] = [None] * layers
        self.q: list[dict | None] = [None] * layers
        self.hidden = shapes["o"][0]

    def set_quantized(self, k: int) -> None:
        """Quantize layers 0..k-1, restore the others."""
        for i in range(len(self.fp)):
            if i < k and self.q[i] is None:
                self.q[i] = {n: q.to(self.device) for n, q in self.q_host[i].items()}
                self.host[i] = {n: w.to("cpu", copy=True) for n, w in self.fp[i].items()}
                self.fp[i] = {}
            elif i >= k and self.q[i] is not None:
                self.fp[i] = {n: w.to(self.device, copy=True) for n, w in self.host[i].items()}
                self.q[i], self.host[i] = None, None

    def pointers(self) -> list[int]:
        """Addresses of every weight tensor the forward reads."""
        out = []
        for fp, q in zip(self.fp, self.q):
            out += (
                [q[n].qweight.data_ptr() for n in LINEARS]
                if q
                else [fp[n].data_ptr() for n in LINEARS]
            )
        return out

    def _linear(self, i: int, name: str, x: torch.Tensor) -> torch.Tensor:
        q = self.q[i]
        return quantized_matmul(x, q[name]) if q else F.linear(x, self.fp[i][name])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i in range(len(self.fp)):
            a = self._linear(i, "o", self._linear(i, "qkv", h)[:, : self.hidden])
            h = F.rms_norm(h + a, (self.hidden,))
            gate, up = self._linear(i, "gate_up", h).chunk(2, dim=-1)
            h = F.rms_norm(h + self._linear(i, "down", F.silu(gate) * up), (self.hidden,))
        return h


def capture(fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
    """A replay of ``fn``: a captured CUDA graph on CUDA, an eager stand-in on the CPU."""
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    replay.graph = graph  # keep the graph alive with its replay
    return replay


def check_graphs(shapes: dict, layers: int, batch: int, device: torch.device) -> dict:
    stack = SwappableStack(shapes, layers, device)
    x = torch.randn(batch, stack.hidden, device=device, dtype=torch.bfloat16)
    order = [*range(layers + 1), *range(layers - 1, -1, -1)]  # up to all quantized, back down
    first: dict[int, tuple] = {}
    steps = []
    for k in order:
        stack.set_quantized(k)
        with torch.no_grad():
            eager = stack.forward(x).clone()
            if k not in first:
                first[k] = (capture(lambda: stack.forward(x), device), stack.pointers())
            kept = first[k][0]().clone()
            fresh = capture(lambda: stack.forward(x), device)().clone()
        steps.append(
            {
                "quantized_layers": k,
                "weights_at_captured_addresses": stack.pointers() == first[k][1],
                "first_capture_matches_eager": bool(torch.equal(kept, eager)),
                "recapture_matches_eager": bool(torch.equal(fresh, eager)),
            }
        )
    return {
        "layers": layers,
        "batch": batch,
        "replay": "cuda_graph" if device.type == "cuda" else "eager stand-in (dry run)",
        "steps": steps,
        "first_capture_always_correct": all(s["first_capture_matches_eager"] for s in steps),
        "recapture_always_correct": all(s["recapture_matches_eager"] for s in steps),
    }


# -- report --


def print_report(result: dict) -> None:
    print(f"device: {result['device']}  torch {result['torch']}")
    print(
        f"\nmatmul, one layer ({result['shapes']}), ms (int8 / int4 kernel: "
        f"{result['matmul'][0]['int8_kernel']} / {result['matmul'][0]['int4_kernel']})"
    )
    print(f"{'batch':>6} {'bf16':>9} {'int8':>9} {'int4':>9} {'int8/bf16':>10} {'int4/bf16':>10}")
    for r in result["matmul"]:
        print(
            f"{r['batch']:>6} {r['bf16_ms']:>9.3f} {r['int8_ms']:>9.3f} {r['int4_ms']:>9.3f} "
            f"{r['int8_ms'] / r['bf16_ms']:>10.2f} {r['int4_ms'] / r['bf16_ms']:>10.2f}"
        )
    s = result["swap"]
    print(
        f"\nswap, {s['layer_bytes'] / 2**20:.0f} MiB fp layer (pinned host: {s['pinned_host']}): "
        f"to host {s['to_host_ms']:.2f} ms ({s['to_host_GBps']:.1f} GB/s), to device "
        f"{s['to_device_ms']:.2f} ms ({s['to_device_GBps']:.1f} GB/s), commit (rebind) "
        f"{s['commit_rebind_ms']:.4f} ms"
    )
    st = result["int4_staging"]
    print(
        f"int4 copies to device per swap: repacked {st['repack_per_swap_ms']:.2f} ms, staged "
        f"{st['staged_move_ms']:.2f} ms, identical products: {st['identical_products']}"
    )
    kv = result["kv"]
    print(
        f"\nKV {kv['bytes'] / 2**20:.0f} MiB via {kv['method']}: map {kv['map_ms']:.2f} ms, "
        f"unmap {kv['unmap_ms']:.2f} ms"
    )
    g = result["cuda_graph"]
    print(f"\ngraphs ({g['replay']}), {g['layers']} layers, batch {g['batch']}:")
    print(f"{'k':>3} {'same addresses':>15} {'first capture ok':>17} {'recapture ok':>13}")
    for st in g["steps"]:
        print(
            f"{st['quantized_layers']:>3} {st['weights_at_captured_addresses']!s:>15} "
            f"{st['first_capture_matches_eager']!s:>17} {st['recapture_matches_eager']!s:>13}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/gpu_check.py",
        description="Kernels, swap copies, KV mapping and CUDA graphs across swaps on one "
        "8B-shaped layer (bf16). Needs CUDA; --device cpu --dry-run exercises the code.",
    )
    p.add_argument("--out", required=True, help="JSON file to write the results to")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny shapes and few repetitions: checks the code path, not the GPU",
    )
    p.add_argument("--reps", type=int, default=20, help="timed repetitions (default: 20)")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.dry_run:
        p.error("--device cpu is accepted with --dry-run only (the figures are for a GPU)")
    if args.reps < 1:
        p.error(f"--reps must be 1 or more, got {args.reps}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = output_path("--out", args.out)
    except UsageError as err:
        exit_with(err)
    if args.device == "cuda" and not torch.cuda.is_available():
        exit_with(
            "CUDA is needed: this torch sees no GPU (torch.cuda.is_available() is False)",
            FAILURE_STATUS,
        )
    device = torch.device(args.device)
    dry = args.dry_run
    shapes = layer_shapes(
        *(
            (DRY_HIDDEN, DRY_MLP, DRY_KV_HEADS, DRY_HEAD_DIM)
            if dry
            else (HIDDEN, MLP, KV_HEADS, HEAD_DIM)
        )
    )
    reps = min(args.reps, 3) if dry else args.reps
    torch.manual_seed(0)
    with torch.no_grad():
        layer = make_layer(shapes, device, 0)
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "dry_run": dry,
            "shapes": {n: list(s) for n, s in shapes.items()},
            "matmul": check_matmul(layer, DRY_BATCHES if dry else BATCHES, device, reps),
            "swap": check_swap(layer, device, reps),
            "int4_staging": check_staging(layer, device, reps),
        }
        del layer
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["kv"] = check_kv(DRY_KV_BYTES if dry else KV_BYTES, device, reps)
    result["cuda_graph"] = check_graphs(shapes, 2 if dry else GRAPH_LAYERS, 8, device)
    out.write_text(json.dumps(result, indent=1))
    print_report(result)
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
