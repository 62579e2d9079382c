from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Stack

PG_URL = os.environ.get("WORKER_HEALTH_TEST_DATABASE_URL", "")
REDIS_URL = os.environ.get("WORKER_HEALTH_TEST_REDIS_URL", "")
AMQP_URL = os.environ.get("WORKER_HEALTH_TEST_AMQP_URL", "")


def _needs(*pairs: tuple[str, str]) -> list[pytest.MarkDecorator]:
    missing = [name for name, value in pairs if not value]
    if not missing:
        return []
    return [pytest.mark.skipif(True, reason=f"service test: {', '.join(missing)} not set")]


STACKS = [
    pytest.param("sqlite-filesystem", id="sqlite-filesystem"),
    pytest.param(
        "postgres-redis",
        id="postgres-redis",
        marks=_needs(
            ("WORKER_HEALTH_TEST_DATABASE_URL", PG_URL), ("WORKER_HEALTH_TEST_REDIS_URL", REDIS_URL)
        ),
    ),
    pytest.param(
        "postgres-rabbitmq",
        id="postgres-rabbitmq",
        marks=_needs(
            ("WORKER_HEALTH_TEST_DATABASE_URL", PG_URL), ("WORKER_HEALTH_TEST_AMQP_URL", AMQP_URL)
        ),
    ),
]


def make_stack(kind: str, workdir: Path) -> Stack:
    if kind == "sqlite-filesystem":
        return Stack(kind, "default", "filesystem://", workdir)
    if kind == "postgres-redis":
        return Stack(kind, "postgres", REDIS_URL, workdir)
    if kind == "postgres-rabbitmq":
        return Stack(kind, "postgres", AMQP_URL, workdir)
    raise ValueError(kind)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short paths: unix socket and log names stay readable; kept on failure for debugging.
    path = Path(tempfile.mkdtemp(prefix="wh-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=STACKS)
def stack(request: pytest.FixtureRequest, transactional_db: None, workdir: Path) -> Iterator[Stack]:
    """A database + broker with real worker processes; everything is killed afterwards."""
    s = make_stack(request.param, workdir)
    yield s
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(s.logs())
    s.close()


@pytest.fixture
def sqlite_stack(
    request: pytest.FixtureRequest, transactional_db: None, workdir: Path
) -> Iterator[Stack]:
    s = make_stack("sqlite-filesystem", workdir)
    yield s
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(s.logs())
    s.close()


DB_STACKS = [STACKS[0], STACKS[1]]


def _stack_with_logs(request: pytest.FixtureRequest, kind: str, workdir: Path) -> Iterator[Stack]:
    s = make_stack(kind, workdir)
    yield s
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(s.logs())
    s.close()


@pytest.fixture(params=DB_STACKS)
def db_stack(
    request: pytest.FixtureRequest, transactional_db: None, workdir: Path
) -> Iterator[Stack]:
    """One stack per database (sqlite-filesystem, postgres-redis): for behaviour that
    depends on the database but not on the broker."""
    yield from _stack_with_logs(request, request.param, workdir)


@pytest.fixture
def pg_stack(
    request: pytest.FixtureRequest, transactional_db: None, workdir: Path
) -> Iterator[Stack]:
    """postgres-redis only: tests that need a network database (e.g. behind a TCP proxy)."""
    if not (PG_URL and REDIS_URL):
        pytest.skip("service test: WORKER_HEALTH_TEST_DATABASE_URL / _REDIS_URL not set")
    yield from _stack_with_logs(request, "postgres-redis", workdir)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
