"""A loopback TCP relay that can go silent: the network path no test can otherwise make.

A server frozen or a route gone dead (a NAT table flushed, a proxy wedged, a cable cut) neither
closes the connection nor answers: no FIN, no RST, the bytes simply stop.  :class:`TcpRelay`
listens on a loopback port and forwards every connection to a target; :meth:`~TcpRelay.pause`
stops forwarding in both directions without closing either side, :meth:`~TcpRelay.resume`
forwards again (what was sent meanwhile is delivered then), and :meth:`~TcpRelay.close` closes
every socket, which both ends see as a closed connection::

    with TcpRelay("127.0.0.1", 5432) as relay:
        conn = psycopg2.connect(host="127.0.0.1", port=relay.port, ...)
        relay.pause()       # conn's next query blocks: nothing reaches the server
        relay.resume()

While paused, new connections are accepted and not forwarded either: a connect through the relay
waits for the server's reply until libpq's ``connect_timeout``.  The relay's own kernel still
acknowledges TCP keepalive probes, so keepalives cannot detect a paused relay (the frozen *route*
a keepalive detects drops the probes too).

Threads: one accepting, two per connection (one per direction); all are daemons.  This module
imports nothing from Django or psycopg2.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from types import TracebackType

__all__ = ["TcpRelay"]

_CHUNK = 65536
# How often a pump or the acceptor looks at the paused/closed flags while nothing arrives.
_TICK = 0.02


class TcpRelay:
    """Forward ``127.0.0.1:<port>`` to ``(target_host, target_port)``; see the module docstring."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server((host, 0))
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        # Set while forwarding; pumps wait on it while paused.
        self._forwarding = threading.Event()
        self._forwarding.set()
        # Held by a pump while it forwards one chunk: pause() takes it once, so when pause()
        # returns no chunk is still on its way.
        self._gate = threading.Lock()
        self._closed = False
        self._sockets: set[socket.socket] = set()
        self._sockets_lock = threading.Lock()  # guards _sockets (touched by every thread)
        self.connections = 0  # connections accepted so far
        self._acceptor = threading.Thread(target=self._accept, name="relay-accept", daemon=True)
        self._acceptor.start()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "forwarding" if self.paused is False else "paused"
        return f"<TcpRelay :{self.port} -> {self.target[0]}:{self.target[1]} {state}>"

    @property
    def paused(self) -> bool:
        return not self._forwarding.is_set()

    def pause(self) -> None:
        """Stop forwarding in both directions; every socket stays open."""
        self._forwarding.clear()
        with self._gate:  # wait out a chunk being forwarded right now
            pass

    def resume(self) -> None:
        """Forward again, starting with what arrived while paused."""
        self._forwarding.set()

    def close(self) -> None:
        """Close the listener and every relayed connection (both sides see the close)."""
        # Closed before the paused pumps are woken, and checked by them before forwarding:
        # what a paused relay held back is never delivered by its close.
        self._closed = True
        with self._gate:  # no chunk is on its way once this is taken
            pass
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._sockets_lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _close(sock)
        self._forwarding.set()  # wake paused pumps so they exit
        self._acceptor.join(timeout=5)

    def __enter__(self) -> TcpRelay:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------- threads

    def _accept(self) -> None:
        while not self._closed:
            try:
                readable, _, _ = select.select([self._listener], [], [], _TICK)
                if not readable:
                    continue
                client, _ = self._listener.accept()
            except (OSError, ValueError):  # closed under us
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._sockets_lock:
                if self._closed:
                    _close(client)
                    _close(upstream)
                    return
                self._sockets.update((client, upstream))
            self.connections += 1
            for source, sink, name in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(
                    target=self._pump, args=(source, sink), name=f"relay-{name}", daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self._closed:
                if not self._forwarding.wait(_TICK):
                    continue  # paused: leave the bytes in the kernel's buffers
                readable, _, _ = select.select([source], [], [], _TICK)
                if not readable:
                    continue
                with self._gate:
                    if self._closed:
                        return  # closed (see close()): deliver nothing more
                    if not self._forwarding.is_set():
                        continue  # paused between the wait and now: read nothing
                    data = source.recv(_CHUNK)
                    if not data:
                        # The sender closed its side: pass the FIN on, as a router would.
                        with contextlib.suppress(OSError):
                            sink.shutdown(socket.SHUT_WR)
                        return
                    sink.sendall(data)
        except (OSError, ValueError):
            # A reset or a socket closed by close(): end both directions.
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
