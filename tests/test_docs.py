"""The documentation site (mkdocs.yml, docs/) builds with `mkdocs build --strict`: a broken link or anchor, an
absolute link or a page missing from the nav is a warning there (`validation:` in mkdocs.yml), so it fails the
build. The README's relative links into docs/ point at files that exist."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MKDOCS = Path(sys.executable).with_name("mkdocs")  # installed by the [dev] extra (mkdocs-material)


def test_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2.0, not a build warning
    r = subprocess.run([str(MKDOCS), "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stderr}\n{r.stdout}"
    assert (site / "index.html").exists()


def test_readme_links_point_at_files_that_exist():
    links = re.findall(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)", (ROOT / "README.md").read_text())
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert any(link.startswith("docs/") for link in local)
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
