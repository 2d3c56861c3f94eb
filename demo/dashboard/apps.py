from django.apps import AppConfig


class DashboardConfig(AppConfig):
    name = "demo.dashboard"
    verbose_name = "herokupool demo"
