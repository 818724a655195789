"""The access log's handler (waypoint/access_log.py): the lines of one loop iteration go
out in one write at its end, formatted and in order; without a running loop, or from
another thread, at once."""

from __future__ import annotations

import asyncio
import io
import logging
import threading

from waypoint.access_log import LoopBatchedHandler


class Stream(io.StringIO):
    """Counts writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def logger(handler: logging.Handler) -> logging.Logger:
    log = logging.getLogger(f"test.access.{id(handler)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.addHandler(handler)
    return log


def test_one_write_per_loop_iteration() -> None:
    async def run() -> tuple[int, str, int, str]:
        stream = Stream()
        log = logger(LoopBatchedHandler(asyncio.get_running_loop(), stream))
        for i in range(3):
            log.info("line %d", i)
        before = (stream.writes, stream.getvalue())
        await asyncio.sleep(0)  # the iteration ends
        return (*before, stream.writes, stream.getvalue())

    writes_before, text_before, writes, text = asyncio.run(run())
    assert (writes_before, text_before) == (0, "")
    assert writes == 1
    assert text == "INFO line 0\nINFO line 1\nINFO line 2\n"


def test_without_a_running_loop_or_from_another_thread_at_once() -> None:
    loop = asyncio.new_event_loop()
    try:
        stream = Stream()
        log = logger(LoopBatchedHandler(loop, stream))
        log.info("no loop running")
        assert stream.getvalue() == "INFO no loop running\n"

        async def from_thread() -> None:
            thread = threading.Thread(target=log.info, args=("from a thread",))
            thread.start()
            thread.join()
            assert stream.getvalue().endswith("INFO from a thread\n")

        loop.run_until_complete(from_thread())
    finally:
        loop.close()


def test_flush_writes_what_is_pending() -> None:
    async def run() -> str:
        stream = Stream()
        handler = LoopBatchedHandler(asyncio.get_running_loop(), stream)
        logger(handler).info("pending")
        handler.flush()  # as the waypoint does on its way out
        return stream.getvalue()

    assert asyncio.run(run()) == "INFO pending\n"
