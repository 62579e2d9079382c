"""URLs of the benchmark settings: the admin, and worker_health's endpoints when installed."""

from __future__ import annotations

from django.apps import apps
from django.contrib import admin
from django.urls import URLPattern, URLResolver, include, path

urlpatterns: list[URLPattern | URLResolver] = [path("admin/", admin.site.urls)]
if apps.is_installed("worker_health"):
    urlpatterns.append(path("worker-health/", include("worker_health.urls")))
