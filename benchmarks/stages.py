"""Where a served request's CPU goes, stage by stage (issue 15): py-spy samples the server's
threads (all its processes) while wrk loads it, each sample is put in the stage of the
innermost frame that has a stage's marker (so a socket write under the answer counts as HTTP,
and everything under uvicorn's h11 cycle is not HTTP just for being under it), and the shares
are scaled to the server's measured CPU per request. Used by versus.py (``--profile``); alone:

    python benchmarks/stages.py PID SECONDS CPU_MS_PER_REQUEST   (while load runs)

py-spy comes from PyPI (``pip install py-spy``); it needs ptrace rights over the server (root,
or the same user with ptrace_scope 0). Samples are of threads on the CPU (py-spy's default:
idle threads are left out), so the shares are of work done, not of wall time.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

# (stage, markers): the innermost frame with any stage's marker decides
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("onnxruntime run", ("Session.run",)),
    ("decode: header + cost estimate", ("decode_cost",)),
    ("decode: Pillow decode + resize", ("imaging.py", "pixels.py", "DecodePool._job")),
    ("access log", ("logging/__init__", "JsonFormatter", "logging/handlers")),
    ("metrics", ("prometheus_client",)),
    ("answer: results + JSON", ("Scorer.result", "schema.py", "model_dump", "ScoreResponse",
                                "JSONResponse.render", "EncodedJSON")),
    ("thread hand-offs", ("run_in_executor", "ThreadPoolExecutor.submit", "_write_to_self",
                          "call_soon_threadsafe", "to_thread", "_chain_future",
                          "_read_from_self", "_worker (", "Condition.wait", "SimpleQueue")),
    ("body read + parse", ("parsing.py",)),
    ("batcher + queueing", ("batcher.py", "Scorer.run", "DecodePool.one", "DecodePool.inline",
                            "Scorer.decode_all")),
    ("HTTP: parser + socket I/O", ("h11", "selector_events", "transport.py", "httptools")),
    ("middleware + routing (envelope, admission, Starlette, FastAPI)", (
        "app.py", "admission.py", "starlette/", "fastapi/", "routes/score.py", "scoring.py",
        "routes/direct.py", "lifecycle.py", "errors.py", "anyio/")),
    ("event loop (select, scheduling)", ("base_events", "selectors", "events.py", "tasks.py",
                                         "asyncio/", "threading.py")),
]
OTHER = "other"


def classify(stack: str) -> str:
    for frame in reversed(stack.split(";")):
        for stage, markers in STAGES:
            if any(m in frame for m in markers):
                return stage
    return OTHER


def shares(raw: str) -> tuple[int, dict[str, float]]:
    """py-spy ``--format raw`` (collapsed stacks, ``frames count`` per line) -> stage shares."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if stack and n.isdigit():
            counts[classify(stack)] += int(n)
    total = sum(counts.values())
    return total, {k: v / total for k, v in counts.most_common()} if total else {}


def record(pid: int, seconds: float, rate: int = 250) -> str | None:
    """Collapsed stacks of ``pid`` and its children for ``seconds``; None without py-spy."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stacks.txt"
        subprocess.run([exe, "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r",
                        str(rate), "-f", "raw", "-o", str(out), "--subprocesses",
                        "--nonblocking"], capture_output=True, timeout=seconds + 60)
        return out.read_text() if out.exists() else None


def breakdown(raw: str, cpu_ms_per_request: float) -> dict:
    total, share = shares(raw)
    return {"samples": total, "cpu_ms_per_request": cpu_ms_per_request,
            "stages": {k: {"share": round(v, 4), "ms_per_request": round(v * cpu_ms_per_request,
                                                                         4)}
                       for k, v in share.items()}}


def table(b: dict) -> list[str]:
    lines = ["| stage | share of server CPU | ms per request |", "|---|---|---|"]
    for k, v in b["stages"].items():
        lines.append(f"| {k} | {v['share'] * 100:.1f} % | {v['ms_per_request']:.3f} |")
    lines.append(f"| total ({b['samples']} samples) | 100 % | {b['cpu_ms_per_request']:.3f} |")
    return lines


if __name__ == "__main__":
    raw = record(int(sys.argv[1]), float(sys.argv[2]))
    if raw is None:
        sys.exit("py-spy not found: pip install py-spy")
    print("\n".join(table(breakdown(raw, float(sys.argv[3])))))
