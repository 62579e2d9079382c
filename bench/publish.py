"""``python -m bench.publish --count N``: publish no-op tasks, print the seconds it took.

Runs with the variant's settings (``BENCH_VARIANT``), so with worker_health each publish
also inserts its task row, as in a user's web request.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--task", default="noop", choices=["noop", "work", "burn", "poison"])
    parser.add_argument("--kwargs", default="{}")
    parser.add_argument("--prefix", default="")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    import django

    django.setup()
    from example_project.demo import tasks

    task = getattr(tasks, args.task)
    kwargs = json.loads(args.kwargs)
    from django.db import connection

    # open the database connection before timing (the broker's opens on the first publish)
    connection.ensure_connection()
    started = time.perf_counter()
    for i in range(args.count):
        options = {"task_id": f"{args.prefix}{i}"} if args.prefix else {}
        task.apply_async(kwargs=kwargs, **options)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "count": args.count}))


if __name__ == "__main__":
    main()
