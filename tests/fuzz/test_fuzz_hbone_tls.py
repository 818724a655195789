"""Fuzz target: the HBONE server's TLS layer, a real `serve()` on loopback with real certs.

A raw TCP client sends random bytes or a real TLS 1.3 ClientHello (made by our own client
context) mutated: bytes flipped, cut short, record length rewritten, garbage appended,
sent twice; then either half-closes or just waits. Properties: the server closes the
connection within the handshake timeout (plus slack), reports nothing to the loop's
exception handler, and still serves a well-behaved mTLS client afterwards. Each example is
a real connection, so the count is kept small; runs on asyncio's loop and on uvloop
(what ztunnel uses), whose TLS implementations differ.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any

import pytest
import uvloop
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from mesh.hbone.connection import HboneClientConnection, serve
from mesh.hbone.limits import HboneLimits
from mesh.tls import client_context, server_context
from tests.fuzz.profiles import examples
from tests.unit.hbone_rig import SERVER_ID, echo, make_pki, read_all

PKI = make_pki()
LIMITS = HboneLimits(handshake_timeout=0.3, preface_timeout=0.5)
# A peer must be gone by then: the handshake deadline, plus a loaded CI machine's slack.
CLOSE_WITHIN = LIMITS.handshake_timeout + 3.0


def client_hello() -> bytes:
    """The first flight of our own HBONE client: one TLS record holding a ClientHello."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(PKI.client).wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HELLO = client_hello()


@st.composite
def _first_bytes(draw: st.DrawFn) -> bytes:
    hello = bytearray(HELLO)
    shape = draw(st.sampled_from(["random", "flipped", "cut", "length", "tail", "twice"]))
    if shape == "random":
        return draw(st.binary(min_size=1, max_size=400))
    if shape == "flipped":
        for _ in range(draw(st.integers(1, 8))):
            hello[draw(st.integers(0, len(hello) - 1))] ^= draw(st.integers(1, 255))
    elif shape == "cut":
        del hello[draw(st.integers(1, len(hello) - 1)) :]
    elif shape == "length":  # the record header's length field
        hello[3:5] = draw(st.integers(0, 2**16 - 1)).to_bytes(2, "big")
    elif shape == "tail":
        hello += draw(st.binary(min_size=1, max_size=200))
    else:
        hello += HELLO
    return bytes(hello)


async def attack(address: tuple[str, int], data: bytes, half_close: bool) -> None:
    """Send `data`, and require the server to close the connection in time."""
    reader, writer = await asyncio.open_connection(*address)
    started = asyncio.get_running_loop().time()
    try:
        writer.write(data)
        if half_close:
            writer.write_eof()
        async with asyncio.timeout(CLOSE_WITHIN):
            while await reader.read(65536):
                pass
    except ConnectionError:
        pass  # reset by the server: closed too
    finally:
        writer.transport.abort()
    waited = asyncio.get_running_loop().time() - started
    event("closed by the deadline" if waited >= LIMITS.handshake_timeout else "closed at once")


async def well_behaved_client(address: tuple[str, int]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn = await HboneClientConnection.connect(
        sock, client_context(PKI.client), SERVER_ID, address=address, timeout=CLOSE_WITHIN
    )
    try:
        stream = await conn.open_stream("10.0.0.7:80")
        stream.write(b"still serving")
        stream.write_eof()
        assert await read_all(stream) == b"still serving"
    finally:
        conn.close()
        await asyncio.wait_for(conn.wait_closed(), CLOSE_WITHIN)


@pytest.mark.parametrize(
    "loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
def test_tls_server_survives_any_records(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    reported: list[dict[str, Any]] = []
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.get_loop().set_exception_handler(lambda _, ctx: reported.append(ctx))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sock.setblocking(False)
        address = sock.getsockname()[:2]
        server = runner.run(serve(sock, server_context(PKI.server), echo, limits=LIMITS))

        @settings(max_examples=examples(0.1))
        @given(_first_bytes(), st.booleans())
        @example(HELLO, False)  # a valid hello, then silence: the deadline ends it
        @example(HELLO[:40], False)  # a record that never completes
        def check(data: bytes, half_close: bool) -> None:
            runner.run(attack(address, data, half_close))
            runner.run(well_behaved_client(address))
            assert not reported, f"the loop reported errors: {reported}"

        try:
            check()
        finally:
            server.close()
            runner.run(asyncio.wait_for(server.wait_closed(), CLOSE_WITHIN))
