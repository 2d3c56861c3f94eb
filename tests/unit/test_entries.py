"""The idle-socket check of each pooled connection (``herokupool._entries._poll_of``): the
same answer as ``select.poll``, without letting go of the GIL."""

from __future__ import annotations

import functools
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from herokupool import _entries
from tests.unit.test_pool import make_pool

pytestmark = pytest.mark.skipif(_entries._libc_poll is None, reason="no ctypes poll()")


def _select_poll(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _check(fd: int) -> Callable[[], Any]:
    """The pool's check of the socket ``fd``."""
    check = _entries._poll_of(fd, lambda number: number)
    assert check is not None
    return check


def _held_poll(fd: int) -> bool:
    return bool(_check(fd)())


def _quiet(ours: socket.socket, peer: socket.socket) -> None:
    pass


def _data(ours: socket.socket, peer: socket.socket) -> None:
    peer.sendall(b"N")  # a notification, a parameter change, a FATAL


def _peer_closed(ours: socket.socket, peer: socket.socket) -> None:
    peer.close()  # the server ended the session


def _peer_reset(ours: socket.socket, peer: socket.socket) -> None:
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    peer.close()


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        ours = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
    yield ours, peer
    ours.close()
    peer.close()


@pytest.mark.parametrize("event", [_quiet, _data, _peer_closed, _peer_reset])
def test_the_check_answers_as_select_poll(
    tcp_pair: tuple[socket.socket, socket.socket],
    event: Callable[[socket.socket, socket.socket], None],
) -> None:
    ours, peer = tcp_pair
    event(ours, peer)
    time.sleep(0.02)  # loopback delivery
    assert _held_poll(ours.fileno()) == _select_poll(ours.fileno()) == (event is not _quiet)


@pytest.mark.parametrize("event", [_quiet, _data, _peer_closed])
def test_without_ctypes_the_check_is_select_poll(
    tcp_pair: tuple[socket.socket, socket.socket],
    event: Callable[[socket.socket, socket.socket], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_entries, "_libc_poll", None)
    ours, peer = tcp_pair
    check = _check(ours.fileno())
    assert isinstance(check, functools.partial)
    assert getattr(check.func, "__self__", None).__class__ is select.poll().__class__
    event(ours, peer)
    time.sleep(0.02)  # loopback delivery
    assert bool(check()) == (event is not _quiet)


def test_a_descriptor_closed_under_the_check_reads_as_something_to_check() -> None:
    # POLLNVAL: truthy, so the pool checks the connection with a query (which then fails).
    ours, peer = socket.socketpair()
    number = ours.fileno()
    check = _check(number)
    ours.close()
    peer.close()
    assert check()


def test_pooled_connections_are_checked_with_it() -> None:
    pool = make_pool()
    pool.release(pool.borrow())
    check = pool._entries.idle[-1].poll
    assert isinstance(check, functools.partial)
    assert check.func is _entries._libc_poll


def test_the_check_never_lets_another_thread_run() -> None:
    """With a switch interval of 100 s, another thread gets the GIL only when this one lets
    go of it: 20,000 checks must not let it run once; select.poll() (the control) does."""
    ours, peer = socket.socketpair()
    held = _check(ours.fileno())
    control = select.poll()
    control.register(ours.fileno(), select.POLLIN)
    ran = 0
    stop = False

    def other() -> None:
        nonlocal ran
        while not stop:
            ran += 1
            time.sleep(0)  # lets go of the GIL, then waits for it

    interval = sys.getswitchinterval()
    sys.setswitchinterval(100)
    thread = threading.Thread(target=other)
    try:
        thread.start()
        time.sleep(0.01)  # started, and now waiting for the GIL
        before = ran
        for _ in range(20_000):
            held()
        during_held = ran - before
        before = ran
        for _ in range(20_000):
            control.poll(0)
        during_control = ran - before
    finally:
        stop = True
        sys.setswitchinterval(interval)
        thread.join()
        ours.close()
        peer.close()
    assert during_held == 0
    assert during_control > 0, "the control let go of the GIL without the other thread running"
