"""The layout shows the architecture: imports flow tools -> detect -> backbones, and inside `detect` from the API,
training and evaluation through checkpoints down to models and losses, never back; no import cycle between modules or
between packages, counting the imports inside functions (lazy imports still make a cycle of dependencies)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A module under the first prefix never imports one under the second (module-level and function-level imports).
FORBIDDEN = [
    ("backbones", "detect"),
    ("detect.models", "detect.train"), ("detect.models", "detect.eval"), ("detect.models", "detect.data"),
    ("detect.losses", "detect.train"), ("detect.losses", "detect.eval"), ("detect.losses", "detect.data"),
    ("detect.data", "detect.models"), ("detect.data", "detect.losses"), ("detect.data", "detect.train"),
    ("detect.data", "detect.eval"), ("detect.eval", "detect.train"), ("detect.boxes", "detect.models"),
    ("detect.postprocess", "detect.models"), ("detect.models", "detect.losses"), ("detect.models", "detect.plugins"),
    ("detect.models", "detect.checkpoints"), ("detect.losses", "detect.checkpoints"),
    ("detect.losses", "detect.plugins"),
    ("detect.train", "detect.api"), ("detect.eval", "detect.api"), ("detect.checkpoints", "detect.train"),
    ("detect.checkpoints", "detect.eval"), ("detect.checkpoints", "detect.api"), ("detect.config", "detect.train"),
    ("detect.config", "detect.models"), ("detect.config", "detect.data"),
]  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.split(".")[0] in ("backbones", "detect")}


MODULES = {module_name(p): p for package in ("backbones", "detect") for p in (REPO / package).rglob("*.py")}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("lower, upper", FORBIDDEN)
def test_imports_flow_downward(lower: str, upper: str) -> None:
    wrong = sorted(
        f"{name} imports {target}"
        for name, path in MODULES.items()
        if _under(name, lower)
        for target in imports_of(path, top_level_only=False)
        if _under(target, upper)
    )
    assert not wrong


def _executed(name: str, target: str) -> set[str]:
    """What `import target` runs from module `name`: the target and its parent packages' __init__ files, less the
    packages `name` itself lives in (already initialised when it runs)."""
    parts = target.split(".")
    chain = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return {m for m in chain if m in MODULES and m != name and not _under(name, m)}


def _find_cycle(graph: dict[str, set[str]]) -> None:
    """Raise naming the first cycle of `graph` (depth-first)."""
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in graph[node]:
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(target) :], target]))
            if target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module-level", "with-function-level"])
def test_no_import_cycle_between_modules(top_level_only: bool) -> None:
    graph = {name: set().union(*(_executed(name, t) for t in imports_of(path, top_level_only)), set())
             for name, path in MODULES.items()}  # fmt: skip
    _find_cycle(graph)


def package_of(name: str) -> str:
    """`detect.train.engine` -> `detect.train`; a root module is its own package (`detect.api`); `backbones.*` one."""
    parts = name.split(".")
    return "backbones" if parts[0] == "backbones" else ".".join(parts[:2])


def test_no_import_cycle_between_packages() -> None:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = {package_of(t) for t in imports_of(path, top_level_only=False) if _resolves(t)}
        graph.setdefault(package_of(name), set()).update(targets - {package_of(name), "detect"})
    _find_cycle(graph)


def _resolves(target: str) -> bool:
    """Whether an imported name is a module of ours (or an attribute of one): `detect.models.Detector` is
    `detect.models`."""
    return target in MODULES or target.rsplit(".", 1)[0] in MODULES
