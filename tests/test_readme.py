"""The README's commands work in a fresh clone: every file or folder they name ships with the repository."""

import re
import subprocess
import sys
from pathlib import Path


PROJECT_ROOT = Path(__file__).resolve().parents[1]
README = PROJECT_ROOT / "README.md"
# Paths the commands and links read (outputs/... are what the commands write).
SHIPPED_PATH = re.compile(r"(?<![\w./-])((?:examples|docs|conversion|evaluation|metrics|benchmarks|tests)/[\w./-]*\w)")


def test_readme_names_no_path_outside_the_repository():
    text = README.read_text(encoding="utf-8")
    assert "../" not in text, [line for line in text.splitlines() if "../" in line]


def test_every_path_the_readme_names_ships_with_the_repository():
    text = README.read_text(encoding="utf-8")
    paths = sorted(set(SHIPPED_PATH.findall(text)))
    assert "examples/assets/stories260K" in paths and "docs/MOR_SPEC.md" in paths
    missing = [path for path in paths if not (PROJECT_ROOT / path).exists()]
    assert missing == []


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    targets = [target for target in re.findall(r"\]\(([^)#]+)\)", text) if "://" not in target]
    assert targets and [target for target in targets if not (PROJECT_ROOT / target).exists()] == []


def test_spec_copy_says_where_it_comes_from():
    spec = (PROJECT_ROOT / "docs" / "MOR_SPEC.md").read_text(encoding="utf-8")
    assert "Provenance:" in spec.split("\n\n", 3)[1]


def test_quickstart_help_runs_from_anywhere(tmp_path):
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "examples" / "quickstart.py"), "--help"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "--steps" in result.stdout and "one CPU thread" in result.stdout
