"""Every public function, class and method of lens has a docstring (issue #14).

Public: defined at a module's top level (or in a public class's body) with a name that does not start
with ``_``. The docstrings are where shapes, dtypes, units, errors raised and sources are written.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

LENS = REPO / "lens"
#: files exempt from the check (none: the command line's docstrings landed with its many-photo search)
EXCLUDED: set[str] = set()


def missing_docstrings(path: Path) -> list[str]:
    """``module``, ``function``, ``Class`` and ``Class.method`` names of ``path`` that are public and
    have no docstring of their own (an inherited one does not count: an override says what it does)."""
    tree = ast.parse(path.read_text(), str(path))
    missing = [] if ast.get_docstring(tree) else ["<module>"]
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for node in tree.body:
        if not isinstance(node, defs) or node.name.startswith("_"):
            continue
        if not ast.get_docstring(node):
            missing.append(node.name)
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                setter = isinstance(member, defs[:2]) and any(
                    isinstance(d, ast.Attribute) and d.attr in ("setter", "deleter") for d in member.decorator_list)
                if isinstance(member, defs[:2]) and not member.name.startswith("_") and not setter \
                        and not ast.get_docstring(member):
                    missing.append(f"{node.name}.{member.name}")
    return missing


def test_every_public_name_in_lens_has_a_docstring():
    missing = [f"{path.relative_to(REPO).as_posix()}: {name}"
               for path in sorted(LENS.rglob("*.py")) if path.relative_to(REPO).as_posix() not in EXCLUDED
               for name in missing_docstrings(path)]
    assert missing == []


def test_the_check_finds_what_is_undocumented(tmp_path):
    module = tmp_path / "sample.py"
    module.write_text(
        "def public():\n    pass\n\n"
        "def _private():\n    pass\n\n"
        "class Thing:\n    '''Documented.'''\n\n"
        "    def method(self):\n        pass\n\n"
        "    def _helper(self):\n        pass\n\n"
        "    @property\n    def size(self):\n        '''Bytes.'''\n\n"
        "    @size.setter\n    def size(self, value):\n        pass\n\n"
        "class _Hidden:\n    def method(self):\n        pass\n"
    )
    assert missing_docstrings(module) == ["<module>", "public", "Thing.method"]
