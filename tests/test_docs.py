"""The design document (docs/design.md) and the references to it stay in step.

The code, the tests, the benchmarks, the kernels and the README cite "docs/design.md §N"; each such
citation must name a section the document has, and every file the document names must exist, so a
reader of a clone can follow both ways.
"""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"

# What is not the project's own text: environments, build outputs, results, caches.
SKIP_DIRS = {".git", "build", "dist", "__pycache__", "node_modules", ".pytest_cache", ".benchmarks"}
TEXT_SUFFIXES = {".py", ".md", ".h", ".cpp", ".cu", ".toml", ".in", ".txt", ".cfg", ".sh"}
TEXT_NAMES = {"dev", "run"}  # ./dev and .ci/run

# "docs/design.md §1", "docs/design.md §1.6"
REFERENCE = re.compile(r"docs/design\.md\s*§\s*(\d+(?:\.\d+)?)")
# A "§N" or "§N.M" inside the document itself
INTERNAL = re.compile(r"§(\d+(?:\.\d+)?)")
HEADING = re.compile(r"^#{2,3} §(\d+(?:\.\d+)?)\s", re.M)
# A backticked token that reads as a path in the repository: a/b/c(.ext) or name.ext
PATH = re.compile(r"^(?:[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)+/?|[A-Za-z0-9_-]+\.(?:py|h|cpp|cu|md|toml|in|json))$")


def project_files() -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(ROOT):
        here = Path(folder)
        dirs[:] = [
            d
            for d in dirs
            if d not in SKIP_DIRS
            and not d.startswith(".venv")
            and not d.endswith(".egg-info")
            and (here / d).relative_to(ROOT).parts != ("bench", "results")
        ]
        files += [here / name for name in names if Path(name).suffix in TEXT_SUFFIXES or name in TEXT_NAMES]
    return files


def sections() -> set[str]:
    return set(HEADING.findall(DESIGN.read_text(encoding="utf-8")))


def test_the_design_document_has_its_four_sections():
    assert {"1", "2", "3", "4"} <= sections()


def test_every_reference_to_the_design_document_names_a_section_it_has():
    have = sections()
    found, missing = [], []
    for path in project_files():
        for number in REFERENCE.findall(path.read_text(encoding="utf-8", errors="replace")):
            where = f"{path.relative_to(ROOT)}: docs/design.md §{number}"
            found.append(where)
            if number not in have:
                missing.append(where)
    # The code, README and tests cite it in a dozen places: none found means the scan is broken.
    assert len(found) >= 10, found
    assert missing == []


def test_no_reference_to_a_design_file_that_is_not_in_the_repository():
    """The references used to name a DESIGN.md outside the repository."""
    stale = [
        f"{path.relative_to(ROOT)}:{number + 1}"
        for path in project_files()
        if path != Path(__file__).resolve()
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines())
        if re.search(r"(?<![\w/])DESIGN\.md", line)
    ]
    assert stale == []


def test_every_section_the_design_document_cites_in_itself_exists():
    have = sections()
    cited = set(INTERNAL.findall(DESIGN.read_text(encoding="utf-8")))
    assert cited - have == set()


def test_every_file_the_design_document_names_exists():
    names = {token for token in re.findall(r"`([^`\s]+)`", DESIGN.read_text(encoding="utf-8")) if PATH.match(token)}
    assert len(names) >= 10, names  # it names the files of every layer
    assert sorted(name for name in names if not (ROOT / name).exists()) == []
