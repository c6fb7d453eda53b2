"""Files and functions stay small enough to read: no Python file over 350 lines, no function
over 60, anywhere in the project (the package, the roles, tests, benchmarks, simulations)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("fedtune", "server", "client", "tests", "benchmarks", "simulations", "deploy")
MAX_FILE, MAX_FUNCTION = 350, 60


def _sources() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def oversized(path: Path, root: Path = ROOT) -> list[str]:
    """What in ``path`` is over the limits, as 'path:line name (N lines)'."""
    text = path.read_text()
    rel = path.relative_to(root)
    found = [f"{rel} ({text.count(chr(10))} lines)"] if text.count("\n") > MAX_FILE else []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION:
                found.append(f"{rel}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_file_over_350_lines_and_no_function_over_60() -> None:
    sources = _sources()
    assert len(sources) > 200  # the project's files were found
    assert [o for path in sources for o in oversized(path)] == []


def test_the_check_would_catch_both(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    long = tmp_path / "probe.py"
    long.write_text("def f() -> None:\n" + body + "\n" + "\n" * 300)
    assert oversized(long, tmp_path) == ["probe.py (362 lines)", "probe.py:1 f (62 lines)"]
    long.write_text("def f() -> None:\n" + "\n".join(body.splitlines()[:59]) + "\n")  # 60 lines: allowed
    assert oversized(long, tmp_path) == []
