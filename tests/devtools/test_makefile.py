"""The Makefile's own behaviour (issue 10, items 7, 8 and 10): what `make help` lists, what
`make venv` does with an unsupported Python, and the requirements it installs without
pg_config. The slow paths (a real rebuild, a first run without pg_config) run in .ci/run."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from devtools import requirements
from tests.conftest import require

REPO = Path(__file__).resolve().parents[2]
# A target: a name at the start of a line, then ":" (not ":=" or "::=", which assign).
_TARGET = re.compile(r"^([a-z][a-z0-9-]*)\s*:(?!=|:=)", re.MULTILINE)


def make(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    require(shutil.which("make") is not None, "make")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "PYTHON"))}
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=REPO, env={**base, **env},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_make_help_lists_every_target() -> None:
    targets = set(_TARGET.findall((REPO / "Makefile").read_text(encoding="utf-8")))
    assert {"run", "test", "format", "clean"} <= targets
    result = make("help")
    assert result.returncode == 0, result.stderr
    listed = set(re.findall(r"^make ([a-z][a-z0-9-]*)\s", result.stdout, re.MULTILINE))
    assert listed == targets


def old_python() -> str | None:
    """An interpreter older than 3.11 (pyenv's 3.10 in CI), or None."""
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3")))
    found = shutil.which("python3.10")
    return candidates[-1] if candidates else found


def test_an_unsupported_python_is_refused_before_any_venv_is_made(tmp_path: Path) -> None:
    python = old_python()
    require(python is not None, "a Python older than 3.11 (pyenv's 3.10)")
    assert python is not None
    venv = tmp_path / "venv"
    result = make("venv", f"PYTHON={python}", f"VENV={venv}")
    assert result.returncode != 0
    assert f"PYTHON={python} is Python 3.10." in result.stderr
    assert "needs Python 3.11 or newer" in result.stderr
    assert "make PYTHON=/path/to/python3.12 venv" in result.stderr
    assert not venv.exists()


def test_a_venv_of_an_unsupported_python_is_kept_until_a_good_python_is_named(
    tmp_path: Path,
) -> None:
    """Nothing is removed on the strength of a PYTHON that cannot replace it."""
    python = old_python()
    require(python is not None, "a Python older than 3.11 (pyenv's 3.10)")
    assert python is not None
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    result = make("test", f"PYTHON={python}", f"VENV={venv}")
    assert result.returncode != 0
    assert "make PYTHON=/path/to/python3.12 test" in result.stderr
    assert (venv / "bin" / "python").exists()


def test_without_pg_config_the_requirements_name_the_binary_wheel() -> None:
    lines = requirements.requirements(["test", "dev", "demo"])
    assert "psycopg2-binary>=2.9.9" in lines
    assert not [line for line in lines if re.match(r"psycopg2\b(?!-)", line)]
    assert {"pytest-django>=4.9", "ruff>=0.9", "gunicorn>=23"} <= set(lines)


def test_the_package_itself_still_depends_on_psycopg2() -> None:
    """Heroku builds psycopg2 from requirements.txt (".", this package): never the wheel."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "psycopg2>=2.9.9" in project["dependencies"]
    assert "binary" not in (REPO / "requirements.txt").read_text(encoding="utf-8")


def test_an_unknown_extra_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert requirements.main(["tests"]) == 2
    assert "no extra 'tests'" in capsys.readouterr().err


def test_make_picks_the_binary_wheel_only_without_pg_config(tmp_path: Path) -> None:
    """PSYCOPG2's default, read from `make -n venv` (nothing is run)."""
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("sh", "make"):
        found = shutil.which(tool)
        assert found is not None
        (bare / tool).symlink_to(found)
    without = make("-n", "venv", PATH=str(bare))
    assert without.returncode == 0, without.stderr
    assert '"binary"' in without.stdout
    if shutil.which("pg_config"):
        with_it = make("-n", "venv")
        assert '"source"' in with_it.stdout
