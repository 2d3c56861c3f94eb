"""Run the Procfile locally the way Heroku runs it: build, release, then web.

``python -m demo.run`` (what ``make run`` calls, inside ``devtools.pgcluster run`` when
DATABASE_URL is unset):

1. build: ``python manage.py collectstatic --noinput``, as the Python buildpack does;
2. release: the Procfile's ``release:`` command, exactly as written; stop if it fails;
3. web: the Procfile's ``web:`` command, exactly as written, with PORT set (the environment's
   PORT, else 8000 when free, else any free port), then print the URL once /healthz answers.

Commands run through ``bash -c``, as on a dyno (bash then runs a lone command in its own
process, so the web command's pid is gunicorn's), with this interpreter's directory first on
PATH, so ``python`` and ``gunicorn`` are the virtualenv's. Ctrl-C or SIGTERM stops the web
process group with SIGTERM, as Heroku stops a dyno, and SIGKILL after 30 seconds (or a second
Ctrl-C).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
PROCFILE = ROOT / "Procfile"
#: Heroku runs Procfile commands with bash; /bin/sh where there is none.
SHELL = shutil.which("bash") or "/bin/sh"
BUILD = "python manage.py collectstatic --noinput"
DEFAULT_PORT = 8000
#: Heroku's shutdown window: SIGTERM, then SIGKILL this many seconds later.
STOP_TIMEOUT = 30.0
#: How long the web process may take to answer /healthz before we give up waiting.
BOOT_TIMEOUT = 60.0

# "type: command", as Heroku reads a Procfile: a process type is alphanumeric (with _ and -).
_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+?)\s*$")
# The app is on this machine: never ask an HTTP proxy from the environment for it.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def parse_procfile(text: str) -> dict[str, str]:
    """``{process type: command}`` from a Procfile's text; blank and ``#`` lines skipped.

    Raises ValueError for a line that is neither, or a process type given twice.
    """
    processes: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise ValueError(f"Procfile line {number} ({line!r}) is not 'type: command'.")
        name, command = match.groups()
        if name in processes:
            raise ValueError(f"Procfile line {number} declares {name!r} a second time.")
        processes[name] = command
    return processes


def read_procfile(path: Path = PROCFILE) -> dict[str, str]:
    return parse_procfile(path.read_text(encoding="utf-8"))


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def command_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Procfile commands: this interpreter's bin directory on PATH."""
    env = dict(os.environ if base is None else base)
    # Not resolved: in a virtualenv, sys.executable is the venv's symlink, next to gunicorn.
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", os.defpath)])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def wait_until_healthy(url: str, process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Poll ``url`` until it answers 200; False if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with _LOCAL.open(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except urllib.error.HTTPError as error:
            error.close()  # up, but not healthy (yet): the database may still be starting
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM the process group (as Heroku signals every process of a dyno), wait until every
    process of it has exited, SIGKILL what is left after ``timeout``; the leader's status."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    while time.monotonic() < deadline:
        process.poll()  # reap the leader, or the group never empties
        if not group_alive(process.pid):
            return process.wait()
        time.sleep(0.05)
    say(f"web did not stop within {timeout:g} s: SIGKILL")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    return process.wait()


def say(message: str) -> None:
    sys.stderr.write(f"demo.run: {message}\n")
    sys.stderr.flush()


class _Stop(Exception):
    pass


def main() -> int:
    os.chdir(ROOT)
    processes = read_procfile()
    env = command_env()
    if "PORT" not in env:
        port = DEFAULT_PORT if port_is_free(DEFAULT_PORT) else free_port()
        env["PORT"] = str(port)
    base_url = f"http://127.0.0.1:{env['PORT']}/"
    if not env.get("DATABASE_URL"):
        say("DATABASE_URL is unset: using postgres:///herokupool (see demo/settings.py)")

    for step, command in (("build", BUILD), ("release", processes.get("release"))):
        if command is None:
            continue
        say(f"{step}: {command}")
        step_run = subprocess.run(command, shell=True, executable=SHELL, env=env, check=False)
        code = step_run.returncode
        if code != 0:
            say(f"{step} failed (exit {code})")
            return code

    say(f"web: {processes['web']}")
    # A session of its own: the web command's processes are stopped together, as a dyno.
    web = subprocess.Popen(
        processes["web"], shell=True, executable=SHELL, env=env, start_new_session=True
    )
    first_signal: float | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal first_signal
        if first_signal is None:
            first_signal = time.monotonic()
            raise _Stop
        # A second Ctrl-C kills; one delivered twice at once (say, by the terminal and by
        # a parent that forwards it) does not.
        if time.monotonic() - first_signal > 1.0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(web.pid, signal.SIGKILL)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if wait_until_healthy(base_url + "healthz", web, BOOT_TIMEOUT):
            say(f"the demo is up: {base_url}  (Ctrl-C to stop)")
        elif web.poll() is None:
            say(f"{base_url}healthz does not answer 200 yet; the demo may be at {base_url}")
        code = web.wait()
        # gunicorn exited on its own (a crash, say): leave none of its workers behind.
        stop(web, timeout=5)
    except _Stop:
        say("stopping (SIGTERM to web; Ctrl-C again to kill)")
        code = stop(web)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C during build or release: the step saw it too
        sys.exit(130)
