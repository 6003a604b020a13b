"""The documents stay navigable: every relative link resolves, and code cites the project's own pages.

Checked: every relative link in README.md, BENCHMARKS.md and docs/*.md points to an existing file,
and a ``#fragment`` into a Markdown file names one of its headings (GitHub's anchor rule); every
``docs/design.md#<anchor>`` cited in src/, tests/, bench/ or scripts/ exists; nothing under src/ or
tests/ cites the old design notes, which are not part of the repository; the generated reference
tables are current.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")])
# Pages another piece of work is writing (the toy regime): links to them are checked once they exist.
OLD_DESIGN_NOTES = "DESIGN" + ".md"  # spelt in two parts so that this file does not cite it itself

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~)")
_CODE_SPAN = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and code spans (links there are not links)."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(_CODE_SPAN.sub("", line))
    return "\n".join(out)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -N for repeats."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    fenced = False
    for line in page.read_text().splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m[1].replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list[str]:
    return _LINK.findall(_prose(page.read_text()))


def test_pages_exist() -> None:
    for name in ("design", "recipes", "training", "graft-and-merge", "output-format", "history"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path_part, _, fragment = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            bad.append(f"{target}: {dest.name} has no heading with anchor #{fragment}")
    assert not bad, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(bad)


def test_code_cites_existing_design_sections() -> None:
    known = anchors(ROOT / "docs" / "design.md")
    bad = []
    for top in ("src", "tests", "bench", "scripts"):
        for f in sorted((ROOT / top).rglob("*")):
            if not f.is_file() or f.suffix not in (".py", ".sh", ".md", ".yaml", ".json"):
                continue
            for anchor in re.findall(r"docs/design\.md#([\w-]+)", f.read_text(errors="replace")):
                if anchor not in known:
                    bad.append(f"{f.relative_to(ROOT)}: docs/design.md#{anchor}")
    assert not bad, "citations of missing docs/design.md sections:\n" + "\n".join(bad)


def test_no_citation_of_the_old_design_notes() -> None:
    bad = []
    for top in ("src", "tests"):
        for f in sorted((ROOT / top).rglob("*")):
            if f.is_file() and f.suffix not in (".pyc",) and OLD_DESIGN_NOTES in f.read_text(errors="replace"):
                bad.append(str(f.relative_to(ROOT)))
    assert not bad, f"cite docs/design.md instead of {OLD_DESIGN_NOTES}: " + ", ".join(bad)


def test_generated_tables_are_current() -> None:
    """docs/recipes.md's field table is generated from the recipe schema (scripts/docs_tables.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "scripts" / "docs_tables.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for (page, name), make in mod.TABLES.items():
        text = (ROOT / page).read_text()
        assert mod.render(text, name, make()) == text, f"{page} ({name}) is out of date: run python scripts/docs_tables.py"


def test_anchor_rule() -> None:
    page = ROOT / "docs" / "design.md"
    got = anchors(page)
    assert {"step-1-upcycle", "graft-rules", "the-toy-world-as-a-measuring-stick"} <= got
