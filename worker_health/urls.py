"""``path("worker-health/", include("worker_health.urls"))``: see :mod:`worker_health.views`."""

from __future__ import annotations

from django.urls import path

from . import views

app_name = "worker_health"

urlpatterns = [
    path("", views.summary, name="summary"),
    path("ready", views.ready, name="ready"),
    path("metrics", views.metrics, name="metrics"),
]
