"""The project's floors: every import looks down (or sideways within a floor), never up, no
module imports another in a circle, and no command imports another command.

Each module of the four packages is assigned a floor below; a new module must be given one, so
the floor plan in docs/design.md and the code cannot drift apart. Imports inside functions count
too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("sglang_morph", "rl_controller", "envs", "eval")

GROUND, CONTROL, SERVING, WORKLOAD, SIMULATION, COMMAND = range(6)
FLOOR_NAMES = ("ground", "control", "serving", "workload", "simulation", "command")

FLOORS: dict[str, int] = {
    # ground: configuration, model sizes, the budget rule, paths and data, profile reading
    "sglang_morph": GROUND,
    "sglang_morph.config": GROUND,
    "sglang_morph.compat": GROUND,
    "sglang_morph.paths": GROUND,
    "sglang_morph.data": GROUND,
    "sglang_morph.model_info": GROUND,
    "sglang_morph.memory": GROUND,
    "sglang_morph.profile_file": GROUND,
    "sglang_morph.cli": GROUND,
    # control: snapshot, clock, policies, the pure controller (numpy only)
    "rl_controller": CONTROL,
    "rl_controller.observation": CONTROL,
    "rl_controller.clock": CONTROL,
    "rl_controller.policy": CONTROL,
    "rl_controller.heuristic": CONTROL,
    "rl_controller.rl_policy": CONTROL,
    "rl_controller.controller": CONTROL,
    "rl_controller.stabilizer": CONTROL,
    # serving: the runtime inside SGLang's processes, and the quantized kernels it runs
    "sglang_morph.quant": SERVING,
    "sglang_morph.quant.quantize": SERVING,
    "sglang_morph.quant.matmul": SERVING,
    "sglang_morph.quant.awq": SERVING,
    "sglang_morph.quant.linear_method": SERVING,
    "sglang_morph.hf_model": SERVING,
    "sglang_morph.kv": SERVING,
    "sglang_morph.kv.elastic_allocator": SERVING,
    "sglang_morph.kv.resizer": SERVING,
    "sglang_morph.kv.physical": SERVING,
    "sglang_morph.swap": SERVING,
    "sglang_morph.swap.layer_swapper": SERVING,
    "sglang_morph.iterations": SERVING,
    "sglang_morph.timings": SERVING,
    "sglang_morph.faults": SERVING,
    "sglang_morph.tp_sync": SERVING,
    "sglang_morph.metrics": SERVING,
    "sglang_morph.scheduler_view": SERVING,
    "sglang_morph.runtime": SERVING,
    "sglang_morph.plugin": SERVING,
    "sglang_morph.http_api": SERVING,
    "sglang_morph.launch_server": SERVING,
    "sglang_morph.client": SERVING,
    "sglang_morph.warmup_targets": SERVING,
    # workload: server processes, traces, replay, metrics, reports
    "sglang_morph.server_process": WORKLOAD,
    "eval": WORKLOAD,
    "eval.traces": WORKLOAD,
    "eval.prompts": WORKLOAD,
    "eval.replay": WORKLOAD,
    "eval.metrics": WORKLOAD,
    "eval.report": WORKLOAD,
    "eval.servers": WORKLOAD,
    "eval.quality_eval": WORKLOAD,
    "eval.served_quality": WORKLOAD,
    "eval.plan": WORKLOAD,
    "eval.summary": WORKLOAD,
    "eval.execute": WORKLOAD,
    "eval.stats": WORKLOAD,
    "eval.bootstrap": WORKLOAD,
    "eval.run_dir": WORKLOAD,
    "eval.capacity": WORKLOAD,
    # simulation: the gymnasium environment, its simulator and backends
    "envs": SIMULATION,
    "envs.backend": SIMULATION,
    "envs.calibration": SIMULATION,
    "envs.simulator": SIMULATION,
    "envs.reward": SIMULATION,
    "envs.morph_env": SIMULATION,
    "envs.engine_backend": SIMULATION,
    "envs.policies": SIMULATION,
    "envs.episodes": SIMULATION,
    "rl_controller.actor_export": SIMULATION,
    # commands: each readable top to bottom; none imports another
    "sglang_morph.bench": COMMAND,
    "sglang_morph.bench_memory": COMMAND,
    "sglang_morph.profile": COMMAND,
    "sglang_morph.tiny_model": COMMAND,
    "eval.run": COMMAND,
    "eval.sweep": COMMAND,
    "eval.quality": COMMAND,
    "eval.soak": COMMAND,
    "eval.steady": COMMAND,
    "eval.dominance": COMMAND,
    "envs.calibrate": COMMAND,
    "envs.sim_vs_real": COMMAND,
    "rl_controller.train": COMMAND,
    "rl_controller.finetune": COMMAND,
    "rl_controller.evaluate": COMMAND,
}

CONTROL_THIRD_PARTY = {"numpy"}
"""The control floor runs in the scheduler's hot path and in training alike: numpy only."""


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(project modules, top-level third-party packages) that ``name`` imports anywhere."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ours: set[str] = set()
    others: set[str] = set()

    def add(target: str) -> None:
        top = target.split(".")[0]
        if top in PACKAGES:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                ours.add(target)
        elif top not in sys.stdlib_module_names and top != "__future__":
            others.add(top)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in MODULES else base)
    return ours, others


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_every_module_has_a_floor() -> None:
    missing = sorted(set(MODULES) - set(FLOORS))
    assert not missing, f"give these modules a floor in tests/test_layers.py: {missing}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_look_down(name: str) -> None:
    floor = FLOORS.get(name, COMMAND)
    ours, others = GRAPH[name]
    for target in sorted(ours):
        target_floor = FLOORS.get(target, COMMAND)
        assert target_floor <= floor, (
            f"{name} ({FLOOR_NAMES[floor]}) imports {target} ({FLOOR_NAMES[target_floor]}), "
            "a higher floor"
        )
        if floor == COMMAND:
            assert target_floor < COMMAND, f"command {name} imports command {target}"
    if name.startswith("sglang_morph"):
        assert not any(t.split(".")[0] in ("envs", "eval") for t in ours), (
            f"{name} imports envs or eval: {sorted(ours)}"
        )
    if floor == CONTROL:
        assert others <= CONTROL_THIRD_PARTY, f"{name} imports {sorted(others)}: numpy only"


def test_no_import_cycles() -> None:
    """Depth-first search over the module graph; any back edge is a cycle."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node][0]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_the_rules_catch_violations(tmp_path: Path) -> None:
    """The checker itself: an upward import and a cycle in a made-up graph are found."""
    fake = {"a": ({"b"}, set()), "b": ({"a"}, set())}
    saved = dict(GRAPH)
    GRAPH.clear()
    GRAPH.update(fake)
    try:
        with pytest.raises(AssertionError, match="import cycle: a -> b -> a"):
            test_no_import_cycles()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
    ours, _ = _imports("sglang_morph.runtime", _write(tmp_path, "from envs.simulator import X\n"))
    assert ours == {"envs.simulator"}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mod.py"
    path.write_text(text)
    return path
