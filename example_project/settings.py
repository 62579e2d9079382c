"""Settings of the example project, configured by environment variables.

DATABASE_URL       default: a SQLite file in ./var (WAL, immediate transactions, long busy
                   timeout, so several worker processes can write at once)
CELERY_BROKER_URL  default: kombu's filesystem transport in ./var/broker
WORKER_HEALTH_HEARTBEAT_INTERVAL / _STALE_AFTER / _CHECK_INTERVAL  (seconds, optional)
WORKER_HEALTH_BEAT_SCHEDULE  "false" / "0": keep the detector out of beat's schedule
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
import django

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("EXAMPLE_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-project-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_results",
    "django_celery_beat",  # optional: beat's DatabaseScheduler (the default scheduler works too)
    "worker_health",
    "example_project.demo",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "example_project.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
WSGI_APPLICATION = "example_project.wsgi.application"


def sqlite_options() -> dict[str, object]:
    options: dict[str, object] = {"timeout": 60}
    if django.VERSION >= (5, 1):
        # BEGIN IMMEDIATE: writers queue on the busy timeout instead of failing with
        # "database is locked" when a read transaction tries to become a write.
        options["transaction_mode"] = "IMMEDIATE"
        options["init_command"] = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
    return options


DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'example.sqlite3'}"
DATABASES = {"default": dj_database_url.parse(DATABASE_URL)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = sqlite_options()
    DATABASES["default"].setdefault("TEST", {})["NAME"] = str(VAR_DIR / "test.sqlite3")

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"

# --- Celery -------------------------------------------------------------------------------
BROKER_DIR = Path(os.environ.get("EXAMPLE_BROKER_DIR", VAR_DIR / "broker"))
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or "filesystem://"
if CELERY_BROKER_URL.startswith("filesystem://"):
    (BROKER_DIR / "queue").mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
        "polling_interval": 0.1,
    }
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", "django-db")
if os.environ.get("EXAMPLE_QUEUE"):
    # The tests give every test a queue of its own on the shared Redis / RabbitMQ.
    CELERY_TASK_DEFAULT_QUEUE = os.environ["EXAMPLE_QUEUE"]
CELERY_RESULT_EXTENDED = True
CELERY_TASK_TRACK_STARTED = True
# Pickle only where asked for (the tests use it; Celery refuses it for root workers unless
# C_FORCE_ROOT is set).
CELERY_ACCEPT_CONTENT = ["json", "pickle"] if os.environ.get("EXAMPLE_ACCEPT_PICKLE") else ["json"]
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
if os.environ.get("EXAMPLE_ACKS_LATE"):
    # Celery's own answer to lost work: ack after the run, requeue if the process dies.
    CELERY_TASK_ACKS_LATE = True
    CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# --- worker_health ------------------------------------------------------------------------
for _name in ("HEARTBEAT_INTERVAL", "STALE_AFTER", "CHECK_INTERVAL"):
    if os.environ.get(f"WORKER_HEALTH_{_name}"):
        globals()[f"WORKER_HEALTH_{_name}"] = float(os.environ[f"WORKER_HEALTH_{_name}"])
if os.environ.get("WORKER_HEALTH_TRACK_TASKS"):
    WORKER_HEALTH_TRACK_TASKS = os.environ["WORKER_HEALTH_TRACK_TASKS"].split(",")
if os.environ.get("WORKER_HEALTH_MAX_RECLAIMS"):
    WORKER_HEALTH_MAX_RECLAIMS = int(os.environ["WORKER_HEALTH_MAX_RECLAIMS"])
if os.environ.get("WORKER_HEALTH_BEAT_SCHEDULE"):
    _beat = os.environ["WORKER_HEALTH_BEAT_SCHEDULE"].strip().lower()
    WORKER_HEALTH_BEAT_SCHEDULE = _beat not in ("0", "false", "no", "off")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"worker_health": {"handlers": ["console"], "level": "INFO"}},
}
