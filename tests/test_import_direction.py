"""Data flows one way: train -> export -> manifests -> serve / push. No module imports a later stage, and the
modules of one stage import each other without circles; the leaf modules holding shared vocabulary import no
stage.

Every ``import``/``from ... import`` in the package is read with ``ast`` (module level and inside functions, where
the heavy imports live), so an import added anywhere is seen without running it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grpoctl

PACKAGE = Path(grpoctl.__file__).parent
# the order of the stages; serve and push both come after manifests and never meet
STAGES = {"train": 1, "export": 2, "manifests": 3, "serve": 4, "push": 4}
# above every stage: what the user calls (command line, the Python API, the doctor's checks)
TOP = {"grpoctl", "grpoctl.__main__", "grpoctl.cli", "grpoctl.api", "grpoctl.doctor"}


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out += [(node.lineno, f"{base}.{a.name}" if base == "grpoctl" else base) for a in node.names]
    return [(line, name) for line, name in out if name == "grpoctl" or name.startswith("grpoctl.")]


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def backward_imports(package: Path = PACKAGE) -> list[str]:
    """Every import that goes against the flow, as ``file:line: a imports b``."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        importer = _module_name(path, package)
        if importer in TOP:
            continue
        mine = _stage(importer)
        for line, imported in _imports(path, package):
            theirs = _stage(imported)
            if theirs is None or theirs == mine:
                continue
            # a shared module (the run and export contracts, file and error helpers) imports no stage at all
            if mine is None or STAGES[theirs] >= STAGES[mine]:
                bad.append(f"{path.relative_to(package.parent)}:{line}: {importer} imports {imported}")
    return list(dict.fromkeys(bad))


def test_no_module_imports_a_later_stage():
    assert backward_imports() == []


def test_the_walk_sees_a_backward_import_inside_a_function(tmp_path):
    pkg = tmp_path / "grpoctl"
    for rel, text in {"__init__.py": "", "rundir.py": "", "export/__init__.py": "", "manifests/__init__.py": "",
                      "export/pipeline.py": "def f():\n    from grpoctl.manifests.api import write_manifests\n",
                      "manifests/api.py": "from grpoctl.export import quantize\nfrom . import modelfile\n",
                      "manifests/modelfile.py": "", "push/__init__.py": "", "serve/__init__.py": "",
                      "serve/source.py": "from grpoctl.push import hub\n", "artifacts.py": "import grpoctl.serve\n",
                      }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    assert backward_imports(pkg) == ["grpoctl/artifacts.py:1: grpoctl.artifacts imports grpoctl.serve",
                     "grpoctl/export/pipeline.py:2: grpoctl.export.pipeline imports grpoctl.manifests.api",
                     "grpoctl/serve/source.py:1: grpoctl.serve.source imports grpoctl.push"]


def root_imports(package: Path = PACKAGE) -> list[str]:
    """Every import of a name from the package root by a module below it, as ``file:line: a imports b``: the root
    re-exports (the version, the API), so reading from it points the flow upwards."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        importer = _module_name(path, package)
        if importer in TOP:
            continue
        for line, imported in _imports(path, package):
            name = imported.removeprefix("grpoctl.")
            if imported == "grpoctl" or ("." not in name and not (package / name).is_dir()
                                         and not (package / f"{name}.py").is_file()):
                bad.append(f"{path.relative_to(package.parent)}:{line}: {importer} imports {imported}")
    return bad


def test_no_module_reads_a_name_from_the_package_root():
    assert root_imports() == []


def test_the_root_import_walk_sees_the_version_read_from_the_root(tmp_path):
    pkg = tmp_path / "grpoctl"
    for rel, text in {"__init__.py": "from grpoctl.version import __version__\n", "version.py": "",
                      "artifacts.py": "from grpoctl import __version__\nfrom grpoctl import version\n",
                      "export/__init__.py": "", "export/pipeline.py": "def f():\n    import grpoctl\n"}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    assert root_imports(pkg) == ["grpoctl/artifacts.py:1: grpoctl.artifacts imports grpoctl.__version__",
                                 "grpoctl/export/pipeline.py:2: grpoctl.export.pipeline imports grpoctl"]


def _type_only(tree: ast.AST) -> set[ast.AST]:
    """The import nodes under ``if TYPE_CHECKING:``: annotations only, never run."""
    guards = [node for node in ast.walk(tree)
              if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"]
    return {n for guard in guards for stmt in guard.body for n in ast.walk(stmt)}


def _module_graph(package: Path, runtime_only: bool = False) -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    """module -> {module it imports: first line}, every import counted (module level and inside functions); a
    ``from grpoctl.train import backends`` is an import of ``grpoctl.train.backends``. ``runtime_only`` leaves
    out the imports under ``if TYPE_CHECKING:``."""
    paths = {_module_name(path, package): path for path in sorted(package.rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for module, path in paths.items():
        package_of = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges: dict[str, int] = {}
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_only(tree) if runtime_only else set()
        for node in ast.walk(tree):
            if node in skipped:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package_of.split(".")[: len(package_of.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
            else:
                continue
            for name in names:
                if name in paths and name != module:
                    edges.setdefault(name, node.lineno)
        graph[module] = edges
    return graph, paths


def import_circles(package: Path = PACKAGE) -> list[str]:
    """Every circle of imports among the modules of one stage (or among the shared modules), as
    ``a -> b -> a`` with the file and line of each import: a circle that only works because one of its imports
    sits inside a function still ties those modules into one. Imports for annotations only (under
    ``if TYPE_CHECKING:``) never run and close no circle."""
    graph, paths = _module_graph(package, runtime_only=True)
    circles: list[str] = []

    def walk(start: str, module: str, trail: list[str]) -> None:
        for imported in graph[module]:
            if _stage(imported) != _stage(start) or imported in TOP:
                continue
            if imported == start:
                cycle = trail + [start]
                steps = [f"{paths[a].relative_to(package.parent)}:{graph[a][b]}"
                         for a, b in zip(cycle, cycle[1:], strict=False)]
                circles.append(f"{' -> '.join(cycle)} ({', '.join(steps)})")
            elif imported not in trail and imported > start:  # each circle found once, from its smallest module
                walk(start, imported, trail + [imported])

    for module in sorted(graph):
        if module not in TOP:
            walk(module, module, [module])
    return circles


def test_no_import_circle_inside_a_stage():
    assert import_circles() == []


def test_a_circle_closed_only_for_annotations_is_none_but_the_same_import_at_run_time_is(tmp_path):
    pkg = tmp_path / "grpoctl"
    files = {"__init__.py": "", "manifests/__init__.py": "", "manifests/api.py": "from . import context\n",
             "manifests/context.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                     "    from grpoctl.manifests.api import Options\n"}
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    assert import_circles(pkg) == []
    (pkg / "manifests/context.py").write_text("from grpoctl.manifests.api import Options\n")
    assert import_circles(pkg) == ["grpoctl.manifests.api -> grpoctl.manifests.context -> grpoctl.manifests.api "
                                   "(grpoctl/manifests/api.py:1, grpoctl/manifests/context.py:1)"]


def test_the_circle_walk_sees_a_circle_closed_inside_a_function(tmp_path):
    pkg = tmp_path / "grpoctl"
    for rel, text in {"__init__.py": "", "rundir.py": "", "train/__init__.py": "",
                      "train/run.py": "from grpoctl.train import backends, distributed\nimport grpoctl.rundir\n",
                      "train/backends.py": "def f():\n    from grpoctl.train.distributed import launch\n",
                      "train/distributed.py": "def launch():\n    from .run import check_output\n",
                      "train/worker.py": "from grpoctl.train.run import train\n",
                      "export/__init__.py": "", "export/a.py": "from grpoctl.train import worker\n",
                      }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    assert import_circles(pkg) == [
        "grpoctl.train.backends -> grpoctl.train.distributed -> grpoctl.train.run -> grpoctl.train.backends "
        "(grpoctl/train/backends.py:2, grpoctl/train/distributed.py:2, grpoctl/train/run.py:1)",
        "grpoctl.train.distributed -> grpoctl.train.run -> grpoctl.train.distributed "
        "(grpoctl/train/distributed.py:2, grpoctl/train/run.py:1)"]
    (pkg / "train/distributed.py").write_text("def launch():\n    from grpoctl.train.resume import check_output\n")
    assert import_circles(pkg) == []


# modules that declare shared vocabulary (names, types, the launch environment) for several stages: each imports
# nothing from grpoctl but what is listed, so any stage can read it without pulling in another's code
LEAVES: dict[str, set[str]] = {
    "grpoctl.version": set(), "grpoctl.threads": set(), "grpoctl.exportlayout": set(),
    "grpoctl.gguftypes": {"grpoctl.errors"}, "grpoctl.errors": set(), "grpoctl.train.launchenv": set(),
}


def leaf_imports(package: Path = PACKAGE, leaves: dict[str, set[str]] = LEAVES) -> list[str]:
    """Every import of a leaf module beyond what it may import, as ``file:line: a imports b``."""
    graph, paths = _module_graph(package)
    return [f"{paths[leaf].relative_to(package.parent)}:{line}: {leaf} imports {imported}"
            for leaf, allowed in leaves.items() for imported, line in graph.get(leaf, {}).items()
            if imported not in allowed]


def test_leaf_modules_import_nothing_from_the_stages():
    assert set(LEAVES) <= set(_module_graph(PACKAGE)[0])  # every leaf named exists
    assert leaf_imports() == []


def test_the_leaf_walk_sees_a_leaf_that_reaches_into_a_stage(tmp_path):
    pkg = tmp_path / "grpoctl"
    for rel, text in {"__init__.py": "", "errors.py": "", "rundir.py": "", "export/__init__.py": "",
                      "export/quantize.py": "", "version.py": "def f():\n    from grpoctl import rundir\n",
                      "gguftypes.py": "from grpoctl.errors import UsageError\nfrom grpoctl.export.quantize import q\n",
                      }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    assert leaf_imports(pkg) == ["grpoctl/version.py:2: grpoctl.version imports grpoctl.rundir",
                                 "grpoctl/gguftypes.py:2: grpoctl.gguftypes imports grpoctl.export.quantize"]
