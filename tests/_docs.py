"""The README and the docs/ pages: which page holds a heading, its code blocks and its tables."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = (README, *sorted((ROOT / "docs").glob("*.md")))


def page_of(heading: str) -> Path:
    """The one page with a line that is ``heading`` (a Markdown heading) or starts with it (other text)."""

    def holds(line: str) -> bool:
        return line == heading if heading.startswith("#") else line.startswith(heading)

    found = [page for page in PAGES if any(holds(line) for line in page.read_text().splitlines())]
    assert len(found) == 1, (heading, [str(p.relative_to(ROOT)) for p in found])
    return found[0]


def name(page: Path) -> str:
    """``docs/guidance.md``: the page's path from the repository root, for messages and ``compile``."""
    return str(page.relative_to(ROOT))


def after(heading: str) -> str:
    """The text of ``heading``'s page from the heading on."""
    text = page_of(heading).read_text()
    return text[text.index(heading) :]


def block(heading: str) -> str:
    """The first Python code block after ``heading``."""
    match = re.search(r"```python\n(.*?)```", after(heading), re.S)
    assert match is not None, heading
    return match.group(1)


def first_cells(page: Path, header: str) -> list[str]:
    """The backquoted names in the first column of every table of ``page`` whose header starts ``header``."""
    names: list[str] = []
    lines = page.read_text().splitlines()
    for start in (i for i, line in enumerate(lines) if line.startswith(header)):
        for line in itertools.takewhile(lambda ln: ln.startswith("|"), lines[start + 2 :]):
            cell = re.match(r"\| (.*?) (?<!\\)\|", line)
            assert cell is not None, line
            names += re.findall(r"`([^`]+)`", cell.group(1))
    assert names, (name(page), header)
    return names


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor on ``page`` (outside code blocks; a repeated one gets GitHub's ``-1``, ...)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6} (.*)", line)):
            base = anchor(m.group(1))
            out.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
    return out
