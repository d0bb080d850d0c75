"""benchmarks/gpu_check's dry mode, so the one command a GPU session runs cannot rot: with no
GPU it checks what the CPU can (the IOBinding path's parity, raw img/s), says so in one line
and writes its JSON and Markdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_dry_run(tmp_path):
    from hopgate.service.runtime.cuda import gpu_visible

    if gpu_visible()[0]:
        pytest.skip("a GPU is visible: the dry run is for machines without one")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check"), "--quick",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    said = [x for x in r.stdout.splitlines() if "no GPU" in x]
    assert len(said) == 1 and said[0].startswith("gpu_check: no GPU: "), r.stdout
    result = json.loads((tmp_path / "cpu_dry_run.json").read_text())
    default = result["bundles"]["default"]
    assert result["gpu"] is False
    assert default["parity"]["cpu_binding"]["ok"] is True
    assert default["parity"]["cpu_binding"]["flags_differ"] == 0
    assert set(default["raw_img_per_s"]) == {"cpu_plain", "cpu_binding"}
    assert all(v > 0 for p in default["raw_img_per_s"].values() for v in p.values())
    md = (tmp_path / "cpu_dry_run.md").read_text()
    assert "| cpu_binding |" in md and "no GPU" in md
