"""The gevent test app's views: each borrows (or tries to) and says what happened."""

import os

import gevent
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.urls import path

import herokupool


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


def sleep(request: HttpRequest, ms: int) -> JsonResponse:
    """Hold a connection for ``ms`` milliseconds (pg_sleep yields to other greenlets)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), pg_sleep(%s)", [ms / 1000])
        pid = cursor.fetchone()[0]
    return JsonResponse({"pid": pid})


def give_up(request: HttpRequest, ms: int) -> JsonResponse:
    """Wait at most ``ms`` milliseconds for a connection, by gevent.Timeout, not TIMEOUT."""
    try:
        with gevent.Timeout(ms / 1000):
            connection.ensure_connection()
    except gevent.Timeout:
        return JsonResponse({"gave_up": True})
    return JsonResponse({"gave_up": False})


def killed(request: HttpRequest, ms: int) -> JsonResponse:
    """A greenlet killed after ``ms`` milliseconds, while waiting for a connection or using
    one it got (its own wrapper: connections are per greenlet under gevent)."""

    def borrow() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(1)")

    greenlet = gevent.spawn(borrow)
    gevent.sleep(ms / 1000)
    greenlet.kill(block=True)
    return JsonResponse({"killed": True})


def stats(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"pid": os.getpid(), **herokupool.stats().get("default", {})})


urlpatterns = [
    path("healthz", healthz),
    path("sleep/<int:ms>", sleep),
    path("give-up/<int:ms>", give_up),
    path("killed/<int:ms>", killed),
    path("stats", stats),
]
