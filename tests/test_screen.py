"""hopgate-screen on a folder of 1,000 images (920 Fashion-MNIST test images, 80 noise images):
in process against the default bundle and against a real server; interrupted (``--limit``, and
a SIGKILL mid-run) and resumed without rescoring; the summary's figures; the inputs and the
output formats."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from tpr_band import CLIENT_PATH_SHIFT, accepted_band

from hopgate.bundle import load_meta
from hopgate.screen import list_inputs
from hopgate.screen.output import Output
from hopgate.screen.summary import summarise
from hopgate.service import screening
from hopgate.service.scoring import Scorer
from hopgate.service.server.local import local_server

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "default.onnx"
ID_IMAGES, NOISE_IMAGES = 920, 80


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """imgs/fashion/*.png (ID) and imgs/noise/{grey,rgb}/*.png (OOD): 1,000 images."""
    from hopgate.model_export.data import (
        sources as data,  # numpy + Pillow; the Debian dataset files
    )

    root = tmp_path_factory.mktemp("screen") / "imgs"
    for sub in ("fashion", "noise/grey", "noise/rgb"):
        (root / sub).mkdir(parents=True)
    fashion = data.fashion_mnist("test").images[:ID_IMAGES, ..., 0]
    for i, a in enumerate(fashion):
        Image.fromarray(a).save(root / "fashion" / f"{i:04d}.png")
    rng = np.random.default_rng(0)
    for i in range(NOISE_IMAGES // 2):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(
            root / "noise" / "grey" / f"{i:03d}.png")
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            root / "noise" / "rgb" / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture
def scored(monkeypatch) -> list[int]:
    """Images the service's scoring core was asked to score in this process, per call."""
    calls: list[int] = []
    original = Scorer.score

    async def counting(self, blobs, *args, **kwargs):
        calls.append(len(blobs))
        return await original(self, blobs, *args, **kwargs)

    monkeypatch.setattr(Scorer, "score", counting)
    return calls


def check_summary(out: Path) -> dict:
    summary = json.loads(out.with_name(out.stem + ".summary.json").read_text())
    rows = Output(out).rows()
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == ID_IMAGES + NOISE_IMAGES  # each once, none twice
    assert summary["images"] == summary["scored"] == 1000 and summary["errors"] == 0

    def share(kind):
        picked = [r for r in rows if f"/{kind}/" in r["path"]]
        return sum(r["ood"] for r in picked) / len(picked)

    # ID: the rejected share of 920 test images stays inside the default bundle's band
    # (tests/tpr_band.py: 6,000 calibration images; about 0.09 at most)
    meta = load_meta(BUNDLE)
    lo, _ = accepted_band(meta.calibration_size, ID_IMAGES, meta.target_tpr,
                          shift=CLIENT_PATH_SHIFT)
    assert share("noise") >= 0.95 and share("fashion") <= 1 - lo  # noise >> ID
    assert summary["ood"] == sum(r["ood"] for r in rows)
    assert sum(c["images"] for c in summary["by_class"].values()) == 1000
    assert sum(c["ood"] for c in summary["by_class"].values()) == summary["ood"]
    most = summary["most_ood"]
    assert len(most) == 24 and all("/noise/" in r["path"] for r in most)
    assert [r["score"] for r in most] == sorted(r["score"] for r in most)
    html = out.with_name(out.stem + ".summary.html").read_text()
    assert html.count("data:image/png;base64,") == 24 and "http" not in html.split("<body>")[1]
    return summary


def test_in_process_screen_resumes_without_rescoring(folder, tmp_path, scored, capsys):
    out = tmp_path / "screen.csv"
    args = [str(folder), "-o", str(out), "--bundle", str(BUNDLE), "-q"]
    assert screening.main([*args, "--limit", "400"]) == 0  # the interrupted run
    assert sum(scored) == 400 and len(Output(out).rows()) == 400
    scored.clear()
    assert screening.main(args[:-1]) == 0  # the resumed run, with its printed summary
    assert sum(scored) == 600  # the 400 done are not scored again
    summary = check_summary(out)
    assert summary["run"]["skipped"] == 400 and summary["run"]["screened"] == 600
    printed = capsys.readouterr().out
    assert "predicted class" in printed and "most OOD" in printed and "600 screened" in printed
    scored.clear()
    assert screening.main(args) == 0 and scored == []  # nothing left to do


def metric_images(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("hopgate_images_total{"))


@pytest.mark.integration
def test_screen_against_a_server_survives_a_kill_and_resumes_without_rescoring(folder,
                                                                               tmp_path):
    out = tmp_path / "screen.jsonl"
    with local_server(tmp_path, BUNDLE, intra_op_threads=2, max_images=64) as server:
        cmd = [sys.executable, "-m", "hopgate.service.screening", str(folder), "-o", str(out),
               "--url", server.url, "--batch-size", "8", "--concurrency", "1", "-q"]
        proc = subprocess.Popen(cmd, cwd=ROOT)
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 200):
            assert proc.poll() is None and time.monotonic() < deadline, "no results came"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = len(Output(out).rows())
        assert 200 <= done < 1000
        before = metric_images(server.url)
        assert before - done <= 16  # lost at the kill: at most the batches in flight (2 x 8)
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, timeout=300)
        took = time.perf_counter() - t0
        assert metric_images(server.url) - before == 1000 - done  # only what was missing
    summary = check_summary(out)
    assert summary["run"]["skipped"] == done and summary["run"]["screened"] == 1000 - done
    print(f"resumed {1000 - done} images via the server in {took:.2f} s (process included), "
          f"{summary['run']['images_per_s']} images/s while screening")


def test_inputs_formats_and_broken_files(folder, tmp_path, scored):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "notes.png").write_text("not an image")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two from a list\n{folder}/fashion/0001.png\n\n{tmp_path}/broken.png\n")
    inputs = [str(listing), f"{folder}/noise/**/00[0-4].*", str(tmp_path / "notes.png"),
              f"{folder}/fashion/0001.png"]  # listed twice: screened once
    paths = list_inputs(inputs)
    assert len(paths) == 2 + 10 + 1 and paths[0].endswith("0001.png")
    for name in ("s.csv", "s.jsonl") + (("s.parquet",) if _has_pyarrow() else ()):
        out = tmp_path / name
        assert screening.main([*inputs, "-o", str(out), "--bundle", str(BUNDLE), "-q",
                               "--batch-size", "4", "--top", "3"]) == 0
        rows = {Path(r["path"]).name: r for r in Output(out).rows()}
        assert rows["broken.png"]["error_status"] == 422
        assert rows["notes.png"]["error_status"] == 415 and rows["notes.png"]["ood"] is None
        assert rows["0001.png"]["ood"] is False and rows["0001.png"]["memories"]
        summary = json.loads((tmp_path / "s.summary.json").read_text())
        assert summary["errors"] == 2 and summary["errors_by_reason"] == {"bad_input": 2}
        assert summary["images"] == 13 and len(summary["most_ood"]) == 3
    assert screening.main([str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.csv"),
                           "--bundle", str(BUNDLE)]) == 1
    assert screening.main([str(listing), "-o", str(tmp_path / "x.xlsx"),
                           "--bundle", str(BUNDLE)]) == 1


def test_rows_are_on_disk_at_once_and_a_row_cut_by_a_kill_is_dropped(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"path": "a", "score": 1.0}\n{"path": "b", "sco')
    o = Output(out)
    assert [r["path"] for r in o.rows()] == ["a"]
    o.append([{"path": "b", "score": 2.0}])
    assert [r["path"] for r in Output(out).rows()] == ["a", "b"]  # on disk before close
    o.close()
    assert [r["path"] for r in Output(out).rows()] == ["a", "b"]


def test_summary_figures():
    rows = [{"path": f"{i}", "ood": i < 3, "score": float(i), "threshold": 2.5, "p_value": 0.1,
             "label": "bag" if i % 2 else "coat", "error_status": None} for i in range(6)]
    rows.append({"path": "x", "ood": None, "score": None, "error_status": 415,
                 "error_reason": "bad_input"})
    s = summarise(rows, top=2)
    assert (s["images"], s["scored"], s["errors"], s["ood"]) == (7, 6, 1, 3)
    assert s["by_class"] == {"coat": {"images": 3, "ood": 2, "ood_share": 0.6667},
                             "bag": {"images": 3, "ood": 1, "ood_share": 0.3333}}
    assert [r["path"] for r in s["most_ood"]] == ["0", "1"]


def _has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True
