"""The README's examples, and those of the guides moved out of it, run as written (issue 22).

Every ``bash``/``python`` block of PAGES is run, from a scratch folder that sees the
repository's ``docs/``, ``models/`` and ``configs/``, against a real ``hopgate-serve`` on the
shipped bundle at a free loopback port (the pages say ``http://127.0.0.1:8000``, what
``scripts/serve`` gives; the test swaps in its own port). A block must exit 0; an
``<!-- output -->`` block after it must fit what it printed (tests/docblocks.py says how: the
parts that vary are shown as ``…``, numbers to their shown digits). A block the test cannot
run cheaply is marked ``<!-- illustrative: ... -->`` with what covers it instead; the fast
checks below hold every page to that.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from docblocks import RUN_LANGS, Block, blocks, matches

from hopgate.service.server.local import local_server

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/build.md", "docs/screen.md", "docs/operate.md")
SHOWN_URL = "http://127.0.0.1:8000"


def runnable() -> list[tuple[str, int, Block, Block | None]]:
    """(page, index, block, the output block shown after it or None) for every block run."""
    found = []
    for page in PAGES:
        bs = blocks(ROOT / page)
        for i, b in enumerate(bs):
            if b.runs:
                after = bs[i + 1] if i + 1 < len(bs) and bs[i + 1].mark == "output" else None
                found.append((page, i, b, after))
    return found


# --- fast: every block is run or says why not ------------------------------------------------

@pytest.mark.parametrize("page", PAGES)
def test_every_command_block_runs_or_is_marked(page):
    bs = blocks(ROOT / page)
    assert bs, f"{page} has no code blocks: is the parser reading it?"
    for i, b in enumerate(bs):
        assert b.lang, f"{b.where(ROOT / page)}: a block without a language"
        if b.mark == "illustrative":
            assert b.lang in RUN_LANGS and len(b.note) > 15, (
                f"{b.where(ROOT / page)}: an illustrative block says what covers it")
        if b.mark == "output":
            prev = bs[i - 1] if i else None
            assert prev is not None and prev.lang in RUN_LANGS, (
                f"{b.where(ROOT / page)}: an output block follows the block that prints it")
            if prev.mark == "illustrative":  # then a named test checks it
                test = re.search(r"tests/\S+\.py", b.note)
                assert test and page in (ROOT / test.group()).read_text(), (
                    f"{b.where(ROOT / page)}: names no test that reads {page}")


def test_the_readme_has_its_tour():
    names = {b.text.split()[0] for _, _, b, _ in runnable() if b.lang == "bash"}
    assert {"curl", "hopgate-screen"} <= names
    assert any("hopgate.client" in b.text for _, _, b, _ in runnable())
    assert len((ROOT / "README.md").read_bytes()) <= 10_240  # a front page, not the manual


def test_the_scripts_table_lists_every_script():
    listed = set(re.findall(r"^\| `scripts/([\w-]+)` \|", (ROOT / "README.md").read_text(),
                            re.MULTILINE))
    assert listed == {p.name for p in (ROOT / "scripts").iterdir() if p.is_file()}


def test_matcher_checks_numbers_to_their_shown_digits():
    assert matches("score -17.44 at …/x.png", "score -17.4430675 at /tmp/a/x.png") is None
    assert matches("score -17.44 at …/x.png", "score -17.4630675 at /tmp/a/x.png")
    assert matches("8 images, OOD 3", "8 images, OOD 4")  # counts are exact
    assert matches("version default-ddbf1922-s0", "version default-ddbf1923-s0")
    assert matches('{"ood": false, "score": -17.4, …}', '{"ood":false,"score":-17.43,"x":1}',
                   "json") is None
    assert matches('{"ood": false, …}', '{"ood":true,"score":-17.43}', "json")
    # lines in order; printed lines between them (warnings, progress) are allowed
    assert matches("a 1\nb 2", "warn\na 1\nprogress\nb 2\n") is None
    assert matches("b 2\na 1", "a 1\nb 2") == "a 1"


def test_marks_are_read(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("<!-- illustrative: tests/x.py covers this -->\n```bash\nls\n```\n\n"
                    "```python\nprint(1)\n```\n<!-- output -->\n```text\n1\n```\n")
    bs = blocks(page)
    assert [(b.lang, b.mark, b.runs) for b in bs] == [
        ("bash", "illustrative", False), ("python", None, True), ("text", "output", False)]
    assert bs[0].note == "tests/x.py covers this" and bs[1].line == 6


# --- integration: run them -------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with local_server(tmp_path_factory.mktemp("readme"), ROOT / "models" / "default.onnx",
                      intra_op_threads=2) as s:
        yield s


@pytest.mark.integration
@pytest.mark.parametrize(("page", "index", "block", "shown"),
                         [pytest.param(*r, id=r[2].where(ROOT / r[0])) for r in runnable()])
def test_block_runs_as_written(served, tmp_path, page, index, block, shown):
    for name in ("docs", "models", "configs"):  # what the commands name, read-only
        (tmp_path / name).symlink_to(ROOT / name)
    code = block.text.replace(SHOWN_URL, served.url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOPGATE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if block.lang == "python":
        argv = [sys.executable, "-c", code]
    else:
        assert shutil.which("curl") or "curl" not in code, "the pages' examples need curl"
        argv = ["bash", "-euo", "pipefail", "-c", code]
    run = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=180)
    printed = run.stdout + run.stderr
    assert run.returncode == 0, f"{block.where(ROOT / page)} exited {run.returncode}:\n{printed}"
    if shown is not None:
        miss = matches(shown.text, printed.replace(served.url, SHOWN_URL), shown.lang)
        assert miss is None, (f"{shown.where(ROOT / page)}: no printed line fits {miss!r}; "
                              f"printed:\n{printed}")
