from django.db.models import Count, Max
from django.http import HttpRequest, JsonResponse

from bench.app.models import Item

#: How many rows the five-statement view reads, and the stride between their keys.
FIVE = 5
ROWS = 1000


def item(request: HttpRequest, pk: int) -> JsonResponse:
    """One primary-key lookup: the request the benchmark repeats."""
    row = Item.objects.get(pk=pk)
    return JsonResponse({"id": row.pk, "name": row.name, "value": row.value})


def items(request: HttpRequest, pk: int) -> JsonResponse:
    """Five primary-key lookups, five statements in autocommit: a request that holds
    its connection across several round trips (and, in a per-statement pool, borrows
    five times)."""
    rows = [Item.objects.get(pk=(pk + i * 199 - 1) % ROWS + 1) for i in range(FIVE)]
    return JsonResponse({"ids": [row.pk for row in rows], "sum": sum(r.value for r in rows)})


def prepared(request: HttpRequest, pk: int) -> JsonResponse:
    """The same three ORM queries on every request, with other parameters: a lookup, a
    filtered and ordered slice, an aggregate. The workload psycopg 3's server-side prepared
    statements are for (after ``prepare_threshold`` runs on a connection the server keeps
    their plans); on psycopg2, or with Django's default client-side binding, each is parsed
    and planned every time."""
    row = Item.objects.get(pk=pk)
    following = list(
        Item.objects.filter(pk__gt=pk, value__gte=row.value % 500)
        .order_by("pk")
        .values_list("pk", flat=True)[:5]
    )
    summary = Item.objects.filter(value__lt=row.value + 100).aggregate(
        count=Count("pk"), top=Max("value")
    )
    return JsonResponse({"id": row.pk, "following": following, **summary})
