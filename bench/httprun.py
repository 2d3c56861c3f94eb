"""The HTTP run: gunicorn (gthread) serving one configuration, a load generator on loopback.

The load generator is wrk (Debian's ``wrk`` package) when installed; otherwise a
bounded Python client (threads with keep-alive connections), which competes for the
CPU far more than wrk and so gives lower absolute numbers.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from devtools.pgcluster import free_port

__all__ = ["Gunicorn", "load", "load_generator"]

ROWS = 1000

# "Connection: close": gunicorn's workers share one listening socket, and 32 keep-alive
# connections opened at once can land mostly on one worker, which made whole rounds
# run at half speed (bimodal results for every configuration). A connection per request,
# as a router's would be spread, keeps both workers busy; every configuration pays it.
_LUA = """
math.randomseed(42)
request = function()
  return wrk.format(nil, "/item/" .. math.random(1, %d) .. "/", {["Connection"] = "close"})
end
"""


class Gunicorn:
    """``gunicorn bench.wsgi -k gthread`` for one configuration, on a free port."""

    def __init__(self, spec: dict[str, Any], *, workers: int, threads: int) -> None:
        self.spec = spec
        self.workers = workers
        self.threads = threads
        self.port = free_port()
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix=f"herokupool-bench-gunicorn-{spec['name']}-", suffix=".log", delete=False
        )
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        env = {**os.environ, "BENCH_CONFIG": json.dumps(self.spec)}
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "bench.wsgi:application",
                "--worker-class",
                "gthread",
                "--workers",
                str(self.workers),
                "--threads",
                str(self.threads),
                "--bind",
                f"127.0.0.1:{self.port}",
                "--worker-tmp-dir",
                "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                "--log-level",
                "warning",
                "--keep-alive",
                "10",
            ],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        # Ready when every worker answers (each has its own Django and its own pool).
        deadline = time.monotonic() + timeout
        answered = 0
        while time.monotonic() < deadline and answered < 4 * self.workers:
            if self._process.poll() is not None:
                raise RuntimeError(f"gunicorn exited early; see {self._log.name}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/item/1/")
                if conn.getresponse().status == 200:
                    answered += 1
                conn.close()
            except OSError:
                time.sleep(0.05)
        if answered < 4 * self.workers:
            self.stop()
            raise RuntimeError(f"gunicorn did not answer within {timeout} s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        text = Path(self._log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def load_generator() -> str:
    return "wrk" if shutil.which("wrk") else "python"


def load(url: str, *, connections: int, seconds: int) -> dict[str, Any]:
    """Requests/s, p50/p99 latency and errors of ``seconds`` of load on ``url``."""
    if load_generator() == "wrk":
        return _wrk(url, connections, seconds)
    return _python_client(url, connections, seconds)


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"unexpected wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _wrk(url: str, connections: int, seconds: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_LUA % ROWS)
    try:
        output = subprocess.run(
            [
                "wrk",
                "--threads",
                "2",
                "--connections",
                str(connections),
                "--duration",
                f"{seconds}s",
                "--timeout",
                "15s",
                "--latency",
                "--script",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
    finally:
        os.unlink(script.name)
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    percentiles = {
        f"p{int(float(p))}": _seconds(value)
        for p, value in re.findall(r"^\s+(\d+)%\s+(\S+)$", output, re.MULTILINE)
    }
    latency_max = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", output, re.MULTILINE)
    if latency_max:
        percentiles["max"] = _seconds(latency_max.group(1))
    errors: dict[str, int] = {}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        errors["HTTP non-2xx"] = int(non2xx.group(1))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        for name, value in zip(
            ("connect", "read", "write", "timeout"), socket_errors.groups(), strict=True
        ):
            if int(value):
                errors[f"socket {name}"] = int(value)
    failed = errors.get("HTTP non-2xx", 0)
    return {
        "client": "wrk",
        "requests": requests,
        # Successful responses only: wrk's own Requests/sec counts errors too.
        "rps": rps * max(requests - failed, 0) / requests if requests else 0.0,
        "latency": {
            "p50": percentiles.get("p50"),
            "p99": percentiles.get("p99"),
            "max": percentiles.get("max"),
        },
        "errors": errors,
    }


def _python_client(url: str, connections: int, seconds: int) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    started = time.perf_counter()
    end = started + seconds

    def run(index: int) -> None:
        import random

        rng = random.Random(index)
        conn = http.client.HTTPConnection(host, int(port), timeout=15)
        mine: list[float] = []
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                break
            try:
                conn.request("GET", f"/item/{rng.randint(1, ROWS)}/")
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    errors[f"HTTP {response.status}"] += 1
            except OSError as error:
                errors[type(error).__name__] += 1
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=15)
            mine.append(time.perf_counter() - t0)
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    count = len(latencies)
    return {
        "client": "python",
        "requests": count,
        "rps": (count - sum(errors.values())) / elapsed,
        "latency": {
            "p50": latencies[count // 2] if count else None,
            "p99": latencies[min(count - 1, int(count * 0.99))] if count else None,
            "max": latencies[-1] if count else None,
        },
        "errors": dict(errors),
    }
