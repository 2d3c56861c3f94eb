"""A bounded load generator for the fault suite: client threads on loopback, one http.client
request at a time each, every request recorded (operation, start, end, status, body).

Bounded three ways: ``clients`` threads, at most ``max_requests`` requests in all and at most
``max_seconds`` of running, whatever the caller does. Each request opens its own TCP connection
(``Connection: close``), so the kernel spreads requests over every gunicorn worker instead of
pinning a client to the worker that accepted its keep-alive connection.

Times are ``time.monotonic()`` of this process, the clock the tests stamp their faults with.
"""

from __future__ import annotations

import http.client
import json
import random
import statistics
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

#: What each operation's request is, and the status that means it did its job.
OPERATIONS: dict[str, tuple[str, str, int]] = {
    "read": ("GET", "/read", 200),
    "write": ("POST", "/write", 200),
    "txn": ("POST", "/txn", 200),
    "error": ("POST", "/error", 500),  # raises inside atomic() on purpose
    "sleep": ("GET", "/sleep", 200),
    "healthz": ("GET", "/healthz", 200),  # no database
}
#: Operations that use the database (everything but healthz).
DATABASE_OPS = frozenset(OPERATIONS) - {"healthz"}
#: Operations that write rows when they succeed.
WRITE_OPS = frozenset({"write", "txn"})


@dataclass(slots=True)
class Result:
    """One request as the client saw it. ``status`` 0: no HTTP response at all."""

    op: str
    start: float
    end: float
    status: int
    body: dict[str, Any] | None = None
    error: str | None = None
    token: str | None = None

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def ok(self) -> bool:
        return self.status == OPERATIONS[self.op][2]

    @property
    def worker(self) -> int | None:
        return None if self.body is None else self.body.get("pid")

    @property
    def backend(self) -> int | None:
        return None if self.body is None or not self.ok else self.body.get("backend")

    @property
    def message(self) -> str:
        """The server's error text (the 503 body), else the client's, else the status."""
        if self.body is not None and "error" in self.body:
            return str(self.body["error"])
        return self.error or f"HTTP {self.status}"

    def in_flight(self, moment: float) -> bool:
        return self.start <= moment < self.end

    def overlaps(self, begin: float, end: float) -> bool:
        return self.start < end and self.end > begin


@dataclass
class Load:
    """``with Load(host, port, mix={"read": 3, "write": 1}) as load: ...`` runs the clients for
    the block (or until a bound is hit); ``load.results`` holds every finished request."""

    host: str
    port: int
    mix: Mapping[str, float]
    clients: int = 6
    think: float = 0.002  # seconds between one client's requests
    timeout: float = 30.0  # a request with no answer by then is recorded as status 0
    max_seconds: float = 300.0
    max_requests: int = 1_000_000
    sleep_range: tuple[float, float] = (0.05, 0.25)  # pg_sleep of the "sleep" operation
    seed: int = 0
    prefix: str = "L"  # tokens are f"{prefix}{client}-{n}": unique within a database
    results: list[Result] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        unknown = set(self.mix) - set(OPERATIONS)
        if unknown:
            raise ValueError(f"unknown operations in mix: {sorted(unknown)}")
        self._lock = threading.Lock()
        self._sent = 0
        self._stop = threading.Event()
        self._running = threading.Event()  # cleared by pause()
        self._running.set()
        self._in_flight = 0
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self.started_at = 0.0
        self.stopped_at = 0.0

    # ----------------------------------------------------------------- running

    def start(self) -> None:
        self.started_at = time.monotonic()
        deadline = self.started_at + self.max_seconds
        for index in range(self.clients):
            thread = threading.Thread(
                target=self._client, args=(index, deadline), name=f"load-{index}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
        self.stopped_at = time.monotonic()
        alive = [thread.name for thread in self._threads if thread.is_alive()]
        if alive:
            raise RuntimeError(f"load clients did not stop: {alive}")
        if self._errors:
            raise RuntimeError("a load client crashed") from self._errors[0]

    def pause(self, limit: float = 30.0) -> None:
        """Send no new request, and return once none is in flight."""
        self._running.clear()
        deadline = time.monotonic() + limit
        while True:
            with self._lock:
                if self._in_flight == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"requests still in flight {limit:g} s after pause()")
            time.sleep(0.005)

    def resume(self) -> None:
        self._running.set()

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_for(self, successes: int, op_filter: Iterable[str] = DATABASE_OPS, limit=30.0) -> None:
        """Block until ``successes`` requests of the given operations have succeeded."""
        wanted = frozenset(op_filter)
        deadline = time.monotonic() + limit
        while sum(1 for r in list(self.results) if r.ok and r.op in wanted) < successes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {successes} successful requests in {limit:g} s")
            time.sleep(0.02)

    def _take_slot(self) -> str:
        """ "go" (counted in flight), "paused" or "done" (max_requests reached)."""
        with self._lock:
            if self._sent >= self.max_requests:
                return "done"
            # Under the lock, so pause() cannot see 0 in flight while a request is starting.
            if not self._running.is_set():
                return "paused"
            self._sent += 1
            self._in_flight += 1
            return "go"

    def _client(self, index: int, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + index)
        ops = list(self.mix)
        weights = [self.mix[op] for op in ops]
        count = 0
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                if not self._running.wait(0.05):
                    continue
                slot = self._take_slot()
                if slot == "done":
                    break
                if slot == "paused":
                    continue
                op = rng.choices(ops, weights)[0]
                token = f"{self.prefix}{index}-{count}"
                count += 1
                try:
                    self.results.append(self.request(op, token, rng))
                finally:
                    with self._lock:
                        self._in_flight -= 1
                if self.think:
                    self._stop.wait(self.think)
        except BaseException as error:  # never let a thread die silently
            self._errors.append(error)

    def request(self, op: str, token: str, rng: random.Random | None = None) -> Result:
        method, path, _ = OPERATIONS[op]
        if op in ("write", "txn", "error"):
            path = f"{path}?token={token}"
        elif op == "sleep":
            low, high = self.sleep_range
            path = f"{path}?s={(rng or random).uniform(low, high):.3f}"
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        start = time.monotonic()
        try:
            connection.request(method, path, headers={"Connection": "close"})
            response = connection.getresponse()
            raw = response.read()
            status = response.status
            body = None
            if response.getheader("Content-Type", "").startswith("application/json"):
                body = json.loads(raw)
            return Result(op, start, time.monotonic(), status, body, None, token)
        except (OSError, http.client.HTTPException, ValueError) as error:
            return Result(op, start, time.monotonic(), 0, None, repr(error), token)
        finally:
            connection.close()


# --------------------------------------------------------------------------- summaries


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def latency_summary(results: Iterable[Result]) -> dict[str, float]:
    """p50 / p99 / max latency in milliseconds."""
    latencies = [r.latency * 1000 for r in results]
    if not latencies:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    return {
        "p50_ms": round(statistics.median(latencies), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "max_ms": round(max(latencies), 1),
    }
