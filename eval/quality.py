"""``python -m eval.quality``: model quality as layers are quantized, written as a report.

By default: perplexity and KL to full precision for k = 0..L quantized layers under the
profile's ``lis`` and ``greedy-kl`` orders, ``last_to_first`` and ``random``, on the test part
of the evaluation sample (``eval.quality_eval.run_quality``), the JSON plus a plot beside it.
``--part validation`` measures the validation part instead: the quality table a controller is
trained with must not come from the text its quality is reported on.
With ``--compare-methods``: every layer quantized, per format, method and group size. Options
the user must change exit 2 with one line before any computation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import matplotlib
from rich.console import Console
from rich.table import Table

from eval.quality_eval import compare_methods, profile_orders, run_quality
from sglang_morph.cli import UsageError
from sglang_morph.config import add_quant_args
from sglang_morph.data import resolve_model
from sglang_morph.model_info import read_config
from sglang_morph.paths import absolute
from sglang_morph.profile_file import ProfileError, load_profile

matplotlib.use("Agg")
_CONSOLE = Console(stderr=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, exit 2: the option at fault is all the user needs."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The CLI; the model and quantization options are the profiler's (``add_quant_args``)."""
    parser = _Parser(prog="python -m eval.quality", description=__doc__.split("\n\n")[0])
    add_quant_args(parser)
    parser.add_argument("--profile", default=None, help="profile JSON (default: compute one)")
    parser.add_argument("--seeds", type=int, default=5, help="random orders to average")
    parser.add_argument(
        "--text",
        default=None,
        help="<|endoftext|>-separated evaluation text, used whole "
        "(default: the test part of the TinyStories sample)",
    )
    parser.add_argument(
        "--part",
        choices=("validation", "test"),
        default="test",
        help="part of the TinyStories sample (default test; validation for a training table)",
    )
    parser.add_argument(
        "--compare-methods",
        action="store_true",
        help="instead of the orders: every layer quantized, per format, method and group size",
    )
    parser.add_argument("--out", required=True, help="report JSON; the plot goes beside it")
    return parser


def _checked_profile(args: argparse.Namespace, model_path: str) -> dict | None:
    """The given profile, checked against the model (None when one must be computed)."""
    if args.profile is None:
        return None
    try:
        profile = load_profile(args.profile)
    except ProfileError as err:
        raise UsageError(f"--profile: {err}") from err
    layers = int(read_config(model_path)["num_hidden_layers"])
    if profile["num_layers"] != layers:
        raise UsageError(
            f"--profile {args.profile} is for {profile['num_layers']} layers; "
            f"the model has {layers}"
        )
    try:
        profile_orders(profile)
    except ValueError as err:
        raise UsageError(f"--profile {args.profile}: {err}") from err
    return profile


def _check(args: argparse.Namespace) -> dict | None:
    """The given profile (None when there is none) after checking every option; raises
    UsageError."""
    if args.seeds < 1:
        raise UsageError("--seeds must be at least 1")
    if args.text is not None and not Path(args.text).is_file():
        raise UsageError(f"--text {args.text}: no such file")
    try:
        model_path = resolve_model(args.model_path)
    except FileNotFoundError as err:
        raise UsageError(f"--model-path: {err}") from err
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {args.out}: {err.strerror or err}") from err
    return _checked_profile(args, model_path)


def _computed_profile(args: argparse.Namespace) -> dict | None:
    """A profile from ``python -m sglang_morph.profile`` with the same model and quantization
    options, run as the command it is (one command does not import another); None when the
    profiler failed (its own error is on stderr)."""
    _CONSOLE.print("no --profile: computing one on the default calibration text")
    cmd = [sys.executable, "-m", "sglang_morph.profile", "--format", args.format]
    cmd += ["--group-size", str(args.group_size), "--quant-method", args.quant_method]
    cmd += ["--method", "best"]
    if args.model_path is not None:
        cmd += ["--model-path", absolute(args.model_path)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.json"
        if subprocess.run([*cmd, "--out", str(out)]).returncode != 0:
            return None
        return load_profile(out)


def _config_name(report: dict) -> str:
    """A configuration's label, e.g. "int4 g32 rtn"; int8 has per-channel scales, no groups."""
    group = f" g{report['group_size']}" if report["format"] == "int4" else ""
    return f"{report['format']}{group} {report['quant_method']}"


def plot_quality(report: dict, path: Path) -> None:
    """ppl and kl against k, one line per order."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = (("lis", "o-"), ("greedy-kl", "D-"), ("last_to_first", "s--"), ("random", "^:"))
    for name, style in styles:
        curve = report["orders"][name]
        ks = range(len(curve["ppl"]))
        label = f"{name} (mean of {len(curve['seeds'])} seeds)" if name == "random" else name
        axes[0].plot(ks, curve["ppl"], style, label=label)
        axes[1].plot(ks, curve["kl"], style, label=label)
    exact = report["orders"]["random"]["all_orders"]
    if exact is not None:
        for ax, key in zip(axes, ("ppl", "kl"), strict=True):
            ax.plot(range(len(exact[key])), exact[key], "x-.", label="mean of all orders")
    title = f"{report['model']} {_config_name(report)}"
    for ax, ylabel in zip(axes, ("perplexity", "mean KL(fp || quantized), nats"), strict=True):
        ax.set_xlabel("quantized layers k")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_table(report: dict) -> None:
    orders = report["orders"]
    columns = {
        "lis": orders["lis"],
        "gkl": orders["greedy-kl"],
        "l2f": orders["last_to_first"],
        "rand": orders["random"],
    }
    if orders["random"]["all_orders"] is not None:
        columns["all"] = orders["random"]["all_orders"]
    table = Table(
        title=f"{_config_name(report)} on {report['text']['source']} "
        f"(gkl: greedy-kl; l2f: last_to_first; rand: mean of {len(orders['random']['seeds'])} "
        f"seeds; all: mean of all orders; shipped: {report['profile']['order_method']})"
    )
    table.add_column("k")
    for metric in ("ppl", "kl"):
        for name in columns:
            table.add_column(f"{name} {metric}")
    for k in range(len(orders["lis"]["ppl"])):
        cells = [str(k)]
        cells += [f"{c['ppl'][k]:.4f}" for c in columns.values()]
        cells += [f"{c['kl'][k]:.5f}" for c in columns.values()]
        table.add_row(*cells)
    Console(width=160).print(table)


def _print_methods(report: dict) -> None:
    table = Table(title=f"every layer quantized (fp ppl {report['fp']['ppl']:.4f})")
    for column in ("format", "method", "group", "ppl", "ppl change", "kl"):
        table.add_column(column)
    for row in report["all_layers"]:
        table.add_row(
            row["format"],
            row["quant_method"],
            str(row["group_size"] or "channel"),
            f"{row['ppl']:.4f}",
            f"{100 * row['ppl_change']:+.3f}%",
            f"{row['kl']:.5f}",
        )
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> int:
    """Check the options (exit 2), then write the report; 0 when written."""
    args = build_parser().parse_args(argv)
    try:
        profile = _check(args)
    except UsageError as err:
        print(f"python -m eval.quality: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.compare_methods:
        methods = compare_methods(args.model_path, text_path=args.text)
        out.write_text(json.dumps(methods, indent=1) + "\n")
        _print_methods(methods)
        _CONSOLE.print(f"-> {out}")
        return 0
    if profile is None:
        profile = _computed_profile(args)
        if profile is None:
            print("python -m eval.quality: error: computing the profile failed", file=sys.stderr)
            return 1
    report = run_quality(
        args.model_path,
        args.format,
        args.group_size,
        args.quant_method,
        profile,
        args.seeds,
        args.text,
        args.part,
    )
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot_quality(report, out.with_suffix(".png"))
    _print_table(report)
    _CONSOLE.print(f"-> {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
