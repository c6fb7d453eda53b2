"""The README and docs/: every relative link resolves (file and heading), and the README fits a screen."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "deploy" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no headings inside code
    return {slug(m.group(1)) for m in re.finditer(r"(?m)^#{1,6} (.+)$", text)}


def broken_links(page: Path) -> list[str]:
    bad = []
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            bad.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            bad.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_a_broken_link_is_caught(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n## A heading\n")
    page.write_text("[ok](other.md#a-heading) [gone](missing.md) [nohead](other.md#nope) [web](https://x.org)\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert broken_links(page) == [
            "page.md: missing.md (no such file)",
            "page.md: other.md#nope (no such heading)",
        ]
    finally:
        ROOT = saved


def test_the_readme_fits_a_screen_and_maps_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.count("\n") <= 150
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"the README does not link docs/{page.name}"


def readme_commands() -> list[str]:
    """Every `fedtune ...` command the README shows, in code blocks and inline code."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```.*?```", text, flags=re.S)
    lines = [line.strip() for block in blocks for line in block.strip("`").splitlines()]
    # inline code: the spans written as commands (with options), not mentions like `fedtune server start`
    inline = [c for c in re.findall(r"`(fedtune [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S)) if " --" in c]
    return [c for c in lines + inline if c.startswith("fedtune ") and "[" not in c and "..." not in c]


def test_every_fedtune_command_in_the_readme_parses_and_its_files_exist() -> None:
    """The README's commands as written: each parses with the real CLI, and each repository file
    it names (a simulations/ config) exists; a renamed option or config breaks this test."""
    import shlex

    from fedtune.cli import build_parser

    commands = readme_commands()
    assert any(c.startswith("fedtune simulate simulations/dp_realistic.toml") for c in commands)
    assert any(c.startswith("fedtune client privacy-audit") for c in commands)
    parser = build_parser()
    for command in commands:
        argv = shlex.split(command)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit as err:
            raise AssertionError(f"README command does not parse: {command}") from err
        for arg in argv:
            if arg.startswith("simulations/"):
                assert (ROOT / arg).is_file(), f"README command names a missing file: {command}"
