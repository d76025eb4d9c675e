"""Rules of the code's layout that a linter does not check (docs/architecture.md). The import
rules are import-linter contracts in pyproject.toml, run by `python3 tasks.py check`."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.no_services

APP = Path(__file__).resolve().parent.parent / "app"
MAX_LINES = 600

# Modules that still run SQL outside a repository module. The list only shrinks: a module
# that no longer does is an error here until it is taken off, and a new one is refused.
SQL_OUTSIDE_REPOSITORIES_TO_MOVE: set[str] = set()
# Not runtime SQL: the schema (DDL for Alembic and index predicates) and the database plumbing.
SQL_ALLOWED = {"app/core/models.py", "app/core/db.py"}


def modules() -> list[Path]:
    return sorted(APP.rglob("*.py"))


def relative(path: Path) -> str:
    return str(path.relative_to(APP.parent))


def runs_sql(path: Path) -> bool:
    """Calls sqlalchemy's text(...) (how every runtime statement here is written)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name == "text":
                return True
    return False


def is_repository(path: Path) -> bool:
    return path.name in ("repository.py", "queries.py") or path.parent.name == "repositories"


def test_runtime_sql_lives_in_repository_modules():
    offenders = {
        relative(p)
        for p in modules()
        if not is_repository(p) and relative(p) not in SQL_ALLOWED and runs_sql(p)
    }
    assert offenders - SQL_OUTSIDE_REPOSITORIES_TO_MOVE == set(), (
        "runtime SQL belongs in a repository module (docs/architecture.md, 'Where SQL lives')"
    )
    assert SQL_OUTSIDE_REPOSITORIES_TO_MOVE - offenders == set(), (
        "these no longer run SQL: take them off SQL_OUTSIDE_REPOSITORIES_TO_MOVE"
    )


def test_a_long_module_says_why_at_its_top():
    """Over MAX_LINES lines, the module docstring says why it is one module ("Over 600
    lines: ...")."""
    unexplained = []
    for path in modules():
        lines = path.read_text().count("\n")
        if lines <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if f"Over {MAX_LINES} lines" not in doc:
            unexplained.append(f"{relative(path)} ({lines} lines)")
    assert unexplained == []


def test_every_package_is_under_the_import_contracts():
    """A new package under app/ must be placed in pyproject's layers: named in the acyclic
    contract, and either in the domain layer or in the top layer (CLI, app factory,
    simulation), so import-linter checks it like the others."""
    config = tomllib.loads((APP.parent / "pyproject.toml").read_text())["tool"]["importlinter"]
    contracts = {c["type"] + ":" + c["name"]: c for c in config["contracts"]}
    acyclic = next(c for c in contracts.values() if c["type"] == "acyclic_siblings")
    core = next(c for c in contracts.values() if c["source_modules"] == ["app.core"])
    domain = next(c for c in contracts.values() if "app.policy" in c.get("source_modules", []))
    packages = {f"app.{p.parent.name}" for p in APP.glob("*/__init__.py")}
    assert packages - set(acyclic["ancestors"]) == set()
    assert packages - {"app.core"} - set(core["forbidden_modules"]) == set()
    top = set(domain["forbidden_modules"])
    unplaced = packages - {"app.core", "app.embedded"} - set(domain["source_modules"]) - top
    assert unplaced == set(), "place these packages in the domain layer or in the top layer"
