"""Run the chaos suite.

    python -m chaos.run --short      # CI: worker_health on Redis, six scenarios, ~5 min
    python -m chaos.run --full       # every scenario with worker_health, Celery alone and
                                     # Celery with acks_late, on Redis; some on RabbitMQ
    python -m chaos.run --full --scenario storm,zombie --variant worker_health --broker amqp

Exit code 1 if a worker_health run broke a promise (a task lost, a task run twice where
that is avoidable, a live worker failed, detection slower than the bound, a poison pill not
quarantined or alerted more than once). The Celery-alone runs are the baseline: reported,
never failing the run. ``--write-docs`` puts the table into docs/reliability.md.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from bench.common import DOCS, machine_markdown, print_machine, stamp, table, write_section

from .scenarios import SCENARIOS, Result, Scale, run_with_timer
from .stack import VARIANTS

SHORT = ["storm", "zombie", "db-outage", "busy", "detectors", "poison"]
FULL_AMQP = ["storm", "zombie", "broker-restart"]


def plan(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    scenarios = args.scenario.split(",") if args.scenario else None
    variants = args.variant.split(",") if args.variant else None
    brokers = args.broker.split(",") if args.broker else None
    runs: list[tuple[str, str, str]] = []
    if args.short:
        for name in scenarios or SHORT:
            for variant in variants or ["worker_health"]:
                for broker in brokers or ["redis"]:
                    runs.append((name, variant, broker))
        return runs
    for broker in brokers or ["redis", "amqp"]:
        names = scenarios or (list(SCENARIOS) if broker == "redis" else FULL_AMQP)
        for name in names:
            for variant in variants or list(VARIANTS):
                runs.append((name, variant, broker))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--short", action="store_true")
    size.add_argument("--full", action="store_true")
    parser.add_argument("--scenario", help=f"comma-separated, from: {', '.join(SCENARIOS)}")
    parser.add_argument("--variant", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--broker", help="comma-separated, from: redis, amqp")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    for name in (args.scenario or "").split(","):
        if name and name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}")
    info = print_machine()
    scale = Scale(short=args.short)
    results: list[Result] = []
    started = time.monotonic()
    for name, variant, broker in plan(args):
        print(f"==> {name} / {variant} / {broker}", flush=True)
        try:
            result = run_with_timer(SCENARIOS[name], variant, broker, scale)
        except Exception as exc:
            traceback.print_exc()
            result = Result(name, variant, broker, problems=[f"crashed: {exc!r}"[:300]])
        results.append(result)
        verdict = "ok" if result.passed else "FAILED: " + "; ".join(result.problems)
        print(
            f"    {result.published} tasks, lost {result.lost}, ran twice {result.twice}; "
            f"{'; '.join(result.notes)} [{result.seconds:.0f} s] {verdict}",
            flush=True,
        )
    rows = [
        [
            r.scenario,
            r.broker,
            r.variant.replace(
                "celery_acks_late", "Celery, acks_late + reject_on_worker_lost"
            ).replace("celery", "Celery alone")
            if r.variant != "worker_health"
            else "worker_health",
            str(r.published),
            f"{r.lost} ({r.never_received} never received)" if r.never_received else str(r.lost),
            str(r.twice),
            "; ".join(r.notes),
            ("ok" if r.passed else "FAILED: " + "; ".join(r.problems))
            if r.variant == "worker_health"
            else "baseline",
        ]
        for r in results
    ]
    headers = ["scenario", "broker", "variant", "tasks", "lost", "ran twice", "notes", "verdict"]
    text = table(headers, rows)
    print()
    print(text)
    took = time.monotonic() - started
    print(f"\nchaos suite: {len(results)} runs in {took:.0f} s")
    if args.write_docs:
        mode = "--short" if args.short else "--full"
        body = (
            f"Run {stamp()} with `python -m chaos.run {mode}` ({took / 60:.0f} min) on: "
            f"{machine_markdown(info)}.\n\n{text}\n"
        )
        write_section(DOCS / "reliability.md", "full" if args.full else "short", body)
    failed = [r for r in results if r.variant == "worker_health" and not r.passed]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
