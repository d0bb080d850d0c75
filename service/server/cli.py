"""``hopgate-serve``: start the service (settings: environment HOPGATE_*, then these flags).

SIGTERM/SIGINT: /readyz fails at once, new work is refused (503, reason ``shutdown``), every
request admitted before the signal (reading its body, decoding, queued or computing:
admission.py) is answered normally (at most ``drain_seconds``), then uvicorn exits 0. A second
signal exits at once. Connection limits and timeouts come from transport.py. With
more than one worker (``HOPGATE_WORKERS``; 0, the default: one per usable core, chosen and
logged by workers.choose) it supervises that many such servers on one port (workers.py).

A bad setting or bundle ends the command with one line naming the variable or file and the fix
(exit 2); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError

from hopgate.bundle import BundleError

from ..config import Settings
from ..runtime import cuda
from ..runtime.session import check_bundle
from .logs import JsonFormatter, PassHandler
from .memory import freeze_start_up, return_freed_memory
from .preflight import api_key_file_problem, log_level_problem, port_problem, unknown_variable
from .transport import uvicorn_options
from .workers import ADMIN_FD, LISTEN_FD, choose, inherited_socket, listen_socket, supervise

if TYPE_CHECKING:
    from fastapi import FastAPI


def one_blas_thread() -> None:
    """NumPy's BLAS on the calling thread only. The server's only matrix products are the
    resize's small ones (hopgate/resample.py: 112 x 112 x 28 for the default bundle), and
    OpenBLAS splits any product above 2**18 multiply-adds over a pool of threads that keep
    spinning after it returns: CPU the worker's one core should spend on requests."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain between the signal and the exit."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float,
                 quiet_seconds: float):
        super().__init__(config)
        self.hopgate_app, self.drain_seconds, self.quiet = app, drain_seconds, quiet_seconds
        self._draining = False

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started:  # the bundle is loaded: what exists now lives as long as the server
            freeze_start_up()
            one_blas_thread()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:  # second signal: leave now
            return super().handle_exit(sig, frame)
        self._draining = True
        self.hopgate_app.state.draining = True  # /readyz fails from here on
        logging.getLogger("hopgate").info("signal %s: draining for at most %.1fs", sig,
                                          self.drain_seconds)
        asyncio.get_event_loop().call_soon_threadsafe(
            lambda: asyncio.ensure_future(self._drain_then_exit(sig, frame)))

    async def _drain_then_exit(self, sig: int, frame: FrameType | None) -> None:
        state, t0 = self.hopgate_app.state, time.monotonic()
        admission = getattr(state, "admission", None)
        if admission is not None:  # every request admitted before the signal gets its answer
            await admission.drain(self.drain_seconds)
        batcher = getattr(state, "batcher", None)
        if batcher is not None:
            await batcher.drain(max(self.drain_seconds - (time.monotonic() - t0), 0.0))
        # keep listening (and answering 503 "shutdown", Connection: close) until clients have
        # gone quiet, so no request is cut off by the listener closing under it
        while (time.monotonic() - getattr(state, "last_request", 0.0) < self.quiet
               and time.monotonic() - t0 < self.drain_seconds):
            await asyncio.sleep(0.05)
        super().handle_exit(sig, frame)
        # drained: exit 0 (uvicorn would re-raise the signal after shutdown, dying by it)
        self._captured_signals.clear()


ENV_PREFIX = "HOPGATE_"
FLAGS = {"host": "--host", "port": "--port", "model": "--model", "admin_port": "--admin-port"}


def _as_json(value: str) -> str:
    """The JSON list a comma-separated value probably meant: 1,2,4 -> [1,2,4]."""
    items = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    try:
        return json.dumps([int(v) for v in items], separators=(",", ":"))
    except ValueError:
        return json.dumps(items, separators=(",", ":"))


def settings_problem(e: ValidationError | SettingsError, flags: dict[str, object]) -> str:
    """One line per bad setting: where it came from (variable or flag), what is wrong, the fix."""
    if isinstance(e, SettingsError):  # a list/dict variable that is not JSON
        field = str(e).split('"')[1] if '"' in str(e) else "?"
        env = ENV_PREFIX + field.upper()
        value = os.environ.get(env, "")
        return (f"{env}={value!r} is not valid JSON: this setting is a list, write it as JSON, "
                f"e.g. {env}='{_as_json(value)}'")
    problems = []
    for err in e.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        where = FLAGS[field] if field in flags else ENV_PREFIX + field.upper()
        msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"{where}={err.get('input')!r}: {msg}")
    return "; ".join(problems) + " (settings: docs/serving.md)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hopgate-serve", description=__doc__)
    ap.add_argument("--host", help="bind address (default 127.0.0.1; 0.0.0.0 in containers)")
    ap.add_argument("--port", type=int, help="port (default 8000)")
    ap.add_argument("--model", help="bundle path (default: the bundled models/default.onnx)")
    ap.add_argument("--admin-port", type=int, help="hopgate's own endpoints in sidecar mode "
                    "(HOPGATE_PROXY_ROUTES: the main port belongs to the classifier)")
    ap.add_argument("--log-level", default="info", help="critical, error, warning, info "
                    "(default) or debug")
    ap.add_argument("--debug", action="store_true", help="show tracebacks instead of one line")
    args = ap.parse_args(argv)
    early = (log_level_problem(args.log_level)  # preflight.py: one line each, nothing loaded
             or unknown_variable(os.environ, Settings.model_fields))
    if early:
        print(f"hopgate-serve: {early}", file=sys.stderr)
        return 2
    flags = {"host": args.host, "port": args.port, "model": args.model,
             "admin_port": args.admin_port}
    overrides = {k: v for k, v in flags.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except (ValidationError, SettingsError) as e:
        if args.debug:
            raise
        print(f"hopgate-serve: setting error: {settings_problem(e, overrides)}", file=sys.stderr)
        return 2

    handler = PassHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler], force=True)
    # the JSON lines use none of these: no stack walk, thread or process lookup per record
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False

    # a worker inherits its sockets (workers.py); the first process checks the ports are free
    ports = {} if os.environ.get(LISTEN_FD) else {  # (a socket object here would close it)
        "--port": settings.port, "--admin-port": settings.admin_port}
    late = api_key_file_problem(settings.api_key_file) or port_problem(settings.host, ports)
    if late:
        print(f"hopgate-serve: {late}", file=sys.stderr)
        return 2
    try:
        check_bundle(settings.model)  # metadata vs graph: one clear refusal, no traceback
    except BundleError as e:
        print(f"hopgate-serve: {e}", file=sys.stderr)
        return 2
    workers, sock = 1, inherited_socket()
    if sock is None:  # not a worker: how many (workers.choose), said in one line
        import onnxruntime

        # a GPU build with no GPU visible: said once here, and every worker serves on the CPU
        offered = onnxruntime.get_available_providers()
        chosen = cuda.choose(onnxruntime, settings.providers, load=False)
        if any(p in offered and p not in chosen for p in cuda.GPU_PROVIDERS
               if p in settings.providers):
            settings.providers = chosen
            os.environ["HOPGATE_PROVIDERS"] = json.dumps(chosen)
        workers, why = choose(settings.workers, settings.providers,
                              onnxruntime.get_available_providers(),
                              settings.model.stat().st_size)
        logging.getLogger("hopgate").info(why)
    sockets = [sock] if sock is not None else None
    try:
        if workers > 1 and sock is None:  # the supervisor: N workers on the sockets (workers.py)
            return supervise(settings.host, settings.port, workers,
                             sys.argv[1:] if argv is None else argv, settings.admin_port)
        admin = inherited_socket(ADMIN_FD)
        if sock is None and settings.admin_port is not None:  # one server, two sockets
            sockets = [listen_socket(settings.host, settings.port),
                       listen_socket(settings.host, settings.admin_port)]
        elif sock is not None and admin is not None:
            sockets = [sock, admin]
    except OSError as e:  # a port taken or not ours to bind
        print(f"hopgate-serve: cannot listen on {settings.host} (port {settings.port}, "
              f"admin port {settings.admin_port}): {e.strerror or e}", file=sys.stderr)
        return 2
    return_freed_memory()  # RSS falls back after a burst of big bodies or images
    from ..app import create_app  # FastAPI's import (~0.5 s): not in the supervisor's path

    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            access_log=False, **uvicorn_options(settings))
    server = DrainingServer(config, app, settings.drain_seconds, settings.drain_quiet_seconds)
    server.run(sockets=sockets)
    return 0 if server.started else 3  # 3: startup failed (uvicorn's code for it)


if __name__ == "__main__":
    sys.exit(main())
