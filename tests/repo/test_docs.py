"""The README as a front door: short, its second shell runnable as written, every page it
leads to one click away, and no link in the documentation pointing nowhere."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from localcloud.devstack import DEFAULT_ENV_FILE

from worker.cli import cli

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text("utf-8")
PAGES = [
    REPO / "README.md",
    REPO / "BENCHMARKS.md",
    REPO / "localcloud" / "README.md",
    *sorted((REPO / "docs").rglob("*.md")),
]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.M | re.S)


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", markdown), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(FENCE.sub("", page.read_text("utf-8"))) if "://" not in t]


def test_the_readme_and_benchmarks_stay_short() -> None:
    assert len(README.encode()) <= 8_500, "README.md is the front door: move detail to a page under docs/"
    benchmarks = (REPO / "BENCHMARKS.md").read_bytes()
    assert len(benchmarks) <= 12_000, (
        "BENCHMARKS.md holds the current figures: dated rounds go to docs/bench/"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_leads_to_a_file_and_heading_that_exist(page: Path) -> None:
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (file.suffix == ".md" and anchor and anchor not in anchors(file.read_text())):
            broken.append(target)
    assert broken == [], f"{page.relative_to(REPO)}: links to nothing: {broken}"


def test_every_page_is_one_click_from_the_readme() -> None:
    linked = {(REPO / t.partition("#")[0]).resolve() for t in links(REPO / "README.md")}
    pages = {p.resolve() for p in PAGES if p.name != "README.md" or p.parent != REPO}
    assert sorted(str(p.relative_to(REPO)) for p in pages - linked) == []


def test_the_second_shell_is_one_block_that_runs_as_written() -> None:
    section = README.split("## Second shell", 1)[1].split("\n## ", 1)[0]
    (block,) = FENCE.findall(section)
    lines = [shlex.split(line, comments=True) for line in block.splitlines()]
    assert lines[0] == ["source", DEFAULT_ENV_FILE], "the file `worker dev` writes"
    assert cli.commands["dev"].params[-1].default == DEFAULT_ENV_FILE
    verbs = [words[1] for words in lines if words and words[0] == ".venv/bin/worker"]
    assert "enqueue" in verbs and set(verbs) <= set(cli.commands)
    assert ["make", "webapp"] in lines


def test_the_readme_names_both_commands_and_the_fast_tests() -> None:
    for command in ("make dev", "make test", "make test-fast"):
        assert f"{command}" in README
    makefile = (REPO / "Makefile").read_text()
    assert all(f"\n{target}:" in makefile for target in ("dev", "test", "test-fast", "webapp"))
