"""The package's shape: imports run one way, with no cycle, not even through a function-local import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import memfit

ROOT = Path(memfit.__file__).parent


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Each memfit module -> the memfit modules it imports anywhere in its body (TYPE_CHECKING blocks too)."""
    paths = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for alias in node.names:  # `from memfit import presets` imports the module memfit.presets
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base)
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_memfit_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_function_local_and_type_checking_imports(tmp_path):
    # A package where a imports b at the top, and b imports a only inside a function: a cycle.
    pkg = tmp_path / "memfit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from memfit.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from memfit import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import D\n")
    (pkg / "d.py").write_text("from memfit import c\n")
    graph = import_graph(pkg)
    assert graph["memfit.a"] == {"memfit.b"} and graph["memfit.b"] == {"memfit.a"}
    assert graph["memfit.c"] == {"memfit.d"}  # a relative import in a TYPE_CHECKING block counts
    assert find_cycle(graph) == ["memfit.a", "memfit.b", "memfit.a"]
    graph["memfit.b"] = set()  # a -> b only: the type-level cycle is the one left
    assert find_cycle(graph) == ["memfit.c", "memfit.d", "memfit.c"]
    graph["memfit.d"] = set()
    assert find_cycle(graph) is None


def test_layers_import_downward_only():
    graph = import_graph()

    def reaches(src: str) -> set[str]:
        seen, todo = set(), [src]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    # Rendering and measuring never need the layers above them; the engine is above the planner.
    assert not reaches("memfit.display") & {"memfit.report", "memfit.estimator", "memfit.planner", "memfit.tracker"}
    assert not reaches("memfit.tracker") & {"memfit.estimator", "memfit.planner", "memfit.engine", "memfit.cli"}
    # The tracker's units: the ledger knows no torch hook, attribution no ledger, replay only the ledger.
    assert not reaches("memfit.ledger") & {"memfit.observer", "memfit.attribution", "memfit.tracker", "memfit.report"}
    assert not reaches("memfit.attribution") & {"memfit.ledger", "memfit.observer", "memfit.tracker"}
    assert reaches("memfit.replay") - {"memfit.ledger"} <= reaches("memfit.ledger")
    assert {"memfit.ledger", "memfit.attribution", "memfit.observer", "memfit.replay"} <= reaches("memfit.tracker")
    assert not reaches("memfit.estimator") & {"memfit.planner", "memfit.engine", "memfit.cli"}
    # The step's parts sit under everything that runs a step: estimate, measure, find_batch_size, the Trainer.
    assert not reaches("memfit.step") & {"memfit.tracker", "memfit.estimator", "memfit.measurement",
                                         "memfit.planner", "memfit.engine", "memfit.cli"}
    assert {"memfit.step"} <= reaches("memfit.engine.step") & reaches("memfit.estimator") \
        & reaches("memfit.measurement") & reaches("memfit.batch_size")
    assert not reaches("memfit.planner") & {"memfit.engine", "memfit.engine.trainer", "memfit.cli"}
    assert "memfit.cli" not in reaches("memfit.engine")


def _private_torch_uses(path: Path) -> list[str]:
    """Private torch modules imported and private torch attributes read in ``path`` (dunders are public)."""
    def private(dotted: str) -> bool:
        return dotted.split(".")[0] == "torch" and any(
            part.startswith("_") and not part.startswith("__") for part in dotted.split("."))

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if private(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [f"{node.module}.{a.name}" for a in node.names if private(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Attribute):
            parts, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                parts.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and private(".".join([value.id, *reversed(parts)])):
                found.append(".".join([value.id, *reversed(parts)]))
    return found


def test_private_torch_apis_are_used_in_torch_private_only():
    uses = {_module_name(p, ROOT): _private_torch_uses(p) for p in ROOT.rglob("*.py") if p.name != "_torch_private.py"}
    assert {name: found for name, found in uses.items() if found} == {}
    assert "torch._subclasses.fake_tensor.FakeTensorMode" in _private_torch_uses(ROOT / "_torch_private.py")


def test_torch_distributed_is_imported_by_its_seams_only():
    def imports_distributed(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
                return True
        return False

    # The collectives (comm), the model's wrapping (sharding), FSDP's private state (_torch_private).
    seams = {"memfit.engine.comm", "memfit.engine.sharded", "memfit.sharding", "memfit.fakedist", "memfit._torch_private"}
    assert {_module_name(p, ROOT) for p in ROOT.rglob("*.py") if imports_distributed(p)} <= seams


def test_no_module_or_class_grows_past_a_reading():
    # One noun per file: a module over ~400 lines or a class over ~250 is doing two jobs (issue 10).
    too_long = []
    for path in sorted(ROOT.rglob("*.py")):
        source = path.read_text()
        if "__mutmut_" in source:
            pytest.skip("`make mutate` runs the suite on mutmut's generated copies, not on the code as written")
        if source.count("\n") > 420:
            too_long.append(f"{path.relative_to(ROOT)}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 280:
                too_long.append(f"{path.relative_to(ROOT)}: class {node.name} {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "split these: " + "; ".join(too_long)


def test_benchmarks_and_tools_import_names_that_exist():
    # Benchmarks are not run by the suite; a moved name must not break them silently.
    import importlib.util

    repo = Path(__file__).parents[1]
    if not (repo / "benchmarks").is_dir():
        pytest.skip("no benchmarks/ beside tests/ (mutmut runs a copy of src/ and tests/ only)")
    missing, files = [], 0
    for folder in ("benchmarks", "tools"):
        for path in sorted((repo / folder).glob("*.py")):
            files += 1
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "memfit":
                    module = importlib.import_module(node.module)
                    missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                                if not hasattr(module, a.name)
                                and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert files >= 5 and not missing, missing
