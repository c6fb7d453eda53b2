"""The import graph keeps its layers: the core never imports a role or the CLI, the roles never
import each other, and the low core packages never import the experiments built on them.

Every import counts, also those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"fedtune": "fedtune", "server": "fedtune.server", "client": "fedtune.client"}
LOW = ("fedtune.lora", "fedtune.privacy", "fedtune.security", "fedtune.data")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    base = FOLDERS[rel.parts[0]]
    parts = [p for p in rel.with_suffix("").parts[1:] if p != "__init__"]
    return ".".join([base, *parts])


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {name for name in found if name.startswith("fedtune")}


def layer(module: str) -> str:
    if module == "fedtune.__main__":  # `python -m fedtune`: the entry point, above everything
        return "cli"
    for prefix, name in (("fedtune.cli", "cli"), ("fedtune.server", "server"), ("fedtune.client", "client")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "core"


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(sources: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(sources.items()):
        mine = layer(module)
        for target in sorted(targets):
            theirs = layer(target)
            if mine == "core" and theirs != "core":
                bad.append(f"{module} (core) imports {target} ({theirs})")
            elif mine in ("server", "client") and theirs not in ("core", mine):
                bad.append(f"{module} ({mine}) imports {target} ({theirs})")
            elif any(under(module, p) for p in LOW) and under(target, "fedtune.experiments"):
                bad.append(f"{module} imports {target} (experiments build on it, not it on them)")
    return bad


def sources() -> dict[str, set[str]]:
    files = [p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")]
    return {module_name(p): imports(p) for p in files}


def test_the_layers_hold() -> None:
    assert violations(sources()) == []


@pytest.mark.parametrize(
    ("module", "target", "broken"),
    [
        ("fedtune.wire", "fedtune.server.strategy", True),  # core -> role
        ("fedtune.server.federation", "fedtune.client.site", True),  # role -> role
        ("fedtune.client.daemon", "fedtune.cli.loopback", True),  # role -> CLI
        ("fedtune.lora.merge", "fedtune.experiments.report", True),  # low core -> experiments
        ("fedtune.server.strategy", "fedtune.lora.merge", False),
        ("fedtune.cli.loopback", "fedtune.server.runs", False),
    ],
)
def test_a_violation_would_be_caught(module: str, target: str, broken: bool) -> None:
    assert bool(violations({module: {target}})) is broken
