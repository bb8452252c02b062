"""The import layering of the library, read from the source (no imports executed).

Evaluation and analysis sit beside training, below the experiment module that loads and trains
models, the studies (arms of short runs) above it, and the command lines (``kalm.train`` and
``kalm.execute``, run with ``python -m``) on top, imported by no module; the run store only
stores. A module importing upwards fails here with its line, and no chain of imports (lazy ones
included) leads from a module back to itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kalm"
MODULES = sorted(PACKAGE.rglob("*.py"))

# Modules that import no other kalm module (what the machine is; what a weights directory holds).
LEAVES = ("hardware", "weights")

# module (or package prefix) -> kalm modules it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # the command lines: `python -m` runs them, none imports them (so kalm.pages and
    # kalm.book_runs, the book's pages and their runs, sit below `python -m kalm.execute`)
    "kalm": ("kalm.train", "kalm.execute"),
    "kalm.evaluate": ("kalm.experiment", "kalm.trainer", "kalm.pages", "kalm.studies"),
    "kalm.analysis": ("kalm.experiment", "kalm.trainer", "kalm.pages", "kalm.studies"),
    "kalm.runs": (
        "kalm.experiment",
        "kalm.trainer",
        "kalm.models",
        "kalm.evaluate",
        "kalm.encoder",
    ),
    "kalm.trainer": ("kalm.experiment", "kalm.evaluate", "kalm.pages", "kalm.studies"),
    "kalm.experiment": ("kalm.pages", "kalm.studies", "kalm.book_runs"),
    "kalm.published": (
        "kalm.experiment",
        "kalm.trainer",
        "kalm.models",
        "kalm.pages",
        "kalm.studies",
        "kalm.book_runs",
    ),
    "kalm.data": ("kalm.models", "kalm.views", "kalm.trainer", "kalm.evaluate", "kalm.experiment"),
    # kalm.config reads the two leaf modules below and no other kalm module
    "kalm.config": tuple(
        sorted(
            f"kalm.{p.stem}"
            for p in PACKAGE.iterdir()
            if (p.suffix == ".py" or (p / "__init__.py").is_file())
            and p.stem not in ("__init__", "config", *LEAVES)
        )
    ),
    **dict.fromkeys((f"kalm.{leaf}" for leaf in LEAVES), ("kalm.",)),
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def kalm_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ``kalm`` import in the file, at any depth (lazy ones too)."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("kalm")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kalm"):
            found += [(node.lineno, node.module)]
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_no_module_imports_upwards(path: Path) -> None:
    name = module_name(path)
    rules = [
        bad for prefix, bad in FORBIDDEN.items() if name == prefix or name.startswith(prefix + ".")
    ]
    offending = [
        f"{path.name}:{line} imports {target}"
        for line, target in kalm_imports(path)
        for bad in (b for r in rules for b in r)
        if target == bad or target.startswith(bad if bad.endswith(".") else bad + ".")
    ]
    assert not offending, f"{name} imports a module above it: {offending}"


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from kalm.experiment import train_or_load\n")
    assert (2, "kalm.experiment") in kalm_imports(source)


def test_the_checker_refuses_an_import_of_the_command_line(tmp_path: Path) -> None:
    """Even under ``if __name__ == "__main__":`` (the way the old cycle came back)."""
    source = tmp_path / "m.py"
    source.write_text("if __name__ == '__main__':\n    from kalm import train\n")
    assert (2, "kalm.train") in kalm_imports(source)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the modules of ``package`` it imports (at module level or in a function)."""
    names = {module_name(path, package): path for path in sorted(package.rglob("*.py"))}
    return {
        name: {target for _, target in kalm_imports(path) if target in names and target != name}
        for name, path in names.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A chain of imports that returns to its first module (``[a, b, a]``), or None."""
    done: set[str] = set()

    def visit(name: str, chain: list[str]) -> list[str] | None:
        if name in chain:
            return [*chain[chain.index(name) :], name]
        if name in done:
            return None
        for target in sorted(graph[name]):
            cycle = visit(target, [*chain, name])
            if cycle:
                return cycle
        done.add(name)
        return None

    return next((c for c in (visit(name, []) for name in sorted(graph)) if c), None)


def test_no_import_cycle() -> None:
    """A cycle works only while its lazy import stays lazy, and the layering above then has no
    top: the module that depends on the other must be the one that imports it."""
    cycle = find_cycle(import_graph())
    assert cycle is None, (
        f"import cycle {' -> '.join(cycle or [])}: move what the lower module needs out of the "
        "upper one"
    )


def test_the_checker_finds_a_cycle_through_a_lazy_import(tmp_path: Path) -> None:
    package = tmp_path / "kalm"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("from kalm.high import main\n")
    (package / "high.py").write_text("def main():\n    from kalm import low\n")
    (package / "side.py").write_text("from kalm import low\n")
    assert find_cycle(import_graph(package)) == ["kalm.high", "kalm.low", "kalm.high"]
    (package / "high.py").write_text("def main():\n    pass\n")
    assert find_cycle(import_graph(package)) is None
