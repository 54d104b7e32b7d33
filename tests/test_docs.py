"""README.md and docs/: relative links and #anchors resolve, the README stays short and links every docs file."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(path: str) -> str:
    """The Markdown text without fenced code blocks (a `# comment` there is no heading) or inline code."""
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"^```.*?^```", "", f.read(), flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped (not - or _), spaces to hyphens, -N for repeats."""
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"^```.*?^```", "", f.read(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def links(path: str) -> list[str]:
    return [t for t in LINK.findall(prose(path)) if not re.match(r"[a-z]+:", t)]  # relative only


def broken_links(page: str) -> list[str]:
    """The relative links of `page` whose file or heading does not exist."""
    bad = []
    for target in links(page):
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
        if not os.path.exists(dest) or (anchor and (not dest.endswith(".md") or anchor not in set(anchors(dest)))):
            bad.append(target)
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_and_anchors_resolve(page):
    assert links(page) and broken_links(page) == []


def test_readme_is_short_and_links_every_docs_file():
    with open(PAGES[0], encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 200
    linked = {os.path.normpath(os.path.join(ROOT, t.partition("#")[0])) for t in links(PAGES[0])}
    assert PAGES[1:] and set(PAGES[1:]) <= linked, set(PAGES[1:]) - linked


def test_the_checker_finds_a_broken_link_and_anchor(tmp_path):
    page = tmp_path / "a.md"
    (tmp_path / "c.md").write_text("# C\n")
    text = "# Top `x`\n\n## Main flags (`--help`)\n\n```\n# not a heading\n[n](code.md)\n```\n"
    page.write_text(text + "[b](b.md) [y](#nope) [z](#main-flags---help) [c](c.md#c) [d](c.md#d) [w](https://x.org)\n")
    assert list(anchors(str(page))) == ["top-x", "main-flags---help"]
    assert broken_links(str(page)) == ["b.md", "#nope", "c.md#d"]
