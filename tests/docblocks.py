"""The code blocks of a Markdown page, and a matcher for the output a page shows.

Our own ~100 lines rather than pytest-markdown-docs or phmdoctest: those run Python blocks
only, while most of what a newcomer pastes from our pages is shell (curl, hopgate-screen)
against a running server, whose port and working folder the test must choose; and neither
matches shown output with the parts that vary elided.

A page marks its blocks with an HTML comment on the line before the fence (GitHub shows
nothing of it):

* ``<!-- illustrative: REASON -->``: a ``bash``/``python`` block the test does not run; the
  reason names what covers it (``tests/test_byo.py runs this build``) or why nothing can.
* ``<!-- output -->``: the block shows what the run block before it prints. ``…`` stands
  for any text (the parts that vary: timings, paths, rates); a number matches a printed number
  within one unit of its last shown digit (so ``-17.44`` matches ``-17.4430675``, and a float
  printed 1e-6 apart on another CPU still matches); whitespace matches any whitespace. A
  ``json`` output is matched against the whole output; any other output line by line, in
  order, each line matching a whole printed line (printed lines between them are allowed:
  warnings, progress bars).
* ``<!-- output: checked by tests/X.py -->``: the output of an illustrative block; that test
  matches it (``matches``).

Every other ``bash``/``sh``/``python`` block is run by tests/test_readme.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

RUN_LANGS = ("bash", "sh", "shell", "python")
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
MARK = re.compile(r"<!--\s*(illustrative|output)\s*(?::\s*(.*?))?\s*-->\s*\Z", re.DOTALL)
NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
# a number standing alone: not part of a word or a hex digest (``ddbf1922``, ``s0``, ``v2``)
LONE = re.compile(rf"(?<![\w.]){NUMBER}(?![\w])")


@dataclass
class Block:
    lang: str
    text: str
    line: int  # of the opening fence, 1-based
    mark: str | None  # "illustrative", "output" or None
    note: str  # the mark's reason / checker

    @property
    def runs(self) -> bool:
        return self.lang in RUN_LANGS and self.mark is None

    def where(self, path: Path) -> str:
        return f"{path.name}:{self.line}"


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip()
        last = before[before.rfind("<!--"):] if "<!--" in before else ""
        mark = MARK.match(last)
        found.append(Block(m.group(1).lower(), m.group(2), text.count("\n", 0, m.start()) + 1,
                           mark.group(1) if mark else None,
                           (mark.group(2) or "") if mark else ""))
    return found


def _pattern(expected: str) -> tuple[re.Pattern[str], list[tuple[float, float]]]:
    """A regex for one expected text, and (value, tolerance) for each number group in it."""
    parts, numbers, pos = [], [], 0
    for m in LONE.finditer(expected):
        parts.append(_literal(expected[pos:m.start()]))
        shown = m.group()
        decimals = len(shown.split(".")[1]) if "." in shown and "e" not in shown.lower() else 0
        numbers.append((float(shown), 10.0 ** -decimals if decimals else 0.0))
        parts.append(f"({NUMBER})")
        pos = m.end()
    parts.append(_literal(expected[pos:]))
    return re.compile("".join(parts), re.DOTALL), numbers


def _literal(text: str) -> str:
    out = []
    for i, piece in enumerate(text.split("…")):
        if i:
            out.append(".*?")
        out.append(r"\s*".join(re.escape(w) for w in re.split(r"\s+", piece)))
    return "".join(out)


def _fits(pattern, numbers, actual: str, whole: bool) -> bool:
    m = pattern.search(actual) if not whole else pattern.fullmatch(actual)
    return bool(m) and all(abs(float(got) - want) <= tol + 1e-12 * abs(want)
                           for got, (want, tol) in zip(m.groups(), numbers))


def matches(expected: str, actual: str, lang: str = "text") -> str | None:
    """None when ``actual`` (what a run printed) fits ``expected`` (an output block), else
    the first expected line that no printed line fits."""
    if lang == "json":
        pattern, numbers = _pattern(expected.strip())
        return None if _fits(pattern, numbers, actual, whole=False) else expected.strip()
    printed = [ln.strip() for ln in re.split(r"[\r\n]+", actual) if ln.strip()]
    i = 0
    for want in (ln.strip() for ln in expected.splitlines() if ln.strip()):
        pattern, numbers = _pattern(want)
        while i < len(printed) and not _fits(pattern, numbers, printed[i], whole=True):
            i += 1
        if i == len(printed):
            return want
        i += 1
    return None
