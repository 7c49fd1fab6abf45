"""The import graph looks only down the layers of the package tree and has no cycle: every
kimivl_rl module, imports inside functions included, reaches only modules of its own layer or
lower ones, and only modules that do not reach it back. No module is an exception."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kimivl_rl",)
# Lowest first (the README's layout table, read bottom up): a folder, or a module of the package
# root, is one layer's, all of it.
LAYERS = (
    ("kimivl_rl.config", "kimivl_rl.types"),
    ("kimivl_rl.infra",),
    ("kimivl_rl.reward",),
    ("kimivl_rl.rl",),  # the RL maths, on rewards and samples
    ("kimivl_rl.data", "kimivl_rl.models"),
    ("kimivl_rl.rollout", "kimivl_rl.training"),  # the engines, on models and data
    # shared by SFT and RL
    ("kimivl_rl.prepare", "kimivl_rl.evaluation", "kimivl_rl.summary"),
    # the RL system (its actors, the data jobs that sample through them) and SFT
    ("kimivl_rl.system", "kimivl_rl.sft"),
    ("kimivl_rl.pipeline",),
    ("kimivl_rl.cli",),
)
MAX_LAYERS = 10

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
    """The index in ``LAYERS`` of the prefix naming ``module``; KeyError if none does."""
    found = [i for i, layer in enumerate(LAYERS) for prefix in layer
             if module == prefix or module.startswith(prefix + ".")]
    if not found:
        raise KeyError(f"{module} is in no layer: add it to LAYERS")
    return found[0]


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
    for module in ("kimivl_rl.system.difficulty", "kimivl_rl.system.long_cot_builder",
                   "kimivl_rl.sft.trainer", "kimivl_rl.system.actors", "kimivl_rl.evaluation"):
        assert "kimivl_rl.system.controller" not in reachable(graph, module), module
    assert not any(m.startswith("kimivl_rl.sft") for m in reachable(graph, "kimivl_rl.system.controller"))


def test_models_stand_beside_data_not_on_it():
    """One layer, but the tiny model takes its tokenizer corpus from the caller (``prepare``)."""
    graph = module_imports()
    for module in [m for m in graph if m.startswith("kimivl_rl.models")]:
        assert not any(d.startswith("kimivl_rl.data") for d in reachable(graph, module)), module


def test_the_generation_types_import_neither_torch_nor_vllm():
    """So the RL maths, below the engines, can speak ``Sample`` (``kimivl_rl.types``)."""
    tree = ast.parse((ROOT / "kimivl_rl" / "types.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not {m.split(".")[0] for m in imported} & {"torch", "vllm"}


def test_layers_are_few_and_every_package_is_under_kimivl_rl():
    assert len(LAYERS) <= MAX_LAYERS
    assert [p.parent.name for p in ROOT.glob("*/__init__.py")] == ["kimivl_rl"]


def test_a_cycle_and_an_upward_import_are_found():
    assert reachable({"a": {"b"}, "b": {"a"}}, "a") == {"a", "b"}
    assert layer_of("kimivl_rl.system.long_cot_builder") > layer_of("kimivl_rl.data.rows")
    assert layer_of("kimivl_rl.infra.remote") < layer_of("kimivl_rl.system.actors")
