"""Every citation of the method notes (``reclag.md §4``, ``greg.md §3.3.2``) names a section
that exists in docs/methods/ (fast tier).

A citation is ``NAME.md §N[.M...]``. A bare ``§N`` counts too, for the note last named earlier
in the same file (``greg.md ... (§3.3)``); inside docs/methods/NAME.md a bare ``§N`` is always
that note's own section. A section exists when a heading of the note starts with its number
(``## 4. Theorems``, ``#### 3.3.2 Batch-mean scaling``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods"
NOTES = ("reclag", "dam", "greg")
SCANNED = ("hopgate", "service", "model_export", "tests", "benchmarks", "configs", "docs")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml"}

_NUM = r"([0-9]+(?:\.[0-9]+)*)"
CITATION = re.compile(rf"\b({'|'.join(NOTES)})\.md(?:\s*§\s*{_NUM})?|§\s*{_NUM}")
HEADING = re.compile(rf"^#{{1,6}}\s+{_NUM}\.?(?:\s|$)", re.MULTILINE)


def sections(note: Path) -> set[str]:
    return set(HEADING.findall(note.read_text(encoding="utf-8")))


def citations(path: Path, root: Path = ROOT) -> list[tuple[str, str, int]]:
    """(note, section, line) for each citation in one file."""
    text = path.read_text(encoding="utf-8")
    own = path.stem if path.parent.name == "methods" and path.stem in NOTES else None
    current, found = own, []
    for m in CITATION.finditer(text):
        note, cited, bare = m.groups()
        line = text.count("\n", 0, m.start()) + 1
        if note:
            current = note
            if cited:
                found.append((note, cited, line))
        elif own or current:
            found.append((own or current, bare, line))
    return found


def missing_sections(root: Path = ROOT, methods: Path = METHODS,
                     scanned: tuple[str, ...] = SCANNED) -> tuple[int, list[str]]:
    """(how many citations, the ones whose section is missing)."""
    known = {n: sections(methods / f"{n}.md") if (methods / f"{n}.md").exists() else set()
             for n in NOTES}
    files = [root / "README.md"] + [
        p for d in scanned for p in sorted((root / d).rglob("*"))
        if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts
    ]
    count, missing = 0, []
    for path in files:
        if path.resolve() == Path(__file__).resolve() or not path.exists():
            continue
        for note, cited, line in citations(path, root):
            count += 1
            if cited not in known[note]:
                missing.append(f"{path.relative_to(root)}:{line}: {note}.md §{cited}")
    return count, missing


def test_every_cited_section_exists():
    count, missing = missing_sections()
    assert count >= 19, f"found only {count} citations: is the scanner looking in the right place?"
    assert not missing, "citations of sections that docs/methods/ does not have:\n" + "\n".join(
        missing
    )


@pytest.mark.parametrize("note", NOTES)
def test_each_note_is_indexed_and_names_its_paper(note):
    text = (METHODS / f"{note}.md").read_text(encoding="utf-8")
    assert re.search(r"arXiv:\d{4}\.\d{4,5}", text), f"{note}.md does not cite its paper"
    assert f"({note}.md)" in (METHODS / "README.md").read_text(encoding="utf-8")


def test_checker_catches_a_citation_of_a_missing_section(tmp_path):
    methods = tmp_path / "docs" / "methods"
    methods.mkdir(parents=True)
    (methods / "reclag.md").write_text("# RecLag\n\n## 4. Theorems\n\n### 4.1 T1\n")
    (methods / "greg.md").write_text(  # in a note, a bare § is its own, after any other note
        "# GReg\n\n## 3. Loss\n\n#### 3.3.2 Scaling\n\nAs reclag.md §4 shows, by §3.3.2 ...\n")
    (tmp_path / "README.md").write_text("")
    code = tmp_path / "pkg"
    code.mkdir()
    (code / "a.py").write_text(
        '"""reclag.md §4 and reclag.md §4.1 exist; reclag.md §5.1 does not.\n\n'
        'greg.md §3.3.2 exists, and so does the bare (§3); the bare §3.3.6 does not.\n"""\n'
        "SYMBOLS = '§±'  # not a citation\n"
    )
    count, missing = missing_sections(tmp_path, methods, ("pkg", "docs"))
    assert count == 8
    assert missing == ["pkg/a.py:1: reclag.md §5.1", "pkg/a.py:3: greg.md §3.3.6"]
