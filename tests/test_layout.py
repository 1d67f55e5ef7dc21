"""The package's layout: stage subpackages whose imports form no cycle, so that each stage can be read (and tested)
with only the stages below it in mind."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qlora_trainer"


def _imports(path: Path) -> set[str]:
    """The qlora_trainer modules `path` imports, at any depth (a function-level import is still a dependency), but
    not under `if TYPE_CHECKING:`, which names types for the reader and runs nothing."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    package = _module_name(path).split(".") if path.name == "__init__.py" else _module_name(path).split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            if module.startswith("qlora_trainer"):
                found |= {f"{module}.{alias.name}" for alias in node.names} | {module}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("qlora_trainer")}
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name and not name.startswith(m + ".")}
            for name, path in modules.items()}


def _stage(module: str) -> str:
    """A module's stage subpackage; a top-level module (cli, errors, distributed) is a node of its own, so that a
    cycle between stages that runs through one is still seen."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_modules_import_no_cycle():
    graph = _graph()
    assert sum(map(len, graph.values())) > 100, "the import graph was read"  # not passing on an empty graph
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_stages_import_no_cycle():
    """Every stage subpackage may import the stages below it and the top level's errors and distributed modules,
    never one that imports it back, directly or through a top-level module."""
    stages: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        stages.setdefault(_stage(module), set()).update(_stage(d) for d in deps if _stage(d) != _stage(module))
    cycle = _cycle(stages)
    assert cycle is None, " -> ".join(cycle)
    subpackages = [p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    assert len(subpackages) >= 5 and set(subpackages) <= set(stages), sorted(stages)  # grouped, not flat


def test_relative_imports_are_read(tmp_path, monkeypatch):
    fake = tmp_path / "qlora_trainer" / "training" / "train.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from . import resume\nfrom ..files.run_dir import CHECKPOINTS\n")
    monkeypatch.setitem(globals(), "PACKAGE", tmp_path / "qlora_trainer")
    assert _imports(fake) >= {"qlora_trainer.training.resume", "qlora_trainer.files.run_dir"}


def test_the_finder_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
