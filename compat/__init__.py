"""The compatibility gate: Celery's own integration tests, plain and with worker_health.

``python -m compat.run`` downloads the sdist of the installed Celery, runs its
``t/integration/test_tasks.py`` and ``test_canvas.py`` against the local Redis twice (plain,
then with :mod:`compat.plugin`), and fails when a test that passes plain does not pass with
worker_health. See ``docs/compatibility.md``.
"""
