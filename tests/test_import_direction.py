"""Data flows one way: train -> export -> manifests -> serve / push. No module imports a later stage.

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
