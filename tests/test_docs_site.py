"""The documentation site builds with `mkdocs build --strict`: every page is in the navigation,
and every link and anchor resolves. The site is built into a temporary folder, never the repo."""

import subprocess
import sys
from pathlib import Path

import yaml

from tests.engine import REPO


def nav_pages(nav: list) -> list[str]:
    pages = []
    for entry in nav:
        for value in entry.values() if isinstance(entry, dict) else [entry]:
            pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_site_builds_in_strict_mode(tmp_path):
    site = tmp_path / "site"
    before = sorted(p.name for p in REPO.iterdir())
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(REPO / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in REPO.iterdir()) == before, "the build wrote into the repo"
    for page in nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]):
        built = "index.html" if page == "index.md" else f"{Path(page).stem}/index.html"
        assert (site / built).is_file(), f"{page} was not built"


def test_every_docs_page_is_in_the_navigation():
    nav = set(nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]))
    pages = {str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md")}
    assert pages == nav
