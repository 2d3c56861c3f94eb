"""The URLconf of tests/integration/test_metrics.py's tests marked ``django_prometheus``:
django-prometheus' ``/metrics`` view. A module of its own: including the view imports
django-prometheus, which is not installed in the Django 6.1 cells (see tests/conftest.py)."""

from django.urls import include, path

urlpatterns = [path("", include("django_prometheus.urls"))]
