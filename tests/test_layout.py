"""Imports point down: contracts at the bottom, the app on top. This walks every import in lens/."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

LENS = REPO / "lens"

#: The ground floor: imports nothing of lens except these.
GROUND = {"lens/types.py": set(), "lens/errors.py": set(), "lens/version.py": set(),
          "lens/images.py": {"lens.errors", "lens.types"}}
#: The lower floors (methods, index backends, on-disk builds, bulk embedding, detectors, model folders)...
LOWER = ("lens/methods/", "lens/index/", "lens/store.py", "lens/embedding.py", "lens/detect.py", "lens/trained.py")
#: ...never import these upper floors, nor the package root ``lens`` (which imports everything).
UPPER = ("lens.gallery", "lens.indexing", "lens.search", "lens.train", "lens.training", "lens.cli",
         "lens.service", "lens.evaluate", "lens.evaluation", "lens.report", "lens.datasets")


def lens_imports(path: Path) -> set[str]:
    """Every lens module ``path`` imports (top level or inside functions); ``lens`` for the package root."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "lens"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "lens":
            if node.module == "lens":  # `from lens import x`: a submodule, or a name from the root
                found |= {f"lens.{a.name}" if (LENS / f"{a.name}.py").exists() or (LENS / a.name).is_dir()
                          else "lens" for a in node.names}
            else:
                found.add(node.module)
    return found


def upward_edges() -> list[str]:
    edges = []
    for path in sorted(LENS.rglob("*.py")):
        name = path.relative_to(REPO).as_posix()
        imported = lens_imports(path)
        if name in GROUND:
            edges += [f"{name} -> {m}" for m in sorted(imported - GROUND[name])]
        elif name.startswith(LOWER):
            edges += [f"{name} -> {m}" for m in sorted(imported)
                      if m == "lens" or any(m == up or m.startswith(up + ".") for up in UPPER)]
    return edges


def test_lower_floors_never_import_upward():
    assert upward_edges() == []


def test_the_walk_sees_an_upward_edge(tmp_path):
    """The check itself can fail: an upward import, even inside a function, is found."""
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from lens.gallery import Gallery\n    from lens import __version__\n")
    assert lens_imports(module) == {"lens.gallery", "lens"}


#: lens's modules, lowest floor first (as README's Layout lists them): each imports only earlier ones.
FLOORS = ["types", "errors", "version", "images", "trained", "methods", "index", "store", "embedding", "distributed",
          "detect", "draw", "indexing", "search", "gallery", "training", "evaluation", "service", "samples", "cli",
          "__main__", "__init__"]


def test_every_module_imports_only_lower_floors():
    def floor(module: str) -> str:  # lens.methods.deep -> methods; lens -> __init__
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else "__init__"

    edges = []
    for path in sorted(LENS.rglob("*.py")):
        me = path.relative_to(LENS).parts[0].removesuffix(".py")
        assert me in FLOORS, f"{me} is not placed in FLOORS (and README's Layout)"
        edges += [f"{path.relative_to(REPO)} -> {m}" for m in sorted(lens_imports(path))
                  if floor(m) != me and FLOORS.index(floor(m)) > FLOORS.index(me)]
    assert edges == []
