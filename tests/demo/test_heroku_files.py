"""The files Heroku reads (Procfile, app.json, requirements.txt, .python-version) and the
settings as the buildpack, the release phase and a dyno see them."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from demo.run import SHELL
from tests.conftest import require
from tests.demo.conftest import ROOT, SECRET_KEY, DemoDatabase, clean_env, manage

pytestmark = pytest.mark.usefixtures("demo_extra")

SCHEMA_PATH = ROOT / "schemas" / "app.json.schema.json"

#: Files by which Heroku's Python buildpack picks a package manager; more than one is an error
#: waiting to happen (it silently uses the first), none fails the build.
PACKAGE_MANAGER_FILES = ("requirements.txt", "Pipfile", "Pipfile.lock", "poetry.lock", "uv.lock")
#: Python versions Heroku's Python buildpack supports on 2026-11-26 (3.10 is deprecated since
#: its upstream end of life in October 2026); see devcenter.heroku.com/articles/python-support.
HEROKU_SUPPORTED_PYTHONS = ("3.11", "3.12", "3.13", "3.14")


# ------------------------------------------------------------------ Procfile and gunicorn


def test_procfile_declares_release_and_web(procfile: dict[str, str]) -> None:
    assert set(procfile) == {"release", "web"}
    assert procfile["release"] == "python manage.py migrate --noinput"
    assert procfile["web"].startswith("gunicorn ")
    assert "demo.wsgi" in procfile["web"].split()


def _gunicorn_config(procfile: dict[str, str], **env: str) -> dict[str, str]:
    """The settings the web command would run with (gunicorn --print-config), by name."""
    result = subprocess.run(
        procfile["web"] + " --print-config", shell=True, executable=SHELL, cwd=ROOT,
        capture_output=True, text=True, env=clean_env(**env), timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {
        match.group(1): match.group(2).strip()
        for match in re.finditer(r"^(\w+)\s+= (.*)$", result.stdout, re.MULTILINE)
    }


def test_web_runs_gthread_workers_and_threads_from_the_environment(
    procfile: dict[str, str],
) -> None:
    config = _gunicorn_config(procfile, PORT="5123", WEB_CONCURRENCY="3", GUNICORN_THREADS="6")
    assert config["worker_class"] == "gthread"
    assert config["workers"] == "3"
    assert config["threads"] == "6"
    assert config["preload_app"] == "True"
    assert config["bind"] == "['127.0.0.1:5123']", "off a dyno: the loopback interface only"
    # Heroku's router gives up after 30 s and SIGKILLs a dyno 30 s after SIGTERM.
    assert 0 < float(config["timeout"]) < 30
    assert 0 < float(config["graceful_timeout"]) < 30


def test_web_binds_every_interface_on_a_dyno(procfile: dict[str, str]) -> None:
    config = _gunicorn_config(procfile, PORT="5123", DYNO="web.1", SECRET_KEY=SECRET_KEY)
    assert config["bind"] == "['[::]:5123']"


# ------------------------------------------------------------------ app.json


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(loaded)
    return loaded


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((ROOT / "app.json").read_text(encoding="utf-8"))
    return loaded


def _errors(schema: dict[str, Any], document: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [error.message for error in validator.iter_errors(document)]


def test_app_json_validates_against_the_schema(
    schema: dict[str, Any], manifest: dict[str, Any]
) -> None:
    assert _errors(schema, manifest) == []


def _deprecated_paths(schema: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    """Property paths the schema marks deprecated ("*" for any environment)."""
    for name, spec in schema["properties"].items():
        if spec.get("deprecated"):
            yield (name,)
    for name, spec in schema["$defs"]["env"]["properties"].items():
        if spec.get("deprecated"):
            yield ("env", name)
            yield ("environments", "*", "env", name)


def _has(document: Any, path: tuple[str, ...]) -> bool:
    if not path:
        return True
    if not isinstance(document, dict):
        return False
    head, rest = path[0], path[1:]
    if head == "*":
        return any(_has(value, rest) for value in document.values())
    return head in document and _has(document[head], rest)


def test_app_json_uses_no_deprecated_key(schema: dict[str, Any], manifest: dict[str, Any]) -> None:
    deprecated = list(_deprecated_paths(schema))
    assert {("image",), ("env", "BUILDPACK_URL")} <= set(deprecated)
    assert [path for path in deprecated if _has(manifest, path)] == []
    # ...and the check would notice them.
    with_image = {**manifest, "image": "heroku/python"}
    with_url = {**manifest, "env": {**manifest["env"], "BUILDPACK_URL": "https://x.invalid"}}
    for broken in (with_image, with_url):
        assert any(_has(broken, path) for path in deprecated)


def test_app_json_says_what_the_deploy_button_needs(manifest: dict[str, Any]) -> None:
    assert manifest["repository"].startswith("https://github.com/")
    plans = [addon if isinstance(addon, str) else addon["plan"] for addon in manifest["addons"]]
    assert any(plan.split(":")[0] == "heroku-postgresql" for plan in plans)
    env = manifest["env"]
    assert env["SECRET_KEY"] == {"description": env["SECRET_KEY"]["description"],
                                 "generator": "secret"}  # fmt: skip
    for name in ("POOL_MAX_CONNS", "POOL_MIN_CONNS"):
        assert isinstance(env[name]["value"], str), name
        assert env[name]["value"].isdigit(), name
        assert env[name]["description"], name
    assert int(env["POOL_MIN_CONNS"]["value"]) <= int(env["POOL_MAX_CONNS"]["value"])
    test = manifest["environments"]["test"]
    assert "heroku-postgresql:in-dyno" in test["addons"]
    assert "pytest" in test["scripts"]["test"]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda m: m["env"]["POOL_MAX_CONNS"].update(value=4), "values are strings"),
        (lambda m: m["env"]["SECRET_KEY"].update(generator="random"), "only `secret`"),
        (lambda m: m["env"]["SECRET_KEY"].update(value="x"), "generated or given, not both"),
        (lambda m: m.update(addon=["heroku-postgresql"]), "unknown key"),
        (lambda m: m["addons"].append({"as": "DB"}), "an add-on object needs a plan"),
        (lambda m: m["addons"].append("Heroku Postgres"), "plan names are slugs"),
        (lambda m: m["environments"].update(staging={}), "only test and review"),
        (lambda m: m["environments"]["test"].update(name="x"), "not overridable"),
        (lambda m: m.update(name="x" * 31), "30 characters at most"),
        (lambda m: m.update(repository="github.com/x/y"), "a URL"),
        (lambda m: m.update(formation={"web": {"quantity": "1"}}), "quantity is a number"),
    ],
)
def test_the_schema_refuses_what_heroku_refuses(
    schema: dict[str, Any], manifest: dict[str, Any], change: Any, why: str
) -> None:
    broken = copy.deepcopy(manifest)
    change(broken)
    assert _errors(schema, broken), why


# ------------------------------------------------------------------ what the buildpack reads


def test_exactly_one_package_manager_file() -> None:
    present = [name for name in PACKAGE_MANAGER_FILES if (ROOT / name).exists()]
    assert present == ["requirements.txt"]
    assert not (ROOT / "runtime.txt").exists(), "deprecated: .python-version replaces it"


def _requirement_names(lines: list[str]) -> set[str]:
    names = set()
    for line in lines:
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        if match:
            names.add(match.group(0).lower().replace("_", "-"))
    return names


def test_requirements_install_the_package_and_the_demo_extra() -> None:
    lines = [
        line.split("#")[0].strip()
        for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    ]
    lines = [line for line in lines if line]
    assert "." in lines or "-e ." in lines, "the package itself, from this checkout"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    demo_extra = _requirement_names(pyproject["project"]["optional-dependencies"]["demo"])
    assert demo_extra >= {"gunicorn", "whitenoise"}
    assert _requirement_names(lines) >= demo_extra, "requirements.txt and the demo extra agree"


def test_python_version_is_a_major_version_heroku_and_the_package_support() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".python-version").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert len(lines) == 1
    version = lines[0]
    assert re.fullmatch(r"3\.\d+", version), "the major form gets security updates"
    assert version in HEROKU_SUPPORTED_PYTHONS
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert f"Programming Language :: Python :: {version}" in pyproject["project"]["classifiers"]


def test_env_example_is_honcho_readable_and_holds_no_secret() -> None:
    names = set()
    for line in (ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, value = line.partition("=")
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), line
        assert "PASSWORD" not in value, line
        assert "SECRET" not in name, line
        names.add(name)
    assert {"POOL_MAX_CONNS", "POOL_MIN_CONNS", "WEB_CONCURRENCY", "GUNICORN_THREADS"} <= names


# ------------------------------------------------------------------ settings, off and on a dyno


def test_collectstatic_and_check_work_without_database_url() -> None:
    env = clean_env()
    collected = manage("collectstatic", "--noinput", env=env)
    assert collected.returncode == 0, collected.stderr
    assert (ROOT / "staticfiles" / "staticfiles.json").exists()
    checked = manage("check", env=env)
    assert checked.returncode == 0, checked.stderr
    assert "no issues" in checked.stdout


def test_check_passes_with_an_unreachable_database() -> None:
    env = clean_env(DATABASE_URL="postgres://demo:secret@127.0.0.1:1/nowhere")
    checked = manage("check", env=env)
    assert checked.returncode == 0, checked.stderr


def test_check_deploy_is_clean_on_a_dyno() -> None:
    env = clean_env(
        DYNO="web.1",
        SECRET_KEY=SECRET_KEY,
        DATABASE_URL="postgres://u:p@ec2-1-2-3-4.compute-1.amazonaws.com:5432/d",
        WEB_CONCURRENCY="2",
        POOL_MAX_CONNS="4",
        POOL_CONNECTION_LIMIT="20",
    )
    checked = manage("check", "--deploy", "--fail-level", "WARNING", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "no issues" in checked.stdout


def test_a_dyno_without_secret_key_refuses_to_start() -> None:
    checked = manage("check", env=clean_env(DYNO="web.1", DATABASE_URL="postgres://h/d"))
    assert checked.returncode != 0
    assert "SECRET_KEY is not set" in checked.stderr


def test_the_connection_budget_check_warns_on_a_dyno() -> None:
    env = clean_env(
        DYNO="release.1",
        SECRET_KEY=SECRET_KEY,
        DATABASE_URL="postgres://u:p@db.example.com:5432/d",
        WEB_CONCURRENCY="4",
        POOL_MAX_CONNS="8",
        POOL_CONNECTION_LIMIT="20",
    )
    checked = manage("check", env=env)
    assert "herokupool.W004" in checked.stdout + checked.stderr


def test_migrations_match_the_models(demo_db: DemoDatabase) -> None:
    made = manage("makemigrations", "--check", "--dry-run", env=clean_env(DATABASE_URL=demo_db.url))
    assert made.returncode == 0, made.stdout + made.stderr


def test_static_root_is_git_ignored() -> None:
    require(shutil.which("git") is not None and (ROOT / ".git").exists(), "a git checkout")
    for path in ("staticfiles/x", ".pgdata/x", ".env"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
        assert ignored.returncode == 0, path


def test_no_schema_or_heroku_file_is_missing() -> None:
    for name in ("Procfile", "app.json", "requirements.txt", ".python-version", ".env.example",
                 "gunicorn.conf.py", "manage.py", str(SCHEMA_PATH.relative_to(ROOT))):  # fmt: skip
        assert (ROOT / name).is_file(), name
    assert Path(ROOT / "docs" / "demo-screenshot.png").is_file()
