"""The package's imports run one way down the pipeline, without cycles and without private names.

The stages, lowest first (docs/architecture.md draws them):

    base (errors, showers, incidence, pretrained, ...) -> geometry -> simulate | data -> models -> train -> adapt
    -> generate | export -> evaluate -> sweep -> demo | benchmark -> cli

A module may import from its own stage or from a lower one, never from a higher one nor from a
sibling on the same stage (``simulate`` and ``data`` know nothing of each other). Every import
counts, also those inside functions and under ``TYPE_CHECKING``: a lazy import is still a
dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "caloadapt"

#: stage of each top-level module or subpackage; modules of the base stage may import each other
STAGES = {
    "caloadapt": 0, "errors": 0, "showers": 0, "pretrained": 0, "_atomic": 0, "_inputs": 0, "_memory": 0, "_signals": 0,
    "_provenance": 0, "_timing": 0, "_threads": 0, "incidence": 0,
    "geometry": 1,
    "simulate": 2, "data": 2,
    "models": 3,
    "train": 4,
    "adapt": 5,
    "generate": 6, "export": 6,
    "evaluate": 7,
    "sweep": 8,
    "demo": 9, "benchmark": 9,
    "cli": 10,
    "__main__": 11,
}


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("caloadapt", *path.relative_to(PACKAGE).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """``(module imported, names imported, line)`` of every caloadapt import in one module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "caloadapt":
                continue
            names = [alias.name for alias in node.names]
            # `from . import plots` imports a module, not a name of the package
            submodules = [n for n in names if f"{target}.{n}" in modules]
            for n in submodules:
                found.append((f"{target}.{n}", [], node.lineno))
            if len(submodules) < len(names):
                found.append((target, [n for n in names if n not in submodules], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.split(".")[0] == "caloadapt"]
    return found


def _stage_of(module: str) -> tuple[str, int]:
    top = module.split(".")[1] if "." in module else "caloadapt"
    return top, STAGES[top]


def test_every_module_has_a_stage():
    tops = {m.split(".")[1] if "." in m else "caloadapt" for m in _modules()}
    missing = sorted(tops - set(STAGES))
    assert not missing, f"add these to STAGES: {missing}"


def test_imports_run_down_the_pipeline():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        top, stage = _stage_of(name)
        for target, _, line in _imports(name, path, modules):
            other, other_stage = _stage_of(target)
            if other == top or (stage == other_stage == 0):
                continue
            if other_stage >= stage:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({top}, stage {stage}) imports {target} "
                             f"({other}, stage {other_stage})")
    assert not wrong, "imports against the pipeline:\n" + "\n".join(wrong)


def test_no_import_cycles():
    modules = _modules()
    graph = {name: sorted({t for t, _, _ in _imports(name, path, modules) if t in modules and t != name})
             for name, path in modules.items()}
    # a package's __init__ re-exports its modules: that edge is not a dependency of the modules on it
    graph = {name: [t for t in targets if not t.startswith(name + ".")] for name, targets in graph.items()}
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_names_cross_modules():
    modules = _modules()
    wrong = [f"{path.relative_to(PACKAGE)}:{line} imports {n} from {target}"
             for name, path in modules.items() for target, names, line in _imports(name, path, modules)
             for n in names if n.startswith("_") and not n.startswith("__") and target != name]
    assert not wrong, "private names used outside their module:\n" + "\n".join(wrong)


def test_the_checker_sees_a_violation(tmp_path):
    """The parser resolves relative imports: a models module importing the training loop is caught."""
    fake = tmp_path / "caloadapt" / "models" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..train.loop import train\nfrom .edm import _finish\n")
    found = _imports("caloadapt.models.x", fake, {})
    assert found == [("caloadapt.train.loop", ["train"], 1), ("caloadapt.models.edm", ["_finish"], 2)]
    assert _stage_of(found[0][0])[1] > _stage_of("caloadapt.models.x")[1]
