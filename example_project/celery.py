import os

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES

# filesystem:// with atomic writes (see fs_transport.py)
TRANSPORT_ALIASES["filesystem"] = "example_project.fs_transport:Transport"

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")

app = Celery("example_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
