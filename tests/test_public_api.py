"""The curated public surface of the client package stays what it says."""

from __future__ import annotations

import ast
from pathlib import Path

import orchestrator.northbound as northbound
import orchestrator.simulator as simulator


def test_northbound_exports_are_pinned() -> None:
    """`orchestrator.northbound.__all__` lists exactly the client's public names, sorted."""
    assert northbound.__all__ == sorted(northbound.__all__)
    assert set(northbound.__all__) == {
        "ClientConfig",
        "CreateTaskRequest",
        "DeviceGroup",
        "ExecuteType",
        "NorthboundClient",
        "OperationType",
        "Pacer",
        "Package",
        "Page",
        "Policy",
        "Priority",
        "StaResult",
        "Status",
        "SubOperation",
        "TLSConfig",
        "Targets",
        "Task",
        "shared_pacer",
    }


def test_simulator_exports_resolve() -> None:
    """Every name the simulator package exports exists."""
    assert all(hasattr(simulator, name) for name in simulator.__all__)


def test_cli_choices_match_what_they_name() -> None:
    """The CLI's choices, spelled out so `--help` imports nothing, are the engine's values."""
    from orchestrator.census import UnknownTasks
    from orchestrator.cli import HTML_LIST_LIMIT, REPORT_FORMATS, UNKNOWN_TASKS_CHOICES
    from orchestrator.report import WRITERS
    from orchestrator.report_model import DEFAULT_LISTED

    assert set(UNKNOWN_TASKS_CHOICES) == {u.value for u in UnknownTasks}
    assert set(REPORT_FORMATS) == set(WRITERS)
    assert HTML_LIST_LIMIT == DEFAULT_LISTED


def test_cli_names_of_other_modules_match() -> None:
    """The retry choices and the state directory's variable, spelled out in the CLI so
    `--help` imports nothing, are those of passes.py and hoststate.py."""
    from orchestrator.cli import RETRY_CHOICE_NAMES, STATE_ENV_VAR
    from orchestrator.northbound.hoststate import ENV_VAR
    from orchestrator.passes import RETRY_CHOICES

    assert list(RETRY_CHOICE_NAMES) == list(RETRY_CHOICES)
    assert STATE_ENV_VAR == ENV_VAR


def test_report_modules_form_no_import_circle() -> None:
    """report.py draws on report_html.py and report_model.py, which never import report.py
    (not even for type checking): the report's data flows one way."""
    root = Path(__file__).parent.parent / "orchestrator"
    for name in ("report_html.py", "report_model.py"):
        imported = {
            node.module
            for node in ast.walk(ast.parse((root / name).read_text()))
            if isinstance(node, ast.ImportFrom) and node.level == 1
        }
        assert "report" not in imported, f"{name} imports report.py"
        if name == "report_model.py":
            assert not imported, f"report_model.py imports {imported}"


def _package_imports(root: Path) -> dict[str, set[str]]:
    """module → the package's modules it imports (type-checking imports too), by reading the
    source: `from .x import y`, `from . import x`, `from ..x import y`, `import orchestrator.x`."""

    def name_of(path: Path) -> str:
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name_of(path): path for path in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found |= {target, *(f"{target}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = {module for module in found if module in modules and module != name}
    return graph


def test_the_package_has_no_import_circle() -> None:
    """No module of orchestrator/ reaches itself through its imports (type-checking ones
    included): data flows one way, plan → planner → journal → … → report."""
    graph = _package_imports(Path(__file__).parent.parent / "orchestrator")
    circles = []
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module == start:
                circles.append(start)
                break
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
    assert circles == []
