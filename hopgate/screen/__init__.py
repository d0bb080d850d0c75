"""hopgate-screen: screen a folder, a file list or a glob for OOD images, against a running
service (``--url``) or in process against a bundle (``--bundle``), before the images reach
training or labelling.

    hopgate-screen data/incoming -o screen.csv --url http://127.0.0.1:8000
    hopgate-screen 'shots/**/*.jpg' list.txt -o screen.jsonl --bundle models/default.onnx

Inputs (any mix): a folder (searched recursively for PNG, JPEG, GIF, WebP, BMP, TIFF by
extension), a glob (``**`` recurses), a file list (``.txt``/``.lst``: one path per line, ``#``
comments), or an image file. Each result is appended to the output as it comes (CSV, JSONL or
Parquet by extension: output.py); a rerun with the same output skips every path already
in it, so an interrupted run resumes without rescoring (``--fresh`` starts over). At the end:
the summary (summary.py) printed, and written beside the output as
``<name>.summary.json`` and ``<name>.summary.html``.

This module is the tool minus the in-process scorer: the shared package cannot import the
service, so ``--bundle`` is served by ``hopgate.service.screening`` (the console script's
entry point), which hands ``main`` the service's own app to call in process.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import importlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..bundle import BundleError
from ..client import AsyncClient, ScoreError
from .output import Output, OutputError, row_of
from .summary import page, summarise, text

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})
# (bundle path, batch size) -> an AsyncClient bound to the service's app, in process
InProcess = Callable[[Path, int], AbstractAsyncContextManager[AsyncClient]]


def list_inputs(specs: list[str]) -> list[str]:
    """The paths to screen, in a stable order, each once."""
    out: list[str] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*")
                          if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif glob.has_magic(spec):
            out += sorted(f for f in glob.glob(spec, recursive=True) if Path(f).is_file())
        elif p.suffix.lower() in LIST_SUFFIXES:
            lines = p.read_text(encoding="utf-8").splitlines()
            out += [s for line in lines if (s := line.strip()) and not s.startswith("#")]
        elif p.exists():
            out.append(spec)
        else:
            raise FileNotFoundError(f"{spec}: no such folder, file or glob match")
    return list(dict.fromkeys(out))


@dataclass
class Stats:
    listed: int = 0
    skipped: int = 0  # already in the output from an earlier run
    screened: int = 0  # scored (or failed) in this run
    seconds: float = 0.0  # screening only, after the server or the bundle was ready
    startup_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.screened / self.seconds if self.seconds > 0 else 0.0


class Progress:
    """tqdm when it is installed, else a line on stderr every few seconds."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self.t0 = self.last = time.monotonic()
        self.bar: Any = None
        if enabled:
            try:
                tqdm = importlib.import_module("tqdm").tqdm  # optional: not a serve dependency
                self.bar = tqdm(total=total, unit="img", file=sys.stderr, smoothing=0.1)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (time.monotonic() - self.last > 5 or self.done == self.total):
            self.last = time.monotonic()
            rate = self.done / max(self.last - self.t0, 1e-9)
            print(f"screened {self.done}/{self.total} ({rate:.0f} images/s)", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def screen(paths: list[str], output: Output, client: AsyncClient, batch_size: int = 32,
                 concurrency: int = 2, limit: int | None = None, progress: bool = True) -> Stats:
    """Score the paths not yet in ``output`` (at most ``limit``), appending a row per path
    after every batch."""
    done = {r["path"] for r in output.rows()}
    todo = [p for p in paths if p not in done]
    stats = Stats(listed=len(paths), skipped=len(paths) - len(todo))
    todo = todo[:limit] if limit is not None else todo
    bar = Progress(len(todo), progress)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        i = 0
        async for result in client.stream(todo, batch_size, concurrency):
            rows.append(row_of(todo[i], result))
            i += 1
            if len(rows) >= batch_size:
                output.append(rows)
                bar.update(len(rows))
                stats.screened += len(rows)
                rows = []
    finally:  # what came back before an interrupt is kept
        if rows:
            output.append(rows)
            bar.update(len(rows))
            stats.screened += len(rows)
        stats.seconds = time.perf_counter() - t0
        output.close()
        bar.close()
    return stats


@asynccontextmanager
async def remote(url: str, api_key: str | None, timeout: float) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(url, api_key=api_key, timeout=timeout) as client:
        if not await client.ready():
            raise ScoreError(0, "unreachable", f"{url}/readyz does not answer 200")
        yield client


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hopgate-screen", description="Screen images for OOD: a folder (recursive), a "
        "file list (.txt, one path per line) or a glob; results appended to OUTPUT, resumable.")
    p.add_argument("inputs", nargs="+", help="folders, globs, file lists or image files")
    p.add_argument("-o", "--output", required=True,
                   help="results file: .csv, .jsonl or .parquet (needs pyarrow)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running hopgate service, e.g. http://127.0.0.1:8000")
    where.add_argument("--bundle", type=Path, help="score in process with this bundle (.onnx)")
    p.add_argument("--api-key", default=os.environ.get("HOPGATE_API_KEY"),
                   help="the service's API key (default: $HOPGATE_API_KEY)")
    p.add_argument("--batch-size", type=int, default=32, help="images per request (32)")
    p.add_argument("--concurrency", type=int, default=2, help="requests in flight (2)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (60)")
    p.add_argument("--limit", type=int, help="screen at most this many new images, then stop")
    p.add_argument("--top", type=int, default=24, help="most OOD images in the summary (24)")
    p.add_argument("--fresh", action="store_true", help="drop earlier results and start over")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    return p


def summary_paths(output: Path) -> tuple[Path, Path]:
    base = output.with_suffix("")
    return base.with_name(base.name + ".summary.json"), base.with_name(base.name + ".summary.html")


async def run(args: argparse.Namespace, in_process: InProcess | None = None) -> Stats:
    output = Output(args.output)
    if args.fresh:
        output.remove()
    paths = list_inputs(args.inputs)
    t0 = time.perf_counter()
    if args.bundle is not None:
        if in_process is None:
            raise OutputError("--bundle needs the service (pip install hopgate[serve,cpu]); "
                              "run the hopgate-screen command")
        backend = in_process(args.bundle, args.batch_size)
    else:
        backend = remote(args.url, args.api_key, args.timeout)
    async with backend as client:
        startup = time.perf_counter() - t0
        stats = await screen(paths, output, client, args.batch_size, args.concurrency,
                             args.limit, progress=not args.quiet)
    stats.startup_s = startup
    return stats


def url_problem(url: str) -> str | None:
    """--url is the service's origin: a scheme, a host and a port, no path."""
    if "://" not in url:
        return f"--url {url!r} has no scheme: write http://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"--url {url!r}: give an http:// or https:// address, e.g. http://127.0.0.1:8000"
    if parts.path.strip("/") or parts.query or parts.fragment:
        return (f"--url {url!r} is not a bare origin: give the service's root, "
                f"{parts.scheme}://{parts.netloc} (hopgate-screen calls /score itself)")
    return None


def main(argv: list[str] | None = None, in_process: InProcess | None = None,
         check_bundle: Callable[[Path], object] | None = None) -> int:
    """``check_bundle``: refuses a bad --bundle with a BundleError before anything is read or
    loaded (the service's runtime.check_bundle, as hopgate-serve uses it)."""
    args = parser().parse_args(argv)
    try:  # a wrong address or bundle: one line, exit 2, before any work
        problem = url_problem(args.url) if args.url is not None else None
        if args.bundle is not None and check_bundle is not None:
            check_bundle(args.bundle)
    except BundleError as e:
        problem = str(e)
    if problem:
        print(f"hopgate-screen: {problem}", file=sys.stderr)
        return 2
    try:
        stats = asyncio.run(run(args, in_process))
    except (OutputError, FileNotFoundError, ScoreError) as e:
        print(f"hopgate-screen: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hopgate-screen: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    summary = summarise(Output(args.output).rows(), args.top)
    summary["run"] = {**asdict(stats), "images_per_s": round(stats.images_per_s, 1)}
    json_path, html_path = summary_paths(Path(args.output))
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    html_path.write_text(page(summary, f"hopgate-screen: {Path(args.output).name}"))
    if not args.quiet:
        print(text(summary))
        print(f"this run: {stats.screened} screened, {stats.skipped} already done, "
              f"{stats.images_per_s:.0f} images/s; summary: {json_path}, {html_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
