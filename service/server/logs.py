"""The server's log: one JSON object per line on stdout, written once per event-loop pass.

``JsonFormatter``: every record as ``{"time", "level", "logger", ...}``; the access line's
fields (app.py) merged in, formatted once; a message that is itself JSON merged too.

``PassHandler``: the lines logged during one pass of the event loop are joined and written
with one ``write``, at the end of that pass (``call_soon``), not each with its own. At c=32 a
batch answers ~16 requests in one pass: ~16 access lines, one system call instead of 16 (the
write was 0.8 % of the server's CPU, py-spy, issue 24). A line reaches stdout microseconds
after it is logged, not after a timer (``kubectl logs`` and the tests read them at once);
a line logged where no loop runs (the supervisor, start-up, a decode thread) is written at
once, after any still pending, so the order holds. ``flush`` (logging's shutdown) writes
what is pending.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TextIO


class JsonFormatter(logging.Formatter):
    _second, _stamp = -1, ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """logging's default time format, the date part formatted once a second (one line
        per request: strftime each time cost as much as the rest of the line)."""
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime(
                "%Y-%m-%d %H:%M:%S", self.converter(second))
        return f"{self._stamp},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        doc = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name}
        access = record.__dict__.get("access")
        if isinstance(access, dict):  # app.py's access line: its fields, formatted once
            doc.update(access)
        elif msg.startswith("{"):
            try:
                doc.update(json.loads(msg))
            except ValueError:
                doc["message"] = msg
        else:
            doc["message"] = msg
        for key in ("request_id", "path"):  # set with logging's extra= (app.py's 500s)
            if key in record.__dict__:
                doc[key] = record.__dict__[key]
        if record.exc_info:  # the traceback of an unhandled error, in the same JSON line
            doc["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class PassHandler(logging.StreamHandler):
    def __init__(self, stream: TextIO):
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:  # under self.lock (Handler.handle)
        try:
            self._pending.append(self.format(record) + self.terminator)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop in this thread: now
                self._write()
                return
            if not self._scheduled:
                self._scheduled = True
                loop.call_soon(self._end_of_pass)
        except Exception:
            self.handleError(record)

    def _end_of_pass(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._scheduled = False
            self._write()

    def _write(self) -> None:
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            self.stream.write(text)
            self.stream.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()
            super().flush()
