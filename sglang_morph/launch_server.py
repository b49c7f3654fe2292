"""``python -m sglang_morph.launch_server``: SGLang's server with the morph runtime.

Accepts every ``sglang.launch_server`` argument plus ``--morph-*`` options. It validates all of
them before any process starts (input the user must change exits with status 2 and one line,
``sglang_morph.cli``; another SGLang version exits with status 1), fills in the embedded default
model and the CPU flags, turns a memory budget into KV capacity, publishes the morph
configuration to SGLang's processes and adds the ``/morph/*`` routes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence

from rl_controller.rl_policy import CheckpointError, RLPolicy
from sglang_morph.cli import FAILURE_STATUS, UsageError, exit_with
from sglang_morph.compat import MorphSetupError, check_sglang_version
from sglang_morph.config import (
    GROUP_SIZES,
    POLICIES,
    QUANT_METHODS,
    QUANTIZED_FORMATS,
    MorphConfig,
    parse_bytes,
)
from sglang_morph.data import resolve_model
from sglang_morph.model_info import read_config, serving_device
from sglang_morph.paths import DEFAULT_CHECKPOINT, absolute
from sglang_morph.profile_file import ProfileError, load_profile

CPU_FLAGS = {
    "--device": "cpu",
    "--attention-backend": "torch_native",
    "--dtype": "float32",
}
CPU_SWITCHES = ("--disable-overlap-schedule",)


def _bytes_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def morph_parser() -> argparse.ArgumentParser:
    """The ``--morph-*`` options (the rest of the command line belongs to SGLang)."""
    p = argparse.ArgumentParser(
        prog="python -m sglang_morph.launch_server",
        description="SGLang server with MorphServe's quantized layer swapping and elastic KV. "
        "All sglang.launch_server arguments are accepted too.",
        add_help=False,
    )
    g = p.add_argument_group("morph")
    g.add_argument(
        "--morph-policy",
        choices=POLICIES,
        default="off",
        help="who changes the model: off = plain SGLang; manual = only POST "
        "/morph/swap; heuristic / rl = the controller (default: off)",
    )
    g.add_argument(
        "--morph-memory-budget",
        type=_bytes_arg,
        default=None,
        help="device bytes for weights + KV cache, e.g. 1800000 or 64MB; KV capacity "
        "follows from it (default: SGLang's own sizing)",
    )
    g.add_argument(
        "--morph-format",
        choices=QUANTIZED_FORMATS,
        default="int4",
        help="format of the quantized layer copies (default: int4)",
    )
    g.add_argument(
        "--morph-group-size",
        type=int,
        choices=GROUP_SIZES,
        default=32,
        help="int4 group size (default: 32)",
    )
    g.add_argument(
        "--morph-quant-method",
        choices=QUANT_METHODS,
        default="rtn",
        help="rtn = round to nearest; awq = activation-aware scales from the profile",
    )
    g.add_argument(
        "--morph-static-format",
        choices=QUANTIZED_FORMATS,
        default=None,
        help="quantize every layer for the whole run (static quantization baseline)",
    )
    g.add_argument(
        "--morph-profile",
        default=None,
        help="layer-importance profile JSON from python -m sglang_morph.profile",
    )
    g.add_argument(
        "--morph-checkpoint",
        default=None,
        help="RL policy checkpoint NAME.zip, with NAME.json and NAME.actor.npz beside it "
        f"(default with --morph-policy rl: {DEFAULT_CHECKPOINT})",
    )
    g.add_argument(
        "--morph-tick-interval",
        type=float,
        default=0.05,
        help="seconds between controller decisions (default: 0.05)",
    )
    g.add_argument(
        "--morph-ttft-slo",
        type=float,
        default=1.0,
        help="TTFT SLO in seconds that the controller observes (default: 1.0)",
    )
    g.add_argument(
        "--morph-kv-segment-tokens",
        type=int,
        default=64,
        help="granularity of KV growth and shrinking, in tokens (default: 64)",
    )
    g.add_argument(
        "--morph-data-dir",
        default=None,
        help="directory holding the shared data (default: $MORPH_DATA_DIR, ../shared/data)",
    )
    return p


def _absolute_or_none(path: str | None) -> str | None:
    return None if path is None else absolute(path)


def _has(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _value(argv: Sequence[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _set(argv: list[str], flag: str, value: str) -> None:
    for i, a in enumerate(argv):
        if a == flag:
            argv[i + 1] = value
            return
        if a.startswith(flag + "="):
            argv[i] = f"{flag}={value}"
            return
    argv += [flag, value]


def _check_profile(cfg: MorphConfig) -> None:
    """The profile must be a readable layer profile here: the scheduler reads it only after
    the model is loaded, and would fail there with the server half started. AWQ needs the
    activation scales of a profile made for the same format and group size; without that
    check the server would quietly quantize round-to-nearest or with scales fitted to another
    grid."""
    profile = None
    if cfg.profile_path is not None:
        try:
            profile = load_profile(cfg.profile_path)
        except ProfileError as err:
            raise UsageError(f"--morph-profile: {err}") from err
    if cfg.quant_method != "awq":
        return
    if profile is None:
        raise UsageError(
            "--morph-quant-method awq needs --morph-profile P.json from "
            "`python -m sglang_morph.profile --quant-method awq`"
        )
    fmt = cfg.static_format or cfg.quant_format
    made = (profile.get("quant_method"), profile.get("format"), profile.get("group_size"))
    wanted = ("awq", fmt, cfg.group_size if fmt == "int4" else made[2])
    if made != wanted or not profile.get("act_scales"):
        raise UsageError(
            f"--morph-profile {cfg.profile_path} was made for method/format/group size "
            f"{made[0]}/{made[1]}/{made[2]}, not awq/{fmt}/{cfg.group_size}: profile again "
            "with the server's --morph-format and --morph-group-size"
        )


def _checked_model(model_path: str | None, data_dir: str | None) -> str:
    """The model directory to serve, with a readable config.json (SGLang would otherwise fail
    inside its own processes); UsageError naming the path otherwise."""
    try:
        model = resolve_model(model_path, data_dir)
    except FileNotFoundError as err:  # AssetNotFoundError
        raise UsageError(str(err)) from err
    try:
        read_config(model)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from err
    except ValueError as err:
        raise UsageError(f"{model}/config.json is not JSON: {err}") from err
    return model


def build(argv: Sequence[str]) -> tuple[MorphConfig, list[str]]:
    """Split and complete the command line: the morph configuration and SGLang's argv.

    Paths the user gives (profile, checkpoint) are made absolute here, against the directory
    the launcher was started in: SGLang's processes may run elsewhere. Exits with status 2
    (argparse) on an unknown ``--morph-*`` option or value; raises UsageError, ValueError
    (``MorphConfig.validate``) or CheckpointError (an RL checkpoint that cannot be run), each
    with a one-line message, on input the user must change.
    """
    parser = morph_parser()
    known, rest = parser.parse_known_args(list(argv))
    unknown_morph = [a for a in rest if a.startswith("--morph-")]
    if unknown_morph:
        parser.error(
            f"unknown option {unknown_morph[0].split('=')[0]}; accepted --morph-* options: "
            + ", ".join(sorted(o for a in parser._actions for o in a.option_strings))
        )
    cfg = MorphConfig(
        policy=known.morph_policy,
        memory_budget_bytes=known.morph_memory_budget,
        quant_format=known.morph_format,
        group_size=known.morph_group_size,
        quant_method=known.morph_quant_method,
        static_format=known.morph_static_format,
        profile_path=_absolute_or_none(known.morph_profile),
        checkpoint_path=_absolute_or_none(known.morph_checkpoint),
        tick_interval_s=known.morph_tick_interval,
        ttft_slo_s=known.morph_ttft_slo,
        kv_segment_tokens=known.morph_kv_segment_tokens,
    )
    cfg.validate()
    _check_profile(cfg)
    if cfg.policy == "rl":
        cfg.checkpoint_path = cfg.checkpoint_path or str(DEFAULT_CHECKPOINT)
        RLPolicy.load(cfg.checkpoint_path)  # CheckpointError says which file and why

    sg = list(rest)
    model = _checked_model(_value(sg, "--model-path"), known.morph_data_dir)
    _set(sg, "--model-path", model)
    if not _has(sg, "--host"):
        sg += ["--host", "127.0.0.1"]
    if serving_device() != "cuda":
        os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
        for flag, value in CPU_FLAGS.items():
            if not _has(sg, flag):
                sg += [flag, value]
        sg += [s for s in CPU_SWITCHES if not _has(sg, s)]
    if cfg.memory_budget_bytes is not None:
        from sglang_morph.memory import BudgetError, plan_kv_tokens

        if _has(sg, "--max-total-tokens"):
            raise UsageError(
                "--morph-memory-budget sets the KV capacity; give --max-total-tokens only "
                "without it"
            )
        dtype, device = _value(sg, "--dtype") or "float32", _value(sg, "--device") or "cuda"
        try:
            plan = plan_kv_tokens(model, cfg, dtype, device)
        except BudgetError as err:
            raise UsageError(f"--morph-memory-budget {err}") from err
        except FileNotFoundError as err:  # no safetensors weights to size the budget by
            raise UsageError(f"--morph-memory-budget: {err}") from err
        _set(sg, "--max-total-tokens", str(plan.pool_tokens))
    return cfg, sg


def main(argv: Sequence[str] | None = None) -> None:
    """Validate everything, then run SGLang's own launcher in this process."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        morph_parser().print_help()
        print("\nSGLang's own options follow (python -m sglang.launch_server --help).")
    try:
        check_sglang_version()
    except MorphSetupError as err:  # the installation, not the command line
        exit_with(err, FAILURE_STATUS)
    try:
        cfg, sg_argv = build(argv)
    except (UsageError, ValueError, CheckpointError) as err:  # ValueError: validate, budget
        exit_with(err)
    log = tempfile.NamedTemporaryFile(prefix="morph-iterations-", suffix=".jsonl", delete=False)
    cfg.extra["iteration_log"] = log.name
    cfg.to_env()

    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    from sglang_morph import http_api

    load_plugins()
    server_args = prepare_server_args(sg_argv)
    http_api.install()
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
