"""scripts/setup installs only when the install is missing or stale (issue 22 item 5): run on a
copy whose venv is a stub (its ``python`` only says what pip would do), so nothing is installed.
Mutations caught: the stamp never written (every run installs), the mode left out of the
check (a serve-only venv taken for a full one), the constraints left out of the hash."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    if not Path("/usr/share/datasets/fashion-mnist").is_dir() or not shutil.which("chromedriver"):
        pytest.skip("`setup all` would install system packages first")  # never from a test
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup", tmp_path / "scripts" / "setup")
    for f in ["pyproject.toml", *(p.name for p in ROOT.glob("constraints*.txt"))]:
        shutil.copy(ROOT / f, tmp_path / f)
    bin_ = tmp_path / ".venv" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "activate").write_text('python() { echo "PIP $*"; }\n')  # pip, stubbed
    for name in ("python", "hopgate-serve"):
        (bin_ / name).write_text("")
        (bin_ / name).chmod(0o755)
    return tmp_path


def setup(repo: Path, mode: str) -> list[str]:
    run = subprocess.run(["bash", "scripts/setup", mode], cwd=repo, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def installs(lines: list[str]) -> bool:
    return any(line.startswith("PIP -m pip install") for line in lines)


def test_setup_installs_only_when_missing_or_stale(repo):
    assert installs(setup(repo, "serve"))  # fresh: installs
    assert setup(repo, "serve") == []  # warm: nothing done, nothing printed
    assert installs(setup(repo, "all"))  # a serve-only venv lacks the export and dev extras
    assert setup(repo, "all") == [] and setup(repo, "serve") == []  # all includes serve
    with (repo / "constraints.txt").open("a") as f:
        f.write("# a new pin\n")
    assert installs(setup(repo, "serve"))  # stale: the pins changed
    assert setup(repo, "serve") == []
