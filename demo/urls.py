from django.urls import path

from demo.dashboard import views

urlpatterns = [
    path("", views.index, name="index"),
    path("api/stats", views.stats_json, name="stats"),
    path("api/work", views.work, name="work"),
    path("api/burst", views.burst, name="burst"),
    path("healthz", views.healthz, name="healthz"),
]
