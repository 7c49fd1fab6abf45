"""The import graph looks only down the layers of the package tree and has no cycle: every
kimivl_rl or sft module, imports inside functions included, reaches only modules of its own layer
or lower ones, and only modules that do not reach it back."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kimivl_rl", "sft")
# Lowest first, as in the README's layout table. A module is in the layer of the longest prefix
# that names it.
LAYERS = (
    ("kimivl_rl.config",),
    ("kimivl_rl.infra",),
    # the method's parts: RL maths, rewards, rollout engines, data, models, training kernels
    ("kimivl_rl.rl", "kimivl_rl.reward", "kimivl_rl.rollout", "kimivl_rl.data", "kimivl_rl.models",
     "kimivl_rl.training"),
    # shared by SFT and RL
    ("kimivl_rl.prepare", "kimivl_rl.evaluation", "kimivl_rl.summary"),
    # the RL system, the data job that samples a teacher through its actors, and SFT
    ("kimivl_rl.system", "kimivl_rl.data.long_cot_builder", "sft"),
    ("kimivl_rl.pipeline",),
    ("kimivl_rl.cli",),
)


def module_imports() -> dict[str, set[str]]:
    graph = {}
    for path in [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        graph[name] = {m for m in imported if m.split(".")[0] in PACKAGES} - {name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for module in graph.get(stack.pop(), ()):
            if module not in seen:
                seen.add(module)
                stack.append(module)
    return seen


def layer_of(module: str) -> int:
    """The index in ``LAYERS`` of the longest prefix naming ``module``; KeyError if none does."""
    found = [(len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer
             if module == prefix or module.startswith(prefix + ".")]
    if not found:
        raise KeyError(f"{module} is in no layer: add it to LAYERS")
    return max(found)[1]


def test_no_module_imports_one_that_imports_it_back():
    graph = module_imports()
    assert "kimivl_rl.system.actors" in graph and "kimivl_rl.system.controller" in graph
    assert [m for m in sorted(graph) if m in reachable(graph, m)] == []


def test_every_module_imports_only_its_own_layer_or_lower_ones():
    graph = module_imports()
    modules = sorted(set(graph) - set(PACKAGES))
    layers = {m: layer_of(m) for m in modules}  # every module has a layer
    upward = [f"{m} -> {d}" for m in modules for d in sorted(graph[m])
              if d not in PACKAGES and layer_of(d) > layers[m]]
    assert upward == []


def test_data_jobs_and_sft_stand_below_the_rl_controller():
    graph = module_imports()
    for module in ("kimivl_rl.system.difficulty", "kimivl_rl.data.long_cot_builder", "kimivl_rl.sft.trainer",
                   "kimivl_rl.system.actors", "kimivl_rl.evaluation"):
        assert "kimivl_rl.system.controller" not in reachable(graph, module), module
    assert not any(m.startswith("sft") for m in reachable(graph, "kimivl_rl.system.controller"))


def test_a_cycle_and_an_upward_import_are_found():
    assert reachable({"a": {"b"}, "b": {"a"}}, "a") == {"a", "b"}
    assert layer_of("kimivl_rl.data.long_cot_builder") > layer_of("kimivl_rl.data.rows")
    assert layer_of("kimivl_rl.infra.remote") < layer_of("kimivl_rl.system.actors")
