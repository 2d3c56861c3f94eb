from django.http import HttpRequest, JsonResponse

from bench.app.models import Item


def item(request: HttpRequest, pk: int) -> JsonResponse:
    """One primary-key lookup: the request the benchmark repeats."""
    row = Item.objects.get(pk=pk)
    return JsonResponse({"id": row.pk, "name": row.name, "value": row.value})
