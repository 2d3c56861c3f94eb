"""A loopback proxy that records every statement a client sends to PostgreSQL.

:class:`StatementRecorder` listens on a loopback port and forwards each connection to a
server, parsing the client's side of the PostgreSQL protocol (v3) as it passes: each
simple query (``'Q'``) and each extended-protocol parse (``'P'``) is recorded with the
index of the connection it came on.  What is counted is what reached the wire, whatever
the driver or the pool did to produce it.

Clients must connect with ``sslmode=disable`` and ``gssencmode=disable``: an encrypted
stream cannot be read.  (An ``SSLRequest`` is skipped over and the server's answer
forwarded as is, so a server that refuses SSL is fine either way.)
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType

__all__ = ["StatementRecorder"]

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102


class StatementRecorder:
    """Forward ``127.0.0.1:<port>`` to ``target``; ``statements`` is ``[(connection, sql)]``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()  # guards statements and connections (every pump appends)
        self.statements: list[tuple[int, str]] = []
        self.connections = 0
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="recorder-accept", daemon=True).start()

    def clear(self) -> None:
        with self._lock:
            self.statements.clear()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> StatementRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                return
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            with self._lock:
                self.connections += 1
                index = self.connections
            threading.Thread(
                target=self._client_side, args=(client, upstream, index), daemon=True
            ).start()
            threading.Thread(target=self._copy, args=(upstream, client), daemon=True).start()

    def _copy(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def _client_side(self, client: socket.socket, upstream: socket.socket, index: int) -> None:
        buffer = b""
        started = False  # after the StartupMessage every message has a type byte
        try:
            while data := client.recv(65536):
                buffer += data
                while True:
                    if not started:
                        if len(buffer) < 8:
                            break
                        length, code = struct.unpack("!ii", buffer[:8])
                        if len(buffer) < length:
                            break
                        buffer = buffer[length:]
                        if code not in (_SSL_REQUEST, _GSSENC_REQUEST, _CANCEL_REQUEST):
                            started = True
                        continue
                    if len(buffer) < 5:
                        break
                    kind = buffer[:1]
                    (length,) = struct.unpack("!i", buffer[1:5])
                    if len(buffer) < 1 + length:
                        break
                    body, buffer = buffer[5 : 1 + length], buffer[1 + length :]
                    if kind == b"Q":
                        self._record(index, body.split(b"\0", 1)[0])
                    elif kind == b"P":  # statement name, then the query
                        self._record(index, body.split(b"\0", 2)[1])
                # Forwarded once recorded: the client sees no answer to a statement the
                # test cannot yet read in ``statements``.
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_WR)

    def _record(self, index: int, sql: bytes) -> None:
        with self._lock:
            self.statements.append((index, sql.decode("utf-8", "replace")))
