"""Configuration parsing, version pin and data resolution (no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang_morph import SGLANG_VERSION
from sglang_morph.cli import UsageError
from sglang_morph.compat import MorphSetupError, check_sglang_version
from sglang_morph.config import MorphConfig, parse_bytes
from sglang_morph.data import AssetNotFoundError, resolve


@pytest.mark.parametrize("text, expected", [
    ("1800000", 1_800_000), ("64MB", 64_000_000), ("1.5KiB", 1536), ("2GiB", 2 * 1024**3),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "12XB", "-5", "iB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="expected a number|needs a prefix"):
        parse_bytes(text)


def test_version_pin():
    check_sglang_version(SGLANG_VERSION)
    with pytest.raises(MorphSetupError, match=f"needs sglang=={SGLANG_VERSION} exactly"):
        check_sglang_version("0.5.22")


def test_config_validation_names_accepted_values():
    with pytest.raises(ValueError, match="accepted: off, manual, heuristic, rl"):
        MorphConfig(policy="auto").validate()
    with pytest.raises(ValueError, match="accepts --morph-policy off or manual"):
        MorphConfig(policy="heuristic", static_format="int4").validate()


def test_config_round_trips_through_env(monkeypatch):
    monkeypatch.delenv("SGLANG_MORPH_CONFIG", raising=False)  # restored as absent afterwards
    assert MorphConfig.from_env() is None
    cfg = MorphConfig(policy="manual", memory_budget_bytes=123, extra={"a": 1})
    cfg.to_env()
    assert MorphConfig.from_env() == cfg


def test_resolver_finds_shared_data():
    assert (resolve("stories260K") / "config.json").exists()
    assert resolve("azure-code").name == "azure2023_code.csv"


def test_resolver_missing_asset_names_places(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("sglang_morph.data.REPO_ROOT", tmp_path / "repo")
    with pytest.raises(AssetNotFoundError) as err:
        resolve("tinystories", download=False)
    msg = str(err.value)
    assert "tinystories" in msg and str(tmp_path) in msg and "https://" in msg


def test_resolver_prefers_user_dir(tmp_path):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "tinystories_sample.txt").write_text("x")
    assert resolve("tinystories", data_dir=tmp_path) == tmp_path / "text" / "tinystories_sample.txt"


def test_awq_needs_a_matching_profile():
    """AWQ without scales, or with scales made for another grid, is refused before start-up."""
    from sglang_morph.launch_server import build

    with pytest.raises(UsageError, match="needs --morph-profile"):
        build(["--morph-quant-method", "awq", "--morph-profile", "last_to_first"])
    profiles = Path(__file__).resolve().parent.parent / "checkpoints" / "profiles"
    rtn = str(profiles / "stories260K-int4.json")
    with pytest.raises(UsageError, match="rtn/int4/32, not awq/int4/32"):
        build(["--morph-quant-method", "awq", "--morph-profile", rtn])
    awq = str(profiles / "stories260K-int4-awq.json")
    with pytest.raises(UsageError, match="not awq/int4/64"):
        build(["--morph-quant-method", "awq", "--morph-profile", awq, "--morph-group-size", "64"])
    cfg, _ = build(["--morph-quant-method", "awq", "--morph-profile", awq])
    assert cfg.quant_method == "awq"


def test_launcher_serves_the_shipped_profile_unless_told_otherwise(tmp_path):
    """A server started as the README shows quantizes in the project's measured layer order;
    ``last_to_first``, another grid or another model gets the old order, never a profile
    measured for something else."""
    import shutil

    from sglang_morph.data import resolve_model
    from sglang_morph.launch_server import build
    from sglang_morph.paths import default_profile

    assert build([])[0].profile_path == str(default_profile("int4"))
    assert build(["--morph-format", "int8"])[0].profile_path == str(default_profile("int8"))
    assert build(["--morph-static-format", "int8"])[0].profile_path == str(
        default_profile("int8"))
    awq = build(["--morph-quant-method", "awq"])[0]
    assert awq.profile_path == str(default_profile("int4", "awq"))
    assert build(["--morph-profile", "last_to_first"])[0].profile_path is None
    assert build(["--morph-group-size", "64"])[0].profile_path is None  # measured at g32
    other = tmp_path / "other-model"
    shutil.copytree(resolve_model(None), other)
    assert build(["--model-path", str(other)])[0].profile_path is None


def test_launcher_makes_user_paths_absolute_and_loads_the_rl_checkpoint(monkeypatch, tmp_path):
    """SGLang's processes may run in another directory: relative paths are resolved where the
    launcher was started, and the RL checkpoint is loaded before anything starts."""
    import shutil

    from rl_controller.rl_policy import CheckpointError
    from sglang_morph.launch_server import build
    from sglang_morph.paths import DEFAULT_CHECKPOINT, default_profile

    shutil.copy(default_profile(), tmp_path / "p.json")
    for suffix in (".zip", ".json", ".actor.npz"):
        shutil.copy(DEFAULT_CHECKPOINT.with_suffix(suffix), (tmp_path / "ck").with_suffix(suffix))
    monkeypatch.chdir(tmp_path)
    cfg, _ = build(["--morph-policy", "rl", "--morph-profile", "p.json",
                    "--morph-checkpoint", "ck.zip"])
    assert cfg.profile_path == str(tmp_path / "p.json")
    assert cfg.checkpoint_path == str(tmp_path / "ck.zip")
    cfg, _ = build(["--morph-policy", "rl"])
    assert cfg.checkpoint_path == str(DEFAULT_CHECKPOINT)
    with pytest.raises(CheckpointError, match=str(tmp_path / "missing.zip")):
        build(["--morph-policy", "rl", "--morph-checkpoint", "missing.zip"])
    cfg, _ = build(["--morph-policy", "heuristic", "--morph-checkpoint", "missing.zip"])
    assert cfg.checkpoint_path == str(tmp_path / "missing.zip")  # not read without rl


def test_an_rl_server_serves_under_the_restore_rule_its_checkpoint_was_trained_under(
    monkeypatch, tmp_path, caplog
):
    """The restore rule a checkpoint records is the RL server's default (a policy trained
    without restore rationing has learned to ration restores itself); an option given wins,
    with a warning that the policy meets a rule it did not learn under. Other policies keep
    the defaults."""
    import json
    import shutil

    from sglang_morph.config import DEFAULT_RESTORE_RULE, RestoreRule
    from sglang_morph.launch_server import build
    from sglang_morph.paths import DEFAULT_CHECKPOINT

    for suffix in (".zip", ".actor.npz"):
        shutil.copy(DEFAULT_CHECKPOINT.with_suffix(suffix), (tmp_path / "ck").with_suffix(suffix))
    meta = json.loads(DEFAULT_CHECKPOINT.with_suffix(".json").read_text())
    meta.update(restore_window_s=2.0, restore_max_window_s=20.0, restore_load_drop=0.1)
    (tmp_path / "ck.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING", logger="sglang_morph"):
        cfg, _ = build(["--morph-policy", "rl", "--morph-checkpoint", "ck.zip"])
        assert cfg.restore_rule == RestoreRule(2.0, 20.0, 0.1)
        assert "trained under the restore rule" not in caplog.text
        cfg, _ = build(["--morph-policy", "rl", "--morph-checkpoint", "ck.zip",
                        "--morph-restore-window", "5"])
        assert cfg.restore_rule == RestoreRule(5.0, 20.0, 0.1)
        assert "trained under the restore rule" in caplog.text and "ck.zip" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sglang_morph"):
        assert build(["--morph-policy", "rl"])[0].restore_rule == DEFAULT_RESTORE_RULE
        assert "trained under the restore rule" not in caplog.text  # shipped: the defaults
    heuristic, _ = build(["--morph-policy", "heuristic", "--morph-checkpoint", "ck.zip"])
    assert heuristic.restore_rule == DEFAULT_RESTORE_RULE


def _launcher_usage_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    """Command lines the user must change, each with what its one error line must say."""
    (tmp_path / "not-json.json").write_text("{")
    (tmp_path / "empty-model").mkdir()
    return [
        (["--morph-memory-budget", "1000"], "--morph-memory-budget 1000 B is too small"),
        (["--morph-memory-budget", "2MB", "--max-total-tokens", "500"],
         "give --max-total-tokens only without it"),
        (["--model-path", str(tmp_path / "absent")], "model path does not exist"),
        (["--model-path", str(tmp_path / "empty-model")], "no readable config.json"),
        (["--morph-profile", str(tmp_path / "absent.json")],
         "--morph-profile: cannot read layer profile"),
        (["--morph-profile", str(tmp_path / "not-json.json")], "is not JSON"),
        (["--morph-quant-method", "awq", "--morph-profile", "last_to_first"],
         "needs --morph-profile"),
        (["--morph-policy", "heuristic", "--morph-static-format", "int4"],
         "accepts --morph-policy off or manual"),
        (["--morph-ttft-slo", "0"], "--morph-ttft-slo must be a positive number"),
        (["--morph-restore-window", "-1"],
         "--[morph-]restore-window must be 0 or more seconds, got -1"),
        (["--morph-restore-window", "30", "--morph-restore-max-window", "10"],
         "--[morph-]restore-max-window must be at least the restore window (30 s), got 10"),
        (["--morph-restore-load-drop", "1"],
         "--[morph-]restore-load-drop must be a fraction in [0, 1), got 1"),
        (["--morph-policy", "rl", "--morph-checkpoint", str(tmp_path / "absent.zip")],
         "does not exist"),
    ]


def test_launcher_usage_errors_exit_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Everything the user must change on the command line: status 2 and one line naming it,
    before any process starts (a version mismatch, not the command line's fault, is 1)."""
    from sglang_morph import launch_server

    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")  # the launcher sets it; restored after
    for argv, needle in _launcher_usage_cases(tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            launch_server.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, (argv, err)
    monkeypatch.setattr(launch_server, "check_sglang_version",
                        lambda: check_sglang_version("0.5.22"))
    with pytest.raises(SystemExit) as exit_info:
        launch_server.main([])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("error: sglang-morph needs sglang==")


def test_recorded_paths_carry_no_machine_prefix():
    """Metadata and reports name files inside the checkout, or in the shared folder beside
    it, relative to the checkout; another place stays as given."""
    from sglang_morph.paths import REPO_ROOT, repo_relative

    assert repo_relative(REPO_ROOT / "checkpoints" / "morph-ppo.zip") == "checkpoints/morph-ppo.zip"
    beside = REPO_ROOT.parent / "shared" / "data" / "traces" / "azure2023_code.csv"
    assert repo_relative(beside) == "../shared/data/traces/azure2023_code.csv"
    assert repo_relative("/") == "/"
