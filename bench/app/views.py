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
