"""``python -m sglang_morph.launch_server``: SGLang's server with the morph runtime.

Accepts every ``sglang.launch_server`` argument plus ``--morph-*`` options. It validates all of
them before any process starts (input the user must change exits with status 2 and one line,
``sglang_morph.cli``; another SGLang version exits with status 1), fills in the embedded default
model and the CPU flags, turns a memory budget into KV capacity, publishes the morph
configuration to SGLang's processes and adds the ``/morph/*`` routes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from rl_controller.rl_policy import CheckpointError, RLPolicy
from sglang_morph.cli import FAILURE_STATUS, UsageError, exit_with
from sglang_morph.compat import MorphSetupError, check_hook_targets, check_sglang_version
from sglang_morph.config import (
    DEFAULT_RESTORE_RULE,
    GROUP_SIZES,
    POLICIES,
    QUANT_METHODS,
    QUANTIZED_FORMATS,
    RESTORE_LOAD_DROP,
    RESTORE_MAX_WINDOW_S,
    RESTORE_WINDOW_S,
    MorphConfig,
    RestoreRule,
    parse_bytes,
)
from sglang_morph.data import DEFAULT_MODEL, resolve_model
from sglang_morph.model_info import read_config, serving_device, vocab_size
from sglang_morph.paths import DEFAULT_CHECKPOINT, absolute
from sglang_morph.plugin import hook_targets
from sglang_morph.profile_file import LAST_TO_FIRST, ProfileError, load_profile, shipped_profile

logger = logging.getLogger("sglang_morph")

CPU_FLAGS = {
    "--device": "cpu",
    "--attention-backend": "torch_native",
    "--dtype": "float32",
}
CPU_SWITCHES = ("--disable-overlap-schedule",)
CUDA_MORPH_SWITCHES = ("--disable-cuda-graph", "--disable-overlap-schedule")
"""Added on CUDA whenever the runtime changes the model: a captured CUDA graph would replay
kernels over the emptied full-precision weights after a swap, and the overlap scheduler leaves
no iteration boundary with nothing in flight for the tick."""
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


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
        help="layer-importance profile JSON from python -m sglang_morph.profile, or "
        f"{LAST_TO_FIRST} (default: the profile the project ships for the served model, "
        f"format and method when there is one, else {LAST_TO_FIRST})",
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
        "--morph-restore-window",
        type=float,
        default=None,
        help="seconds every controller decision must have asked for a restore before layers "
        "are restored, at least (quantizing is never delayed; 0: restore at once; default: "
        f"the rule an RL checkpoint was trained under, else {RESTORE_WINDOW_S:g})",
    )
    g.add_argument(
        "--morph-restore-max-window",
        type=float,
        default=None,
        help="the longest the restore window grows to while restores keep being undone by "
        f"quantizing again (default: the RL checkpoint's, else {RESTORE_MAX_WINDOW_S:g})",
    )
    g.add_argument(
        "--morph-restore-load-drop",
        type=float,
        default=None,
        help="restores also wait until the smoothed arrival rate is this fraction below its "
        "peak since the layers were quantized, or one probe restore per max window (0: no "
        f"such wait; default: the RL checkpoint's, else {RESTORE_LOAD_DROP:g})",
    )
    g.add_argument(
        "--morph-ttft-slo",
        type=float,
        default=None,
        help="TTFT target in seconds for the controller (default: measured at warm-up, "
        "5x the median of a few unloaded requests; shown in /morph/state)",
    )
    g.add_argument(
        "--morph-tpot-slo",
        type=float,
        default=None,
        help="TPOT target in seconds for the controller's KV limit (default: measured at "
        "warm-up like the TTFT target)",
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


def _profile_path(given: str | None, model: str, data_dir: str | None, fmt: str, method: str,
                  group_size: int) -> str | None:
    """``--morph-profile`` as the runtime takes it: a file made absolute, None for
    last-to-first, or (not given) the shipped profile of the served model when it matches."""
    if given == LAST_TO_FIRST:
        return None
    if given is not None:
        return absolute(given)
    try:
        embedded = Path(model).resolve() == Path(resolve_model(None, data_dir)).resolve()
    except FileNotFoundError:  # no embedded model here: the served one is another
        embedded = False
    layers = int(read_config(model)["num_hidden_layers"])
    shipped = shipped_profile(DEFAULT_MODEL if embedded else model, layers, fmt, method,
                              group_size)
    if shipped is not None:
        logger.info("layer order: the shipped profile %s", shipped)
    return None if shipped is None else str(shipped)


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


def _int_value(argv: Sequence[str], *flags: str) -> tuple[str, int] | None:
    """The first of ``flags`` given with a whole number, and that number (SGLang's own parser
    reports a value that is not one)."""
    for flag in flags:
        text = _value(argv, flag)
        if text is not None and text.strip().lstrip("-").isdigit():
            return flag, int(text)
    return None


def _unsupported_model(config: dict) -> str | None:
    """Why the runtime cannot morph a model with this ``config.json``, or None: it swaps the
    four dense linears of Llama-style layers and sizes one full-attention KV pool."""
    for key in MOE_KEYS:
        if config.get(key):
            return f"is a mixture-of-experts model ({key}={config[key]})"
    if config.get("kv_lora_rank"):
        return f"uses multi-head latent attention (kv_lora_rank={config['kv_lora_rank']})"
    if config.get("use_sliding_window") is True:
        return "uses sliding-window attention (use_sliding_window=true)"
    if any("sliding" in str(t) for t in config.get("layer_types") or ()):
        return "mixes sliding-window and full attention layers (layer_types)"
    return None


def _refuse_unsupported(cfg: MorphConfig, sg: Sequence[str], model: str) -> None:
    """UsageError, naming the option, for what the morph runtime cannot serve (it would fail
    inside the scheduler, or morph wrongly, long after start-up)."""
    policy = (
        f"--morph-policy {cfg.policy}"
        if cfg.policy != "off"
        else f"--morph-static-format {cfg.static_format}"
    )
    pp = _int_value(sg, "--pp-size", "--pipeline-parallel-size")
    if pp is not None and pp[1] > 1:
        raise UsageError(
            f"{pp[0]} {pp[1]}: {policy} supports pipeline parallelism of 1 only (accepted: "
            "--tp-size N; or --morph-policy off)"
        )
    page = _int_value(sg, "--page-size")
    if page is not None and page[1] > 1:
        raise UsageError(
            f"--page-size {page[1]}: the elastic KV allocator of {policy} supports page size 1 "
            "only (accepted: --page-size 1; or --morph-policy off)"
        )
    why = _unsupported_model(read_config(model))
    if why is not None:
        raise UsageError(
            f"--model-path {model} {why}; {policy} supports dense Llama-style models with full "
            "attention only (accepted: such a model; or --morph-policy off)"
        )


def _cuda_switches(sg: list[str]) -> None:
    """Add CUDA_MORPH_SWITCHES the user did not give, and say so in one line."""
    added = [s for s in CUDA_MORPH_SWITCHES if not _has(sg, s)]
    if not added:
        return
    sg += added
    logger.warning(
        "sglang-morph: CUDA with layer swapping, switches: %s added: decode runs eagerly "
        "(no CUDA graphs) and the scheduler does not overlap batches, so the swap tick runs "
        "with nothing in flight",
        " ".join(added),
    )


def build(
    argv: Sequence[str], detect_device: Callable[[], str] = serving_device
) -> tuple[MorphConfig, list[str]]:
    """Split and complete the command line: the morph configuration and SGLang's argv.

    Paths the user gives (profile, checkpoint) are made absolute here, against the directory
    the launcher was started in: SGLang's processes may run elsewhere. Exits with status 2
    (argparse) on an unknown ``--morph-*`` option or value; raises UsageError, ValueError
    (``MorphConfig.validate``) or CheckpointError (an RL checkpoint that cannot be run), each
    with a one-line message, on input the user must change. ``detect_device`` says where SGLang
    will serve (``serving_device``; tests pass a double for a GPU).
    """
    parser = morph_parser()
    known, rest = parser.parse_known_args(list(argv))
    unknown_morph = [a for a in rest if a.startswith("--morph-")]
    if unknown_morph:
        parser.error(
            f"unknown option {unknown_morph[0].split('=')[0]}; accepted --morph-* options: "
            + ", ".join(sorted(o for a in parser._actions for o in a.option_strings))
        )
    sg = list(rest)
    model = _checked_model(_value(sg, "--model-path"), known.morph_data_dir)
    checkpoint = _absolute_or_none(known.morph_checkpoint)
    trained = None
    if known.morph_policy == "rl":
        checkpoint = checkpoint or str(DEFAULT_CHECKPOINT)
        # Loaded before anything else: CheckpointError says which file and why.
        trained = RestoreRule.from_metadata(RLPolicy.load(checkpoint).meta)
    # A policy serves under the rule it learned under (one trained without restore rationing
    # has learned to ration restores itself, one trained with it has not): the checkpoint's
    # rule, else the defaults, with each --morph-restore-* option given instead.
    restore = (trained or DEFAULT_RESTORE_RULE).overridden(
        known.morph_restore_window, known.morph_restore_max_window, known.morph_restore_load_drop)
    _set(sg, "--model-path", model)
    cfg = MorphConfig(
        policy=known.morph_policy,
        memory_budget_bytes=known.morph_memory_budget,
        quant_format=known.morph_format,
        group_size=known.morph_group_size,
        quant_method=known.morph_quant_method,
        static_format=known.morph_static_format,
        profile_path=_profile_path(
            known.morph_profile, model, known.morph_data_dir,
            known.morph_static_format or known.morph_format,
            known.morph_quant_method, known.morph_group_size),
        checkpoint_path=checkpoint,
        tick_interval_s=known.morph_tick_interval,
        restore_window_s=restore.window_s,
        restore_max_window_s=restore.max_window_s,
        restore_load_drop=restore.load_drop,
        ttft_slo_s=known.morph_ttft_slo,
        tpot_slo_s=known.morph_tpot_slo,
        kv_segment_tokens=known.morph_kv_segment_tokens,
    )
    cfg.validate()
    _check_profile(cfg)
    if trained is not None and restore != trained:
        logger.warning(
            "sglang-morph: the RL policy of %s was trained under the restore rule %s and is "
            "served under %s (--morph-restore-* given): it meets restores it did not learn "
            "with", checkpoint, trained, restore,
        )

    if cfg.enabled:
        _refuse_unsupported(cfg, sg, model)
    if not _has(sg, "--host"):
        sg += ["--host", "127.0.0.1"]
    on_cuda = detect_device() == "cuda"
    if on_cuda and cfg.enabled:
        _cuda_switches(sg)
    if not on_cuda:
        os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
        for flag, value in CPU_FLAGS.items():
            if not _has(sg, flag):
                sg += [flag, value]
        sg += [s for s in CPU_SWITCHES if not _has(sg, s)]
    if cfg.memory_budget_bytes is not None:
        from sglang_morph.memory import BudgetError, plan_kv_tokens
        from sglang_morph.model_info import DtypeError

        if _has(sg, "--max-total-tokens"):
            raise UsageError(
                "--morph-memory-budget sets the KV capacity; give --max-total-tokens only "
                "without it"
            )
        # The budget is sized in the dtype and context length the server will use: SGLang's
        # defaults are --dtype auto (the CPU flags above set float32) and the model's context.
        dtype, device = _value(sg, "--dtype") or "auto", _value(sg, "--device") or "cuda"
        context = _int_value(sg, "--context-length")
        try:
            plan = plan_kv_tokens(model, cfg, dtype, device, context[1] if context else None)
        except DtypeError as err:
            raise UsageError(f"--dtype: {err}") from err
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
    try:
        check_hook_targets(hook_targets(cfg))
    except MorphSetupError as err:  # the installed SGLang lacks a method the plugin hooks
        exit_with(err, FAILURE_STATUS)
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
    if cfg.policy in ("heuristic", "rl") and (cfg.ttft_slo_s is None or cfg.tpot_slo_s is None):
        from sglang_morph.warmup_targets import start_probe

        start_probe(
            f"http://{server_args.host}:{server_args.port}",
            server_args.admin_api_key or server_args.api_key,
            vocab_size(server_args.model_path), cfg.ttft_slo_s is not None,
            cfg.tpot_slo_s is not None,
        )  # fmt: skip
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
