"""The deadline watchdog on real socket pairs: it cuts a socket still in use when the
deadline passes, and never one whose deadline was disarmed in time."""

from __future__ import annotations

import os
import select
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest

from herokupool import _deadline
from herokupool._deadline import Deadline


def test_a_blocked_read_is_cut_at_the_deadline() -> None:
    client, server = socket.socketpair()
    try:
        began = time.monotonic()
        with Deadline(client.fileno(), 0.1) as limit:
            readable, _, _ = select.select([client], [], [], 5)
            assert client.recv(1) == b"", "shut down: the blocked reader sees end of file"
        assert readable == [client]
        assert time.monotonic() - began < 5
        assert limit.expired
    finally:
        client.close()
        server.close()


def test_a_deadline_disarmed_in_time_never_cuts() -> None:
    client, server = socket.socketpair()
    try:
        with Deadline(client.fileno(), 0.05) as limit:
            pass
        assert not limit.expired
        time.sleep(0.15)
        server.sendall(b"x")
        assert client.recv(1) == b"x", "the socket still works after its deadline passed"
    finally:
        client.close()
        server.close()


def test_disarm_works_before_arming_and_twice() -> None:
    # An asynchronous exception inside __enter__ skips __exit__: callers disarm in a
    # finally, which must be safe whether or not arming happened.
    client, server = socket.socketpair()
    try:
        limit = Deadline(client.fileno(), 0.05)
        assert limit.disarm() is False
        assert limit.disarm() is False
        time.sleep(0.1)
        server.sendall(b"x")
        assert client.recv(1) == b"x"
    finally:
        client.close()
        server.close()


def test_the_earliest_deadline_fires_first_whatever_the_order_of_arming() -> None:
    late_client, late_server = socket.socketpair()
    early_client, early_server = socket.socketpair()
    try:
        with Deadline(late_client.fileno(), 30) as late:
            with Deadline(early_client.fileno(), 0.05) as early:
                select.select([early_client], [], [], 5)
            assert early.expired
        assert not late.expired
    finally:
        for sock in (late_client, late_server, early_client, early_server):
            sock.close()


def test_a_deadline_never_cuts_a_socket_that_reused_the_descriptor() -> None:
    # libpq closes its socket when the server drops the connection; another socket may then get
    # the same descriptor number before the pool disarms the deadline.
    client, server = socket.socketpair()
    limit = Deadline(client.fileno(), 0.05)
    limit.__enter__()
    number = client.fileno()
    client.close()
    server.close()
    other, peer = socket.socketpair()
    try:
        if other.fileno() != number:  # make sure the number is reused, as it would be
            os.dup2(other.fileno(), number)
            other.close()
            other = socket.socket(fileno=number)
        time.sleep(0.3)  # the deadline passes while the number belongs to ``other``
        limit.disarm()
        other.sendall(b"x")
        assert peer.recv(1) == b"x", "the unrelated socket still carries data"
        peer.sendall(b"y")
        assert other.recv(1) == b"y"
    finally:
        limit.disarm()
        other.close()
        peer.close()


def test_disarming_leaves_no_descriptor_behind() -> None:
    client, server = socket.socketpair()
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            with Deadline(client.fileno(), 5):
                pass
        with Deadline(client.fileno(), 0.01) as limit:
            time.sleep(0.2)
        assert limit.expired
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        client.close()
        server.close()


class _Interrupted(BaseException):
    """What a signal handler raises (KeyboardInterrupt, Celery's SoftTimeLimitExceeded)."""


_ARM = _deadline._Watchdog.arm.__code__
_ARM_LINES = sorted({line for _, _, line in _ARM.co_lines() if line and line > _ARM.co_firstlineno})


@pytest.mark.parametrize("asleep", ["without a deadline", "until a later deadline"])
@pytest.mark.parametrize("line", _ARM_LINES)
def test_an_interrupted_arming_never_stalls_later_deadlines(line: int, asleep: str) -> None:
    # An exception landing anywhere in arm() (a signal handler's, in the thread that arms)
    # may leave a deadline queued that the watchdog was not woken for; its caller disarms it
    # in a finally. The watchdog sleeps without a timeout, or until a deadline later than
    # the next one: the next deadline armed must still be kept.
    watchdog = _deadline._Watchdog()
    client, server = socket.socketpair()
    late_client, late_server = socket.socketpair()
    try:
        watchdog.arm(1, client.fileno(), time.monotonic() + 0.01)
        _wait_for(lambda: 1 in watchdog._cut)  # the thread exists and has run
        watchdog.disarm(1)
        if asleep == "until a later deadline":
            watchdog.arm(2, late_client.fileno(), time.monotonic() + 60)
        _wait_for(lambda: len(watchdog._cond._waiters) == 1)

        def trace(frame: FrameType, event: str, arg: Any) -> Any:
            if frame.f_code is not _ARM:
                return None
            if event == "line" and frame.f_lineno == line:
                frame.f_trace = None
                raise _Interrupted
            return trace

        sys.settrace(trace)
        try:
            watchdog.arm(3, client.fileno(), time.monotonic() + 0.01)
        except _Interrupted:
            pass
        finally:
            sys.settrace(None)
        watchdog.disarm(3)  # as Deadline's callers do in a finally
        client.close()
        server.close()

        client, server = socket.socketpair()
        watchdog.arm(4, client.fileno(), time.monotonic() + 0.05)
        readable, _, _ = select.select([client], [], [], 5)
        assert readable == [client], f"interrupted at line {line}: a later deadline was not kept"
        assert watchdog.disarm(4) is True
        assert watchdog.disarm(2) is False, "the later deadline was cut early"
    finally:
        for key in (2, 4):
            watchdog.disarm(key)
        for sock in (client, server, late_client, late_server):
            sock.close()


def _wait_for(condition: Callable[[], bool], limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
