"""The JSON endpoints: who may see them, and what ``ready`` answers."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from tests.dashboard_data import make_worker, scenario, staff_user

pytestmark = pytest.mark.django_db

SUMMARY = "/worker-health/"
READY = "/worker-health/ready"
METRICS = "/worker-health/metrics"
TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def api_token(settings: Any) -> str:
    settings.WORKER_HEALTH_API_TOKEN = TOKEN
    return TOKEN


def bearer(token: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


@pytest.mark.parametrize("url", [SUMMARY, READY, METRICS])
def test_anonymous_requests_are_unauthorized(client: Client, url: str) -> None:
    make_worker("a@h")
    response = client.get(url)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert response.json() == {"error": "authentication required"}


@pytest.mark.parametrize("url", [SUMMARY, READY, METRICS])
def test_non_staff_users_are_forbidden(client: Client, url: str) -> None:
    client.force_login(User.objects.create_user("someone", password="pw"))
    assert client.get(url).status_code == 403


@pytest.mark.parametrize("url", [SUMMARY, READY, METRICS])
def test_staff_sessions_are_allowed(client: Client, url: str) -> None:
    make_worker("a@h")
    client.force_login(staff_user("ops"))
    assert client.get(url).status_code == 200


def test_inactive_staff_session_is_refused(client: Client) -> None:
    user = staff_user("ops")
    client.force_login(user)
    User.objects.filter(pk=user.pk).update(is_active=False)
    assert client.get(SUMMARY).status_code in (401, 403)


@pytest.mark.parametrize("url", [SUMMARY, READY, METRICS])
def test_a_good_token_is_accepted(client: Client, api_token: str, url: str) -> None:
    make_worker("a@h")
    assert client.get(url, **bearer(api_token)).status_code == 200


@pytest.mark.parametrize(
    "header",
    ["Bearer wrong", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ", "bearer nope"],
)
def test_a_bad_token_is_unauthorized(client: Client, api_token: str, header: str) -> None:
    response = client.get(SUMMARY, HTTP_AUTHORIZATION=header)
    assert response.status_code == 401
    assert response.json() == {"error": "invalid token"}


def test_tokens_are_refused_when_none_is_configured(client: Client) -> None:
    assert client.get(SUMMARY, **bearer("anything")).status_code == 401


def test_a_bad_token_is_refused_even_with_a_staff_session(client: Client, api_token: str) -> None:
    client.force_login(staff_user("ops"))
    assert client.get(SUMMARY, **bearer("wrong")).status_code == 401


def test_the_token_is_compared_in_constant_time(
    client: Client, api_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hmac

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    client.get(SUMMARY, **bearer("guess"))
    assert calls == [(b"guess", TOKEN.encode())]


def test_summary_is_the_status_command_json(client: Client, api_token: str) -> None:
    scenario()
    response = client.get(SUMMARY, **bearer(api_token))
    data = response.json()
    assert (data["active_workers"], data["failed_workers"], data["offline_workers"]) == (2, 1, 1)
    assert data["tasks"]["quarantined"] == 1
    assert {w["id"] for w in data["workers"]} >= {"alpha@web-1", "gamma@web-3"}
    assert response["Cache-Control"].startswith("max-age=0")


def test_summary_only_answers_get_and_head(client: Client, api_token: str) -> None:
    assert client.post(SUMMARY, **bearer(api_token)).status_code == 405
    assert client.head(SUMMARY, **bearer(api_token)).status_code == 200


def test_ready_is_200_with_enough_fresh_workers(client: Client, api_token: str) -> None:
    make_worker("a@h", heartbeat_age=2)
    response = client.get(READY, **bearer(api_token))
    assert response.status_code == 200
    assert response.json() == {"ready": True, "active_workers": 1, "min_active_workers": 1}


def test_ready_is_503_without_fresh_workers(client: Client, api_token: str) -> None:
    make_worker("stale@h", heartbeat_age=600)  # still "active": the detector has not run
    make_worker("dead@h", status="failed")
    make_worker("gone@h", status="offline")
    response = client.get(READY, **bearer(api_token))
    assert response.status_code == 503
    assert response.json()["active_workers"] == 0


def test_ready_counts_against_min_active_workers(
    client: Client, api_token: str, settings: Any
) -> None:
    settings.WORKER_HEALTH_MIN_ACTIVE_WORKERS = 2
    make_worker("a@h")
    assert client.get(READY, **bearer(api_token)).status_code == 503
    make_worker("b@h")
    assert client.get(READY, **bearer(api_token)).status_code == 200
    settings.WORKER_HEALTH_MIN_ACTIVE_WORKERS = 0
    assert client.get(READY, **bearer(api_token)).json()["ready"] is True


def test_ready_can_be_public(client: Client, settings: Any) -> None:
    settings.WORKER_HEALTH_READY_PUBLIC = True
    assert client.get(READY).status_code == 503
    make_worker("a@h")
    assert client.get(READY).status_code == 200
    assert client.head(READY).status_code == 200  # load balancers' HEAD probes
    # only readiness: the summary and the metrics stay private
    assert client.get(SUMMARY).status_code == 401
    assert client.get(METRICS).status_code == 401


def test_the_example_project_mounts_the_endpoints() -> None:
    from django.urls import reverse

    assert reverse("worker_health:summary") == SUMMARY
    assert reverse("worker_health:ready") == READY
    assert reverse("worker_health:metrics") == METRICS
