from django.urls import path

from bench.app.views import item, items, prepared

urlpatterns = [
    path("item/<int:pk>/", item),
    path("items/<int:pk>/", items),
    path("prepared/<int:pk>/", prepared),
]
