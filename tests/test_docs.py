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


def test_charts_are_drawn_from_the_committed_data(tmp_path):
    """benchmarks/plots.py draws every chart in docs/img from the JSON in docs/data (what README and the docs embed),
    and the scripts' own JSON shapes: a chart that cannot be redrawn from its data would be a picture, not a result."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import plots
    finally:
        sys.path.pop(0)
    data = os.path.join(ROOT, "docs", "data")
    made = []
    for name in sorted(os.listdir(data)):
        if name.endswith(".json"):
            made += [os.path.basename(p) for p in plots.charts(os.path.join(data, name), str(tmp_path))]
    committed = sorted(n for n in os.listdir(os.path.join(ROOT, "docs", "img")) if n.endswith(".png"))
    assert sorted(made) == committed, (made, committed)
    for name in made:
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    text = open(os.path.join(ROOT, "README.md")).read() + open(os.path.join(ROOT, "docs", "benchmarks.md")).read()
    assert all(name in text for name in committed), [n for n in committed if n not in text]
