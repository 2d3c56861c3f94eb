"""Refresh the README's screenshot of the demo, taken from ``make run``'s own configuration.

``python -m demo.screenshot [--out docs/demo-screenshot.png]`` runs the command ``make run``
runs (``python -m devtools.pgcluster run --datadir DIR -- python -m demo.run``) with nothing
set but PORT: the Procfile, gunicorn.conf.py (2 workers x 8 threads) and the pool's defaults
(``POOL_MAX_CONNS`` 4), on an embedded PostgreSQL in a temporary directory.  It then puts load
on it (requests from 16 client threads, then the page's burst button), renders ``/`` in
headless Chromium (``apt-get install chromium``) and stops everything with SIGTERM.

The page is answered by one of the two workers: the numbers are that worker's.
"""

from __future__ import annotations

import argparse
import contextlib
import http.cookiejar
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from demo.dashboard.loadgen import burst
from demo.run import ROOT, free_port, group_alive, wait_until_healthy

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-dev-shm-usage", "--hide-scrollbars",
)  # fmt: skip
WINDOW = (1280, 1240)
#: Variables that would make the run differ from a plain `make run`.
_UNSET = ("DATABASE_URL", "DYNO", "PORT", "WEB_CONCURRENCY", "SECRET_KEY", "DEBUG")


def _env(port: int) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _UNSET and not key.startswith(("POOL_", "GUNICORN_"))
    }
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PORT"] = str(port)
    return env


def say(message: str) -> None:
    sys.stderr.write(f"demo.screenshot: {message}\n")
    sys.stderr.flush()


def press_burst(url: str) -> None:
    """Post the page's burst form as a browser would (cookie + CSRF token)."""
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
    )
    with opener.open(url, timeout=10) as response:
        html = response.read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html)
    if token is None:
        raise RuntimeError("the page has no burst form")
    request = urllib.request.Request(
        url + "api/burst",
        data=f"csrfmiddlewaretoken={token.group(1)}".encode(),
        headers={"Accept": "application/json", "Referer": url},
    )
    with opener.open(request, timeout=30) as response:
        response.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "demo-screenshot.png")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        say("chromium not found (apt-get install chromium)")
        return 1
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryDirectory(prefix="hp-shot-") as tmp:
        os.chmod(tmp, 0o755)  # the server may run as another user (see devtools.pgcluster)
        command = [
            sys.executable, "-m", "devtools.pgcluster", "run", "--datadir", f"{tmp}/pgdata",
            "--", sys.executable, "-m", "demo.run",
        ]  # fmt: skip
        run = subprocess.Popen(command, cwd=ROOT, env=_env(port), start_new_session=True)
        try:
            if not wait_until_healthy(url + "healthz", run, 120):  # type: ignore[arg-type]
                say("the demo did not come up")
                return 1
            report = burst(url + "api/work?hold=0.05", requests=240, concurrency=16)
            say("; ".join(report.lines()))
            press_burst(url)
            burst(url + "api/work?hold=0.02", requests=40, concurrency=4)
            profile = Path(tmp) / "profile"
            shot = Path(tmp) / "shot.png"
            subprocess.run(
                [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                 f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", url],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            shutil.copyfile(shot, args.out)
            say(f"wrote {args.out}")
        finally:
            # As Ctrl-C on `make run`: pgcluster forwards it, demo.run stops gunicorn with
            # SIGTERM, then the server is stopped.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGINT)
            try:
                run.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
            deadline = time.monotonic() + 10
            while group_alive(run.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
