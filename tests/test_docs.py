"""The repository stands on its own: nothing cites a file outside it, and every pointer
into docs/operator.md ("§N", "§N.M") names a section that exists there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPERATOR_DOC = ROOT / "docs" / "operator.md"

# Spelled in pieces so that this file does not match itself.
OUTSIDE = ("PHANTOM" + ".md", "../" + "shared", "/work/" + "shared")
SECTION_HEADING = re.compile(r"^#{2,6} §(\d+(?:\.\d+)*)\s", re.MULTILINE)
SECTION_REF = re.compile(r"§(\d+(?:\.\d+)*)")
# Where a checkout keeps things that are not part of the repository (used without git).
UNTRACKED_DIRS = {"__pycache__", "outputs", "multirun", "lightning_logs", "runs", "build", "dist"}


def repository_files() -> list[Path]:
    """The tracked files (``git ls-files``), or, outside a git checkout, the source tree."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30)
        names = [n for n in out.stdout.decode().split("\0") if n]
        if names:
            return [ROOT / n for n in names if (ROOT / n).is_file()]
    except (OSError, subprocess.SubprocessError):
        pass
    return [
        path for path in ROOT.rglob("*")
        if path.is_file() and not any(
            part.startswith(".") or part in UNTRACKED_DIRS or part.endswith(".egg-info")
            for part in path.relative_to(ROOT).parts[:-1]
        )
    ]


def text_files() -> dict[str, str]:
    texts = {}
    for path in repository_files():
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            texts[path.relative_to(ROOT).as_posix()] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def sections(doc: str) -> list[str]:
    return SECTION_HEADING.findall(doc)


def outside_citations(texts: dict[str, str]) -> list[str]:
    return [
        f"{name}:{lineno}: {needle!r} in {line.strip()!r}"
        for name, text in texts.items()
        for lineno, line in enumerate(text.splitlines(), start=1)
        for needle in OUTSIDE
        if needle in line
    ]


def dangling_sections(texts: dict[str, str], known: set[str]) -> list[str]:
    return [
        f"{name}:{lineno}: §{ref} in {line.strip()!r}"
        for name, text in texts.items()
        for lineno, line in enumerate(text.splitlines(), start=1)
        for ref in SECTION_REF.findall(line)
        if ref not in known
    ]


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    found = text_files()
    assert "docs/operator.md" in found and "lightning_phantom/ops/operator.py" in found, sorted(found)[:20]
    return found


def test_no_file_cites_a_file_outside_the_repository(texts):
    bad = outside_citations(texts)
    assert not bad, (
        "These lines cite files that are not in the repository; point at the section of "
        "docs/operator.md that says the same instead:\n" + "\n".join(bad)
    )


def test_operator_doc_sections_are_numbered_once():
    numbers = sections(OPERATOR_DOC.read_text(encoding="utf-8"))
    assert numbers, "docs/operator.md has no '## §N Title' headings"
    assert len(numbers) == len(set(numbers)), f"section numbers repeat: {numbers}"
    top = [int(n) for n in numbers if "." not in n]
    assert top == list(range(1, len(top) + 1)), f"top-level sections are not §1, §2, … in order: {top}"


def test_every_section_reference_exists(texts):
    known = set(sections(texts["docs/operator.md"]))
    bad = dangling_sections(texts, known)
    assert not bad, (
        f"These lines point at sections that docs/operator.md does not have (it has §"
        f"{', §'.join(sorted(known, key=lambda s: [int(x) for x in s.split('.')]))}):\n" + "\n".join(bad)
    )


def test_the_checks_catch_what_they_should():
    """The checkers themselves: a test that could never fail would prove nothing."""
    known = {"3", "6", "6.1"}
    sample = {"a.py": "see docs/operator.md §6.1 and §3–§4\n# " + OUTSIDE[0] + ", 'Forward'\nok §6\n"}
    assert dangling_sections(sample, known) == ["a.py:1: §4 in 'see docs/operator.md §6.1 and §3–§4'"]
    assert [line.split(":")[1] for line in outside_citations(sample)] == ["2"]
    assert sections("## §1 Notation\n### §6.2 Fresh\n#§7 not a heading\n") == ["1", "6.2"]
