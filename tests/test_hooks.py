"""Every SGLang hook the plugin needs is checked at start-up, twice.

SGLang's HookRegistry only logs a target it cannot attach and serves on without it; the
launcher therefore resolves every target of ``plugin.hooks`` before SGLang starts (exit 1), and
the scheduler checks each registered hook is attached before it serves (it stops). Both name
the target and the pinned SGLang version. The live test injects a nonexistent target with the
test-only ``SGLANG_MORPH_FAULTS='{"hook": 1}'`` into a real server.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_morph import SGLANG_VERSION, launch_server, plugin
from sglang_morph.compat import MorphSetupError, check_hook_targets, check_hooks_attached
from sglang_morph.config import ENV_VAR as CONFIG_VAR
from sglang_morph.config import MorphConfig
from sglang_morph.faults import ENV_VAR as FAULTS_VAR
from sglang_morph.faults import MISSING_HOOK_TARGET, Faults
from sglang_morph.server_process import Server, ServerError

PINNED = f"sglang=={SGLANG_VERSION}"
HERE = f"{__name__}.Target"


class Target:
    """Hook targets resolvable by dotted path, like SGLang's."""

    def hooked(self) -> int:
        return 1

    def plain(self) -> int:
        return 2


class Swappable:
    """A class target (REPLACE), like SGLang's KV allocator."""


def add_ten(result, *args, **kwargs) -> int:
    return result + 10


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch):
    """SGLang's real HookRegistry, emptied afterwards; Target's methods restored."""
    monkeypatch.setattr(Target, "hooked", Target.hooked)
    HookRegistry.reset()
    yield HookRegistry
    HookRegistry.reset()


def test_every_target_of_the_plugin_resolves_in_the_installed_sglang() -> None:
    cfg = MorphConfig(policy="heuristic", memory_budget_bytes=2_100_000)
    targets = plugin.hook_targets(cfg)
    assert plugin.TOKEN_ALLOCATOR in targets and len(targets) == 7
    assert plugin.TOKEN_ALLOCATOR not in plugin.hook_targets(MorphConfig(policy="heuristic"))
    check_hook_targets(targets)  # raises if SGLang renamed any of them


@pytest.mark.parametrize(
    "bogus",
    [f"{plugin.SCHEDULER}.no_such_method", "sglang.srt.no_such_module.Thing.method"],
)
def test_a_bogus_target_is_named_with_the_pinned_version(bogus: str) -> None:
    with pytest.raises(MorphSetupError) as info:
        check_hook_targets([f"{HERE}.hooked", bogus])
    message = str(info.value)
    assert message.startswith(f"SGLang hook target {bogus} does not exist")
    assert message.endswith(f"sglang-morph needs {PINNED}") and "\n" not in message


def test_attachment_is_checked_because_sglang_only_logs_a_failure(registry, caplog) -> None:
    registry.register(f"{HERE}.hooked", add_ten, HookType.AFTER)
    registry.register(f"{HERE}.missing", add_ten, HookType.AFTER)
    registry.apply_hooks()  # does not raise for the missing target: it logs and goes on
    assert f"Failed to apply hooks to {HERE}.missing" in caplog.text
    assert Target().hooked() == 11
    check_hooks_attached([(f"{HERE}.hooked", add_ten)])
    with pytest.raises(MorphSetupError, match=rf"{HERE}.missing does not exist, so its hook"):
        check_hooks_attached([(f"{HERE}.hooked", add_ten), (f"{HERE}.missing", add_ten)])
    with pytest.raises(MorphSetupError, match=rf"{HERE}.plain exists but its hook was not"):
        check_hooks_attached([(f"{HERE}.plain", add_ten)])


def test_a_class_replacement_counts_as_attached(registry, monkeypatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "Swappable", Swappable)  # restored afterwards

    class Replacement(Swappable):
        pass

    target = f"{__name__}.Swappable"
    with pytest.raises(MorphSetupError, match="exists but its hook was not attached"):
        check_hooks_attached([(target, Replacement)])
    registry.register(target, Replacement, HookType.REPLACE)
    registry.apply_hooks()
    check_hooks_attached([(target, Replacement)])


def test_the_hook_fault_registers_a_missing_target(registry, monkeypatch) -> None:
    monkeypatch.setenv(FAULTS_VAR, json.dumps({"hook": 1}))
    monkeypatch.setenv(CONFIG_VAR, json.dumps({"policy": "manual"}))
    assert Faults.from_env().missing_hook() == MISSING_HOOK_TARGET
    plugin.register()  # registers only; nothing is applied in this process
    assert [t for t, _ in plugin._registered][-1] == MISSING_HOOK_TARGET
    assert set(registry._hooks) == {*plugin.hook_targets(MorphConfig()), MISSING_HOOK_TARGET}
    monkeypatch.delenv(FAULTS_VAR)
    assert Faults.from_env().missing_hook() is None


def test_the_launcher_exits_1_naming_a_missing_target(monkeypatch, capsys) -> None:
    bogus = f"{plugin.SCHEDULER}.renamed_in_another_release"
    monkeypatch.setattr(launch_server, "hook_targets", lambda cfg: [bogus])
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")  # build() sets it; keep it from leaking
    with pytest.raises(SystemExit) as info:
        launch_server.main(["--morph-policy", "manual"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: SGLang hook target {bogus} ")
    assert err[0].endswith(PINNED)


@pytest.mark.slow
def test_a_hook_sglang_could_not_attach_stops_the_server(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with pytest.raises(ServerError, match="server exited with status"):
        Server(["--morph-policy", "manual"], env={FAULTS_VAR: json.dumps({"hook": 1})},
               log_path=log)  # fmt: skip
    text = log.read_text(errors="replace")
    assert f"Failed to apply hooks to {MISSING_HOOK_TARGET}" in text  # SGLang went on
    assert (
        f"MorphSetupError: SGLang hook target {MISSING_HOOK_TARGET} does not exist, so its "
        f"hook was not attached; sglang-morph needs {PINNED}"
    ) in text
    assert "sglang-morph runtime active" not in text
