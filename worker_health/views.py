"""HTTP endpoints for load balancers, Kubernetes and Prometheus.

Mount them with ``path("worker-health/", include("worker_health.urls"))``:

``GET worker-health/``         the health summary as JSON (``manage.py worker_health status``)
``GET worker-health/ready``    200 when at least ``WORKER_HEALTH_MIN_ACTIVE_WORKERS`` workers
                               have a fresh heartbeat, else 503
``GET worker-health/metrics``  Prometheus exposition (needs the ``[prometheus]`` extra)

Each answers a staff session, or ``Authorization: Bearer <WORKER_HEALTH_API_TOKEN>``:
no credentials → 401, a logged-in user who is not staff → 403, a wrong token → 401.
``WORKER_HEALTH_READY_PUBLIC = True`` opens ``ready`` to anyone (it reveals only counts).
"""

from __future__ import annotations

import hmac

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from .conf import settings
from .metrics import live_worker_count
from .summary import health_summary


def denied(request: HttpRequest) -> HttpResponse | None:
    """The response refusing ``request``, or ``None`` if it may see health data."""
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer":
        token = settings.API_TOKEN
        if token and hmac.compare_digest(credentials.strip().encode(), token.encode()):
            return None
        return _unauthorized("invalid token")
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return _unauthorized("authentication required")
    if not (user.is_active and user.is_staff):
        return JsonResponse({"error": "staff only"}, status=403)
    return None


def _unauthorized(reason: str) -> HttpResponse:
    response = JsonResponse({"error": reason}, status=401)
    response["WWW-Authenticate"] = 'Bearer realm="worker-health"'
    return response


@never_cache
@require_safe
def summary(request: HttpRequest) -> HttpResponse:
    return denied(request) or JsonResponse(health_summary())


@never_cache
@require_safe
def ready(request: HttpRequest) -> HttpResponse:
    if not settings.READY_PUBLIC and (refusal := denied(request)):
        return refusal
    live = live_worker_count()
    needed = settings.MIN_ACTIVE_WORKERS
    return JsonResponse(
        {"ready": live >= needed, "active_workers": live, "min_active_workers": needed},
        status=200 if live >= needed else 503,
    )


@never_cache
@require_safe
def metrics(request: HttpRequest) -> HttpResponse:
    if refusal := denied(request):
        return refusal
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    except ImportError:
        return HttpResponse(
            "Prometheus metrics need prometheus-client: "
            "pip install 'django-celery-worker-health[prometheus]'\n",
            status=501,
            content_type="text/plain; charset=utf-8",
        )
    from .metrics import WorkerHealthCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerHealthCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
