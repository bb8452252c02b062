"""The import layering of the library, read from the source (no imports executed).

Evaluation and analysis sit beside training, below the experiment module that loads and trains
models, the studies (arms of short runs) above it, and the training command line
(``kalm.train``, run as ``python -m kalm.train``) on top, imported by no module; the run store
only stores. A module importing upwards fails here with its line.
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
    "kalm": ("kalm.train",),  # the command line: `python -m kalm.train` runs it, none imports it
    "kalm.evaluate": ("kalm.experiment", "kalm.trainer", "kalm.execute", "kalm.studies"),
    "kalm.analysis": ("kalm.experiment", "kalm.trainer", "kalm.execute", "kalm.studies"),
    "kalm.runs": (
        "kalm.experiment",
        "kalm.trainer",
        "kalm.models",
        "kalm.evaluate",
        "kalm.encoder",
    ),
    "kalm.trainer": ("kalm.experiment", "kalm.evaluate", "kalm.execute", "kalm.studies"),
    "kalm.experiment": ("kalm.execute", "kalm.studies", "kalm.book_runs"),
    "kalm.published": (
        "kalm.experiment",
        "kalm.trainer",
        "kalm.models",
        "kalm.execute",
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


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
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
