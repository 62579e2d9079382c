"""``python -m chaos.publish --task effect --count N --prefix P [--kwargs JSON]``: publish
chaos tasks with ids ``P0 .. P{N-1}`` (with the variant's settings: with worker_health each
publish also records its row, as a web request's would)."""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="effect", choices=["effect", "burn", "poison"])
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--kwargs", default="{}")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chaos.settings")
    import django

    django.setup()
    from chaos import tasks

    task = getattr(tasks, args.task)
    kwargs = json.loads(args.kwargs)
    for i in range(args.start, args.start + args.count):
        task.apply_async(kwargs=kwargs, task_id=f"{args.prefix}{i}")
    print(json.dumps({"published": args.count}))


if __name__ == "__main__":
    main()
