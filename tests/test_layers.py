"""The layer rule (DESIGN.md §1): analysis/ is a library a notebook imports without Dagster."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_analysis_module_imports_dagster_in_source():
    offenders = []
    for path in sorted((REPO / "analysis").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0].startswith("dagster")]
    assert offenders == []


def test_importing_every_analysis_module_loads_no_dagster():
    modules = sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in (REPO / "analysis").rglob("*.py")
    )
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + (
        "bad = sorted(m for m in sys.modules if m.split('.')[0].startswith('dagster'))\n"
        "assert not bad, bad\nprint(len(sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


WINGS = ("models", "data", "activations", "dictionaries", "evaluation", "stages")
"""The wings of analysis/ in dependency order (DESIGN.md §1): each imports only those before it
(and the top-level modules ids, paths and catalog, which import no wing)."""


def _analysis_imports() -> dict[str, set[str]]:
    """module -> the analysis modules it imports anywhere in its source (lazy imports included)."""
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (REPO / "analysis").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _wing(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in WINGS) else None


def test_every_wing_imports_only_the_wings_before_it():
    offenders = []
    for module, deps in _analysis_imports().items():
        own = _wing(module)
        allowed = set(WINGS[: WINGS.index(own) + 1]) if own else set()
        offenders += [f"{module} -> {d}" for d in deps if _wing(d) is not None and _wing(d) not in allowed]
    assert offenders == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_import_cycles_in_analysis():
    assert _cycles(_analysis_imports()) == []


def test_the_wing_rule_can_fail():
    """The checks above see a violation when there is one (a guard against a vacuous test)."""
    graph = _analysis_imports()
    assert "analysis.dictionaries.training.loop" in graph["analysis.dictionaries.training.sae"]
    assert _wing("analysis.stages.suite") == "stages" and _wing("analysis.ids") is None
    assert WINGS.index(_wing("analysis.evaluation.metrics")) > WINGS.index(_wing("analysis.dictionaries"))
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
