"""devtools.relay: forwards, goes silent without closing, forwards again, closes."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from devtools.relay import TcpRelay


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    """A loopback echo server: each connection gets back what it sends."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[:2]
    listener.close()
    for conn in accepted:
        with contextlib.suppress(OSError):
            conn.close()


@pytest.fixture
def relay(echo: tuple[str, int]) -> Iterator[TcpRelay]:
    with TcpRelay(*echo) as relay:
        yield relay


def connect(relay: TcpRelay) -> socket.socket:
    sock = socket.create_connection((relay.host, relay.port), timeout=2)
    sock.settimeout(2)
    return sock


def test_forwards_both_ways(relay: TcpRelay) -> None:
    with connect(relay) as sock:
        sock.sendall(b"hello")
        assert sock.recv(100) == b"hello"
    assert relay.connections == 1
    assert relay.port != 0
    assert "forwarding" in repr(relay)


def test_paused_relay_delivers_nothing_and_closes_nothing_until_resumed(relay: TcpRelay) -> None:
    with connect(relay) as sock:
        sock.sendall(b"one")
        assert sock.recv(100) == b"one"
        relay.pause()
        assert relay.paused
        assert "paused" in repr(relay)
        sock.sendall(b"two")
        sock.settimeout(0.3)
        # Silent: neither data nor EOF (recv would return b"") nor a reset.
        with pytest.raises(TimeoutError):
            sock.recv(100)
        relay.resume()
        sock.settimeout(2)
        assert sock.recv(100) == b"two"


def test_a_connection_opened_while_paused_is_accepted_but_not_forwarded(relay: TcpRelay) -> None:
    relay.pause()
    with connect(relay) as sock:
        sock.sendall(b"ping")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(100)
        relay.resume()
        sock.settimeout(2)
        assert sock.recv(100) == b"ping"


def test_close_closes_both_sides(relay: TcpRelay) -> None:
    sock = connect(relay)
    sock.sendall(b"x")
    assert sock.recv(100) == b"x"
    relay.close()
    try:
        assert sock.recv(100) == b""  # EOF
    except ConnectionResetError:
        pass  # or a reset: either way the client sees the connection closed
    finally:
        sock.close()
    assert "closed" in repr(relay)
    with pytest.raises(OSError):
        socket.create_connection((relay.host, relay.port), timeout=1)


def test_a_closed_target_closes_the_client_side(echo: tuple[str, int]) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with TcpRelay(*listener.getsockname()[:2]) as relay, connect(relay) as sock:
        server, _ = listener.accept()
        server.close()  # the server hangs up: the relay passes the FIN on
        assert sock.recv(100) == b""
    listener.close()


class _SlowListener:
    """Stands for the relay's listener with a close() as slow as one under CPU load."""

    def __init__(self, listener: socket.socket) -> None:
        self._listener = listener

    def close(self) -> None:
        time.sleep(0.2)
        self._listener.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._listener, name)


def test_closing_a_paused_relay_delivers_nothing_of_what_waited(echo: tuple[str, int]) -> None:
    # Found by CI under load: close() woke the paused pumps before closing the sockets, so
    # a query the relay held back reached the server and its answer the client, and a
    # validation that must time out succeeded.
    relay = TcpRelay(*echo)
    with connect(relay) as sock:
        sock.sendall(b"a")
        assert sock.recv(100) == b"a"
        relay.pause()
        sock.sendall(b"held back")
        relay._listener = _SlowListener(relay._listener)  # type: ignore[assignment]
        relay.close()
        with contextlib.suppress(ConnectionResetError):  # a reset is a close too
            assert sock.recv(100) == b""  # the close, never the echo of what waited
