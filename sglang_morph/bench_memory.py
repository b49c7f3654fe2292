"""``python -m sglang_morph.bench_memory``: resident memory against the budget across a
grow/shrink cycle (CPU).

Starts one real server (manual policy) with a KV budget large enough that KV dominates what a
shrink can give back, then, for each repetition: fills the KV with long prompts (pages become
resident), shrinks it to a small limit (the pages above are released: ``madvise``), quantizes
every layer and lifts the limit (capacity grows), fills it again, and restores full precision.
After each phase it prints the scheduler process's resident memory next to what the budget
accounts for (weights in their current formats + committed KV), so "memory freed by a shrink
is given back" is measured, not assumed. Writes the rows as JSON (``--out``); the latest
figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor

from rich.console import Console
from rich.table import Table

from sglang_morph.cli import FAILURE_STATUS, UsageError, exit_with, output_path, positive_int
from sglang_morph.client import MorphClient
from sglang_morph.data import resolve_model
from sglang_morph.memory import parse_budget
from sglang_morph.server_process import Server, ServerError, process_tree, rss_bytes

MIB = 1 << 20
SMALL_LIMIT_TOKENS = 1024
PROMPT_TOKENS = 480


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sglang_morph.bench_memory", description=__doc__)
    p.add_argument("--budget", default="64MB", help="memory budget (default: 64MB)")
    p.add_argument("--reps", type=positive_int, default=3, help="grow/shrink cycles (default: 3)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def _scheduler_pid(server: Server) -> int:
    """The server's largest process: SGLang's scheduler, which holds the model and the KV."""
    pids = process_tree(server.proc.pid)[1:]
    return max(pids, key=lambda pid: rss_bytes(pid))


def _fill(client: MorphClient, tokens: int) -> None:
    """Write about ``tokens`` KV slots: distinct long prompts, served concurrently."""
    count = max(1, tokens // (PROMPT_TOKENS + 1))

    def one(i: int) -> None:
        prompt = [3 + (i * 7 + j) % 500 for j in range(PROMPT_TOKENS)]
        client.post(
            "/generate",
            {"input_ids": prompt, "sampling_params": {"max_new_tokens": 1, "temperature": 0}},
            timeout_s=600,
        ).raise_for_status()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))


def _row(rep: int, phase: str, st: dict, pid: int, baseline: int) -> dict:
    rss = rss_bytes(pid)
    return {
        "rep": rep,
        "phase": phase,
        "quantized_layers": st["quantized_layers"],
        "kv_capacity_tokens": st["kv_capacity_tokens"],
        "accounted_bytes": st["device_bytes_in_use"],
        "budget_bytes": st["budget_bytes"],
        "kv_pool_resident_bound_bytes": st["kv_pool_resident_bound_bytes"],
        "scheduler_rss_bytes": rss,
        "rss_above_baseline_bytes": rss - baseline,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model = resolve_model(None)
        budget = parse_budget(args.budget, model)
        out = output_path("--out", args.out) if args.out else None
    except (UsageError, ValueError, FileNotFoundError) as err:
        exit_with(err)
    console = Console()
    rows: list[dict] = []
    try:
        server = Server(["--morph-policy", "manual", "--morph-memory-budget", str(budget)])
    except ServerError as err:
        exit_with(err, FAILURE_STATUS)
    try:
        client = server.client
        pid = _scheduler_pid(server)
        client.set_kv_limit(SMALL_LIMIT_TOKENS)
        baseline = rss_bytes(pid)
        layers = [x["id"] for x in client.wait_settled(60)["layers"]]
        for rep in range(args.reps):
            client.set_kv_limit(0)
            st = client.wait_settled(60)
            _fill(client, st["kv_capacity_tokens"])
            rows.append(_row(rep, "fp, KV filled", client.wait_settled(60), pid, baseline))
            client.set_kv_limit(SMALL_LIMIT_TOKENS)
            rows.append(
                _row(
                    rep,
                    f"fp, KV limit {SMALL_LIMIT_TOKENS}",
                    client.wait_settled(60),
                    pid,
                    baseline,
                )
            )
            client.set_kv_limit(0)
            client.swap(layers, "int4")
            st = client.wait_settled(60)
            _fill(client, st["kv_capacity_tokens"])
            rows.append(_row(rep, "all int4, KV filled", client.wait_settled(60), pid, baseline))
            client.set_kv_limit(SMALL_LIMIT_TOKENS)
            client.swap(layers, "fp")
            rows.append(
                _row(
                    rep,
                    f"fp restored, KV limit {SMALL_LIMIT_TOKENS}",
                    client.wait_settled(60),
                    pid,
                    baseline,
                )
            )
            console.print(f"rep {rep + 1}/{args.reps} done")
    except (RuntimeError, OSError) as err:
        exit_with(err, FAILURE_STATUS)
    finally:
        server.stop()
    table = Table(title=f"scheduler resident memory vs budget ({budget / MIB:.1f} MiB)")
    for col in (
        "rep",
        "phase",
        "k",
        "KV tokens",
        "accounted MiB",
        "pool bound MiB",
        "RSS MiB",
        "RSS - baseline MiB",
    ):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["rep"]),
            r["phase"],
            str(r["quantized_layers"]),
            str(r["kv_capacity_tokens"]),
            f"{r['accounted_bytes'] / MIB:.1f}",
            f"{r['kv_pool_resident_bound_bytes'] / MIB:.1f}",
            f"{r['scheduler_rss_bytes'] / MIB:.1f}",
            f"{r['rss_above_baseline_bytes'] / MIB:.1f}",
        )
    console.print(table)
    console.print(
        f"baseline (KV limited to {SMALL_LIMIT_TOKENS} tokens at start): {baseline / MIB:.1f} MiB"
    )
    if out is not None:
        out.write_text(
            json.dumps(
                {"budget_bytes": budget, "baseline_rss_bytes": baseline, "rows": rows}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
