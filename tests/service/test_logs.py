"""The server's log handler (service/server/logs.py): the lines of one event-loop pass go out
in one write at the end of that pass, in order; lines logged where no loop runs go at once.
Fast tier: a recording stream, no server."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

from hopgate.service.server.logs import JsonFormatter, PassHandler


class Recording:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


def _logger(stream: Recording) -> logging.Logger:
    log = logging.getLogger(f"test-pass-{id(stream)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    handler = PassHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(JsonFormatter())
    log.handlers = [handler]
    return log


def test_one_pass_of_lines_is_one_write_at_the_end_of_the_pass():
    """Mutation caught: each line written at once (16 writes for a batch's 16 answers)."""
    stream = Recording()
    log = _logger(stream)

    async def pass_of_answers() -> list[str]:
        for i in range(16):
            log.info("access", extra={"access": {"request_id": f"r{i}", "status": 200}})
        during = list(stream.writes)  # nothing yet: the pass is not over
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return during

    assert asyncio.run(pass_of_answers()) == []
    assert len(stream.writes) == 1
    lines = stream.writes[0].splitlines()
    assert [json.loads(x)["request_id"] for x in lines] == [f"r{i}" for i in range(16)]


def test_lines_without_a_loop_go_at_once_after_what_is_pending():
    """A decode thread's line while the loop's are pending: the pending ones first, then it,
    in one write; and with no loop at all, each line at once."""
    stream = Recording()
    log = _logger(stream)
    log.info("no loop here")
    assert len(stream.writes) == 1 and json.loads(stream.writes[0])["message"] == "no loop here"

    async def loop_then_thread() -> None:
        log.info("from the loop")
        t = threading.Thread(target=log.warning, args=("from a thread",))
        t.start()
        t.join()
        await asyncio.sleep(0)

    asyncio.run(loop_then_thread())
    assert len(stream.writes) == 2
    later = [json.loads(x)["message"] for x in stream.writes[1].splitlines()]
    assert later == ["from the loop", "from a thread"]


def test_flush_writes_what_is_pending():
    """logging.shutdown at exit calls flush: a pass's lines are not lost with the loop."""
    stream = Recording()
    log = _logger(stream)

    async def log_and_flush() -> list[str]:
        log.info("last words")
        log.handlers[0].flush()
        return list(stream.writes)  # before the pass ends

    written = asyncio.run(log_and_flush())
    assert [json.loads(x)["message"] for x in "".join(written).splitlines()] == ["last words"]
