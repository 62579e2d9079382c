"""Test settings: the example project, plus a PostgreSQL alias when the URL is given.

``default`` is always the embedded SQLite database. ``postgres`` exists only when
``WORKER_HEALTH_TEST_DATABASE_URL`` is set; tests that need it skip otherwise.
"""

from __future__ import annotations

import os

import dj_database_url

from example_project.settings import *  # noqa: F403
from example_project.settings import DATABASES

PG_URL = os.environ.get("WORKER_HEALTH_TEST_DATABASE_URL", "")
if PG_URL:
    DATABASES["postgres"] = dj_database_url.parse(PG_URL)
    # a suffix keeps concurrent runs (tox envs, several checkouts) apart on one server
    suffix = os.environ.get("WORKER_HEALTH_TEST_DB_SUFFIX", "")
    DATABASES["postgres"]["TEST"] = {"NAME": f"test_worker_health{suffix}"}

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
