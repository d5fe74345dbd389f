"""The documentation site builds: ``mkdocs build --strict`` (mkdocs-material, in the [docs] extra that [test]
installs), so a page missing from the nav, a broken link or a broken #anchor fails here; README's links into docs/
resolve; README stays at most 250 lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(120)
def test_mkdocs_build_strict(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr  # not -q: it hides the warnings --strict counts
    assert (tmp_path / "site" / "how-it-works" / "index.html").is_file()


def test_readme_is_short_and_its_links_resolve():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert any(link.startswith("docs/") for link in local), local
    missing = [link for link in local if not os.path.exists(os.path.join(ROOT, link))]
    assert not missing, missing


def test_no_citation_of_a_file_outside_the_repository():
    """Code and tests cite docs/how-it-works.md, which is in the repository, not a design file that is not."""
    hits = []
    for folder in ("parallel_vae", "tests", "benchmarks", "recipes"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py") and name != "test_docs.py":
                    with open(os.path.join(dirpath, name)) as f:
                        if "DESIGN.md" in f.read():
                            hits.append(os.path.relpath(os.path.join(dirpath, name), ROOT))
    assert not hits, hits
