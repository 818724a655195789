"""mesh.netns: entering a namespace through libc's setns(2)."""

from __future__ import annotations

import errno
import os

import pytest

from mesh import netns
from mesh.netns import Netns, NetnsClosed, entered, socket_in


def test_a_bad_fd_raises_with_errno() -> None:
    with pytest.raises(OSError) as caught:
        netns._setns(-1)
    assert caught.value.errno == errno.EBADF


def test_a_closed_handle_is_never_entered() -> None:
    ns = Netns.open("/proc/self/ns/net")
    ns.close()
    with pytest.raises(NetnsClosed), entered(ns):
        pass


@pytest.mark.skipif(os.geteuid() != 0, reason="setns needs CAP_SYS_ADMIN")
def test_socket_made_in_a_namespace_and_the_thread_back_home() -> None:
    home = os.stat("/proc/thread-self/ns/net").st_ino
    with Netns.open("/proc/self/ns/net") as ns:
        sock = socket_in(ns, bind=("127.0.0.1", 0))
    with sock:
        assert sock.getsockname()[0] == "127.0.0.1"
    assert os.stat("/proc/thread-self/ns/net").st_ino == home
