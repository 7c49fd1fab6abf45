"""The import graph has no cycle: every kimivl_rl or sft module, imports inside functions
included, reaches only modules that do not reach it back."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kimivl_rl", "sft")


def module_imports() -> dict[str, set[str]]:
    graph = {}
    for path in [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = {node.module for node in ast.walk(ast.parse(path.read_text()))
                       if isinstance(node, ast.ImportFrom) and node.module
                       and node.module.split(".")[0] in PACKAGES} - {name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for module in graph.get(stack.pop(), ()):
            if module not in seen:
                seen.add(module)
                stack.append(module)
    return seen


def test_no_module_imports_one_that_imports_it_back():
    graph = module_imports()
    assert "kimivl_rl.actors" in graph and "kimivl_rl.controller" in graph
    assert [m for m in sorted(graph) if m in reachable(graph, m)] == []


def test_data_jobs_and_sft_stand_below_the_rl_controller():
    graph = module_imports()
    for module in ("kimivl_rl.difficulty", "kimivl_rl.data.long_cot_builder", "sft.trainer",
                   "kimivl_rl.actors", "kimivl_rl.evaluation"):
        assert "kimivl_rl.controller" not in reachable(graph, module), module
    assert not any(m.startswith("sft") for m in reachable(graph, "kimivl_rl.controller"))


def test_a_cycle_is_found():
    assert reachable({"a": {"b"}, "b": {"a"}}, "a") == {"a", "b"}
