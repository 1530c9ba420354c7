"""The layering of DESIGN.md holds: the spine (polm) imports no stage package, stage packages
import the spine and never each other, and no module imports itself back through others."""

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

STAGE_PACKAGES = ("align", "merge", "optimize", "serve")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in ("polm", *STAGE_PACKAGES):
        for f in (REPO / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            mods[name] = f
    return mods


def _imports(path: Path) -> set[str]:
    """Every module name an import statement in ``path`` names, lazy imports included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_the_spine_names_no_stage_package():
    offenders = [
        f"{name} imports {imp}"
        for name, path in _modules().items()
        if name.split(".")[0] == "polm"
        for imp in _imports(path)
        if imp.split(".")[0] in STAGE_PACKAGES
    ]
    assert offenders == []  # the registry's "module:function" strings are the only way in


def test_stage_packages_do_not_import_each_other():
    offenders = [
        f"{name} imports {imp}"
        for name, path in _modules().items()
        if (own := name.split(".")[0]) in STAGE_PACKAGES
        for imp in _imports(path)
        if imp.split(".")[0] in STAGE_PACKAGES and imp.split(".")[0] != own
    ]
    assert offenders == []


def test_no_import_cycles():
    mods = _modules()
    graph = {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}
    cycles, done = [], set()

    def visit(node, path):
        if node in path:
            cycles.append(path[path.index(node) :] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        done.add(node)

    for m in sorted(graph):
        visit(m, [])
    assert cycles == []


def test_importing_the_runner_and_cli_loads_no_stage_package():
    code = (
        "import sys, pkgutil, importlib, polm\n"
        "for m in pkgutil.walk_packages(polm.__path__, 'polm.'):\n"
        "    if m.name != 'polm.builtin.pretrain': importlib.import_module(m.name)\n"
        "from polm.cli import build_parser\n"
        "build_parser()\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {STAGE_PACKAGES!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
