"""The README and docs/ stay true: blocks made from code are what the code renders now (run `make docs` after
changing a key), the README stays short, and every relative link points at a file and heading that exist."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from devtools import readme
from distrnn.config.schema import key_fields
from tests.helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250


def test_the_config_table_is_the_help_text_in_config_py():
    page = (REPO / "docs" / "configuration.md").read_text()
    assert readme.config_block() in page, "the config table in docs/configuration.md is stale: make docs"


def test_every_key_is_in_the_table_once_with_its_default():
    table = readme.config_block()
    for name, f in key_fields().items():
        [row] = [line for line in table.splitlines() if line.startswith(f"| `{name}` |")]
        if f.default is not dataclasses.MISSING and f.default is not None and not isinstance(f.default, bool):
            assert f"`{f.default}`" in row, row


def test_the_readme_is_short():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to a page in docs/"


def prose(text: str) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks (a `# comment` in a bash block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, spaces to '-', punctuation dropped except '-' and '_'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(line.lstrip("#")) for line in prose(path.read_text()) if re.match(r"#{1,6} ", line)}


def relative_links(path: Path) -> list[str]:
    links = []
    for line in prose(path.read_text()):
        line = re.sub(r"(?<!\[)`[^`]*`(?!\])", "", line)  # inline code (a link's text may hold code)
        links += [t for t in re.findall(r"\]\(([^)\s]+)\)", line) if not re.match(r"[a-z]+:", t)]
    return links


def test_the_anchor_rule_is_githubs():
    assert anchor("Errors: what you see when") == "errors-what-you-see-when"
    assert anchor("Through `accelerate launch`") == "through-accelerate-launch"
    assert anchor("What each engine's path guarantees") == "what-each-engines-path-guarantees"
    assert anchor("Weights & Biases") == "weights--biases"


def test_every_relative_link_points_at_a_file_and_heading_that_exist():
    broken = []
    for page in PAGES:
        links = relative_links(page)
        assert page.name != "README.md" or links, "no links found: the link pattern is wrong"
        for link in links:
            target, _, fragment = link.partition("#")
            file = (page.parent / target).resolve() if target else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: {link} (no such file)")
            elif fragment and file.suffix == ".md" and fragment not in anchors(file):
                broken.append(f"{page.relative_to(REPO)}: {link} (no heading #{fragment})")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / link.partition("#")[0]).resolve() for link in relative_links(REPO / "README.md")}
    assert not [p.name for p in PAGES[1:] if p.resolve() not in linked]


def test_every_distrnn_variable_is_in_the_environment_table():
    """docs/contributing.md's table lists every DISTRNN_* variable the code, scripts and tests name, and no other."""
    folders = ("distrnn", "tests", "slurm", "sweeps", "benchmarks", "devtools", ".ci")
    files = [p for folder in folders for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix != ".pyc"]
    named = {v for p in [*files, REPO / "Makefile"]
             for v in re.findall(r"DISTRNN_[A-Z_]+", p.read_text(errors="replace"))}
    page = (REPO / "docs" / "contributing.md").read_text()
    table = set(re.findall(r"^\| `(DISTRNN_[A-Z_]+)` \|", page, re.M))
    assert named == table, f"not in the table: {sorted(named - table)}; in the table only: {sorted(table - named)}"

