"""The README and docs/: every relative link and image points at a file of the repository, and
the README stays a front door."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
         ROOT / "benchmarks" / "results" / "history.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _targets(page: Path) -> list[str]:
    text = re.sub(r"```.*?```|`[^`\n]*`", "", page.read_text(), flags=re.S)  # code is not a link
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]  # http:, mailto: ...


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    missing = []
    for target in _targets(page):
        path = target.split("#")[0]
        resolved = (page.parent / path).resolve()
        assert resolved.is_relative_to(ROOT), f"{page.name} links outside the repository: {target}"
        if path and not resolved.exists():
            missing.append(target)
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_the_link_check_sees_a_missing_file(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](there.md) ![b](plot.png) [c](https://example.com) `[d](code.md)`\n")
    (tmp_path / "there.md").write_text("")
    assert [t for t in _targets(page) if not (tmp_path / t).exists()] == ["plot.png"]


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines: move detail to docs/"
