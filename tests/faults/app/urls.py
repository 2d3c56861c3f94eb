from django.urls import path

from tests.faults.app import views

urlpatterns = [
    path("healthz", views.healthz),
    path("read", views.read),
    path("write", views.write),
    path("txn", views.txn),
    path("error", views.error),
    path("sleep", views.sleep),
    path("stats", views.stats),
]
