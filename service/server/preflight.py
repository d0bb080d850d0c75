"""Checks ``hopgate-serve`` makes before it loads anything: each mistake gets one line naming it
and the fix (the command exits 2), instead of a traceback, a silently ignored setting, or a
server that loads and warms the model and then fails on its port or on every request.
"""

from __future__ import annotations

import difflib
import re
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path

PREFIX = "HOPGATE_"
# HOPGATE_ variables that are not service settings: the worker supervisor's inherited sockets
# (workers.py) and the scripts' and tests' own knobs (scripts/test, scripts/build-image,
# tests/service/test_page.py)
NOT_SETTINGS = frozenset({"HOPGATE_LISTEN_FD", "HOPGATE_ADMIN_FD", "HOPGATE_BOARD_FD",
                          "HOPGATE_WORKER_INDEX", "HOPGATE_SKIP_LINT",
                          "HOPGATE_IMAGE", "HOPGATE_DEBIAN_MIRROR", "HOPGATE_SCREENSHOTS"})
# what Kubernetes injects for a Service whose name starts with "hopgate" (service links:
# HOPGATE_SERVICE_HOST, HOPGATE_PORT_8000_TCP_ADDR ...); not ours to refuse
SERVICE_LINK = re.compile(r"_SERVICE_(HOST|PORT)(_|$)|_PORT_\d+_(TCP|UDP|SCTP)(_|$)")
LEVELS = ("critical", "error", "warning", "info", "debug")


def unknown_variable(environ: Mapping[str, str], settings: Iterable[str]) -> str | None:
    """The first HOPGATE_ variable that is no setting, with the closest setting's name."""
    known = sorted(PREFIX + name.upper() for name in settings)
    for name in sorted(environ):
        if (not name.startswith(PREFIX) or name in known or name in NOT_SETTINGS
                or SERVICE_LINK.search(name)
                or re.fullmatch(r"[a-z]+://.*", environ[name]) and name.endswith("_PORT")):
            continue
        # compared without the shared prefix, which would make every name look alike
        close = difflib.get_close_matches(name.removeprefix(PREFIX),
                                          [k.removeprefix(PREFIX) for k in known], n=1,
                                          cutoff=0.5)
        hint = (f"did you mean {PREFIX}{close[0]}?" if close
                else "the settings are in docs/serving.md")
        return f"{name} is not a setting; {hint}"
    return None


def log_level_problem(level: str) -> str | None:
    if level.lower() in LEVELS:
        return None
    return f"--log-level {level!r} is not a level; use one of {', '.join(LEVELS)}"


def api_key_file_problem(path: Path | None) -> str | None:
    """The key file must be readable and hold a key: a server that cannot read it would answer
    500 to every request, and an empty one would serve without a key."""
    if path is None:
        return None
    try:
        key = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return f"HOPGATE_API_KEY_FILE={str(path)!r}: cannot read the API key file ({why})"
    if not key:
        return (f"HOPGATE_API_KEY_FILE={str(path)!r}: the API key file is empty; write the key "
                "into it, or unset the variable to serve without a key")
    return None


def port_problem(host: str, ports: Mapping[str, int | None]) -> str | None:
    """A port another process listens on (or we may not bind), found before the model loads;
    bound with SO_REUSEADDR as uvicorn does, so a port in TIME_WAIT is not reported busy.
    ``ports``: the flag that sets each port (its variable is HOPGATE_ + its name) -> port."""
    for flag, port in ports.items():
        if not port:  # None: not used; 0: the kernel picks a free one
            continue
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(addr)
        except OSError as e:
            why = e.strerror or str(e)
            env = PREFIX + flag.removeprefix("--").replace("-", "_").upper()
            return (f"cannot listen on {host} port {port} ({why}): stop what holds it or "
                    f"choose another ({flag}, {env})")
    return None
