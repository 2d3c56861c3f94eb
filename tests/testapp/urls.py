from django.db import connection
from django.http import JsonResponse
from django.urls import path

from tests.testapp.models import Item


def pid(request):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (backend_pid,) = cursor.fetchone()
    return JsonResponse({"pid": backend_pid, "items": Item.objects.count()})


urlpatterns = [path("pid/", pid)]
