from django.urls import path

from bench.app.views import item

urlpatterns = [path("item/<int:pk>/", item)]
