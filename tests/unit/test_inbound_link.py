"""ztunnel/inbound._Link: the future the HBONE server awaits for a tunnel follows its
admission, then its relay, and cancelling it stops whichever runs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ztunnel.inbound import _EMPTY_CONTEXT, _Link


def linked(admit: Any) -> tuple[asyncio.Future[None], asyncio.Task[Any]]:
    """What `inbound.handle` builds around an admission coroutine."""
    end: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    admission = asyncio.ensure_future(admit)
    link = _Link(end, admission)
    end.add_done_callback(link, context=_EMPTY_CONTEXT)
    admission.add_done_callback(link, context=_EMPTY_CONTEXT)
    return end, admission


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_refused_tunnel_ends_with_its_admission() -> None:
    async def refused() -> None:
        return None

    end, _ = linked(refused())
    await asyncio.wait_for(end, 5)


async def test_an_admitted_tunnel_ends_with_its_relay_and_no_task_runs_meanwhile() -> None:
    relaying: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def admitted() -> asyncio.Future[Any]:
        return relaying

    end, admission = linked(admitted())
    await settle()
    assert admission.done() and not end.done()
    relaying.set_result((1, 2))
    await asyncio.wait_for(end, 5)


async def test_cancelling_the_end_stops_the_admission_or_the_relay() -> None:
    gate = asyncio.Event()

    async def slow() -> None:
        await gate.wait()

    end, admission = linked(slow())
    await settle()
    end.cancel()  # the peer reset the stream before it was answered
    await settle()
    assert admission.cancelled()

    relaying: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def admitted() -> asyncio.Future[Any]:
        return relaying

    end, _ = linked(admitted())
    await settle()
    end.cancel()
    await settle()
    assert relaying.cancelled()


async def test_an_admission_error_is_the_end_s_error() -> None:
    async def failing() -> None:
        raise RuntimeError("app socket")

    end, _ = linked(failing())
    with pytest.raises(RuntimeError, match="app socket"):
        await asyncio.wait_for(end, 5)


async def test_a_relay_that_is_a_task_ends_the_tunnel_too() -> None:
    """A relay between duplexes that cannot push runs as a task: still the relay."""
    gate = asyncio.Event()

    async def pumping() -> tuple[int, int]:
        await gate.wait()
        return (0, 0)

    relaying = asyncio.ensure_future(pumping())

    async def admitted() -> asyncio.Future[Any]:
        return relaying

    end, _ = linked(admitted())
    await settle()
    assert not end.done()
    gate.set()
    await asyncio.wait_for(end, 5)
