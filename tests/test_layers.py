"""Imports run one way: every import of a bov module, including one inside a function, goes to a module of the
same floor or a lower one of bov.LAYERS, and no floor holds a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import bov

PACKAGE = Path(bov.__file__).parent


def imports(path: Path) -> set[str]:
    """The bov modules a file imports, wherever the import statement sits."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "bov":
            found |= {a.name for a in node.names if (PACKAGE / f"{a.name}.py").is_file()}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bov."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bov.")}
    return found - {path.stem}


def test_every_module_has_a_floor_once():
    named = [m for floor in bov.LAYERS for m in floor]
    assert len(named) == len(set(named))
    assert set(named) == {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def test_no_import_reaches_a_higher_floor():
    floor = {m: i for i, names in enumerate(bov.LAYERS) for m in names}
    upward = [f"{m} (floor {floor[m]}) imports {dep} (floor {floor[dep]})" for m in floor
              for dep in sorted(imports(PACKAGE / f"{m}.py")) if floor[dep] > floor[m]]
    assert not upward, "\n".join(upward)


def test_no_floor_holds_a_circle():
    graph = {m: imports(PACKAGE / f"{m}.py") for names in bov.LAYERS for m in names}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])

    circles = [m for m in graph if reaches(m, m, {m})]
    assert not circles, f"modules on an import circle: {circles}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "late.py"
    f.write_text("def f():\n    from bov.analysis import load_study\n    import bov.sweep\n    from bov import tracking\n")
    assert imports(f) == {"analysis", "sweep", "tracking"}
