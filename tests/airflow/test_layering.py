"""The Airflow layer's structure: no import cycles among its modules, version-dependent Airflow imports only
in ``compat``, and a trigger that serializes under its own class path."""

from __future__ import annotations

import ast
from pathlib import Path


import synthfactory.airflow

AIRFLOW_PKG = Path(synthfactory.airflow.__file__).resolve().parent


def test_no_import_cycles_among_airflow_modules():
    import grimp  # pinned in requirements.txt

    graph = grimp.build_graph("synthfactory")  # module-level and in-function imports alike
    modules = {m for m in graph.modules if m.startswith("synthfactory.airflow.")}
    edges = {m: graph.find_modules_directly_imported_by(m) & modules for m in modules}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path[path.index(n):], n])
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])


def test_core_airflow_names_come_from_compat():
    """Outside compat, only provider packages (and the API server's security, on first request) are imported
    from Airflow directly."""
    allowed = ("airflow.providers.", "airflow.api_fastapi.")
    for path in AIRFLOW_PKG.glob("*.py"):
        if path.name == "compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name == "airflow" or name.startswith("airflow."):
                    assert name.startswith(allowed), f"{path.name} imports {name}: import it from compat"


def test_trigger_serializes_under_its_own_class_path():
    from synthfactory.airflow.triggers import BulkExportTrigger

    class Custom(BulkExportTrigger):
        pass

    assert BulkExportTrigger("https://x/status").serialize()[0] == "synthfactory.airflow.triggers.BulkExportTrigger"
    assert Custom("https://x/status").serialize()[0] == f"{__name__}.{Custom.__qualname__}"
