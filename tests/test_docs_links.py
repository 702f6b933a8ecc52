"""The README and docs/ hold together: every relative link resolves to a file and, with an anchor,
to a heading of that file; every docs page a source file, a config or the Makefile names exists;
the guides never speak of the project's own work history; the README stays a front door."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
DOCS_PATH = re.compile(r"docs/[\w.-]+\.md")
FENCE = re.compile(r"^(```|~~~)")


def prose_lines(text: str):
    """The lines of a markdown page outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor GitHub gives the page's headings (repeated headings get -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set(re.findall(r'<a id="([^"]+)"></a>', page.read_text()))
    for line in prose_lines(page.read_text()):
        m = re.match(r"^#{1,6} (.+?)\s*#*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(page: Path) -> list[str]:
    """The relative links of a page whose file or heading does not exist."""
    broken = []
    for line in prose_lines(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{target} (no such heading)")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    assert broken_links(page) == []


def test_a_link_to_a_missing_heading_is_caught(tmp_path):
    page = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# Title\n\n## Causal tracing (`kuda trace`)\n")
    page.write_text("[ok](b.md#causal-tracing-kuda-trace) [bad](b.md#nope) [gone](c.md)\n")
    assert broken_links(page) == ["b.md#nope (no such heading)", "c.md (no such file)"]


def named_docs_pages() -> list[tuple[str, str]]:
    """(file, page) for each docs/*.md named in the pages, sources, configs and Makefile."""
    files = [*PAGES, ROOT / "Makefile", *ROOT.glob("src/**/*.py"), *ROOT.glob("conf/**/*.yaml")]
    files += [*ROOT.glob("scripts/*.py"), *ROOT.glob("tests/*.py")]
    named = []
    for f in files:
        for name in DOCS_PATH.findall(f.read_text()):
            named.append((str(f.relative_to(ROOT)), name))
    return named


def test_every_docs_page_named_anywhere_exists():
    missing = [(f, n) for f, n in named_docs_pages() if not (ROOT / n).exists()]
    assert missing == []


def test_no_guide_speaks_of_issue_numbers():
    pattern = re.compile(r"issue #?[0-9]", re.IGNORECASE)
    hits = [f"{p.name}: {line.strip()}" for p in PAGES for line in p.read_text().splitlines()]
    assert [h for h in hits if pattern.search(h)] == []


def test_readme_is_a_front_door_of_at_most_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
