"""The package's shape, guarded (issue 22): no import cycle (module level or inside
functions), no module taking another's ``_names``, nothing below the CLI importing the
package root, no code deciding by the text of a reason, the step checked in one module."""

import ast
import inspect
import re
from pathlib import Path

import nofc

SRC = Path(nofc.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    mods = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _imports(name: str, path: Path, mods: dict) -> list[tuple[str, list[str]]]:
    """(module imported, names taken) for every import of the package's own modules."""
    out = []
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "nofc":
                continue
            names = [a.name for a in node.names]
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
            out.append((target, [n for n in names if f"{target}.{n}" not in mods]))
            out += [(s, []) for s in subs]
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "nofc"]
    return out


def test_the_import_graph_has_no_cycle():
    mods = _modules()
    edges = {name: {t for t, _ in _imports(name, p, mods) if t in mods and t != name}
             for name, p in mods.items()}
    # a package's __init__ re-exports its modules: an edge down, not a dependency up
    state: dict[str, int] = {}

    def visit(n, path):
        state[n] = 1
        for t in sorted(edges[n]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if not state.get(t):
                visit(t, path + [t])
        state[n] = 2

    for name in sorted(mods):
        if not state.get(name):
            visit(name, [name])


def test_no_module_takes_another_modules_private_names():
    mods = _modules()
    taken = [f"{name} takes {target}.{n}" for name, p in mods.items()
             for target, names in _imports(name, p, mods) for n in names
             if n.startswith("_") and not n.startswith("__") and target != name]
    assert taken == []


def test_nothing_below_the_cli_imports_the_package_root():
    mods = _modules()
    below = [name for name, p in mods.items() if name not in ("nofc", "nofc.cli")
             and any(t == "nofc" for t, _ in _imports(name, p, mods))]
    assert below == []


def test_no_code_decides_by_the_text_of_a_reason():
    hits = [f"{p.name}:{i}" for p in SRC.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"""["'][^"']*global context[^"']*["']\s+in\s""", line)]
    assert hits == []


def test_the_step_is_parsed_and_checked_in_one_module():
    """``parse_step`` and ``Geometry.check_step`` are the only places that read a step."""
    defs = [f"{p.relative_to(SRC)}:{node.name}" for p in SRC.rglob("*.py")
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.FunctionDef) and re.fullmatch(r"_?(parse|check)_step",
                                                                  node.name)]
    assert sorted(defs) == ["windows.py:check_step", "windows.py:parse_step"]


def test_dense_and_tiled_predict_take_at_most_18_parameters():
    """Options travel with the object they configure: reading options with the image
    (``nofc.open_source``), normalisation in ``nofc.Normalize``, the cluster in
    ``nofc.Dask``, an output's metadata with the output. (18: ``precision`` and ``engine``,
    issue 26, asked for by name.)"""
    for f in (nofc.dense_predict, nofc.tiled_predict):
        assert len(inspect.signature(f).parameters) <= 18, f.__name__
