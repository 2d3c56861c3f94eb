"""The app's views. Every response that touched the database names the gunicorn worker (``pid``)
and the PostgreSQL backend that served it (``backend``), so the tests can tell a restarted worker
or a stale connection from the outside.

A 200 from ``write`` or ``txn`` means committed: the response is built after the atomic block
has exited, that is after COMMIT returned.
"""

import logging
import os
import threading

from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import F
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET, require_POST

import herokupool
from tests.faults.app.models import Counter, Item

logger = logging.getLogger("tests.faults.app")


class Boom(Exception):
    """Raised by the error view inside its transaction."""


class DatabaseUnavailableMiddleware:
    """The database could not serve the request (unreachable, full, restarting, bad password,
    or the pool timed out): answer 503 with the error's text, which the tests check for
    clarity and for the absence of the password. Other exceptions stay Django's 500."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, (OperationalError, InterfaceError)):
            return None
        message = f"{type(exception).__name__}: {exception}".strip()
        logger.warning("%s %s: 503: %s", request.method, request.path, message.splitlines()[0])
        return JsonResponse({"pid": os.getpid(), "error": message}, status=503)


def _backend() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """No database: answers while the database is down, so a hung worker shows."""
    return JsonResponse({"pid": os.getpid()})


@require_GET
def read(request: HttpRequest) -> JsonResponse:
    latest = Item.objects.order_by("-id").values_list("id", flat=True).first()
    return JsonResponse({"pid": os.getpid(), "backend": _backend(), "latest": latest})


@require_POST
def write(request: HttpRequest) -> JsonResponse:
    with transaction.atomic():
        item = Item.objects.create(token=request.GET["token"], kind="write", worker=os.getpid())
        backend = _backend()
    # Committed: only now may the client be told so.
    return JsonResponse({"pid": os.getpid(), "backend": backend, "ids": [item.id]})


@require_POST
def txn(request: HttpRequest) -> JsonResponse:
    """Two rows and a counter in one transaction: all three or none."""
    token = request.GET["token"]
    with transaction.atomic():
        first = Item.objects.create(token=token, kind="txn", worker=os.getpid())
        second = Item.objects.create(token=token, kind="txn", worker=os.getpid())
        Counter.objects.filter(name="txn").update(value=F("value") + 1)
        backend = _backend()
    return JsonResponse({"pid": os.getpid(), "backend": backend, "ids": [first.id, second.id]})


@require_POST
def error(request: HttpRequest) -> JsonResponse:
    """Write, then raise inside the same transaction: Django answers 500, nothing is kept, and
    the connection goes back to the pool after the rollback."""
    with transaction.atomic():
        Item.objects.create(token=request.GET["token"], kind="error", worker=os.getpid())
        raise Boom("rolled back on purpose")


@require_GET
def sleep(request: HttpRequest) -> JsonResponse:
    """A slow request: holds its pooled connection for ``s`` seconds."""
    seconds = float(request.GET.get("s", "0.1"))
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), pg_sleep(%s)", [seconds])
        backend = cursor.fetchone()[0]
    return JsonResponse({"pid": os.getpid(), "backend": backend})


@require_GET
def stats(request: HttpRequest) -> JsonResponse:
    """This worker's pool stats and memory; touches no database."""
    return JsonResponse(
        {
            "pid": os.getpid(),
            "stats": herokupool.stats(),
            "rss_kb": rss_kb(os.getpid()),
            "threads": threading.active_count(),
        }
    )


def rss_kb(pid: int) -> int | None:
    """VmRSS of ``pid`` in kB, from /proc (None where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None
