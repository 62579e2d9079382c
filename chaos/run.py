"""Run the chaos suite.

    python -m chaos.run --short      # CI: worker_health on Redis, six scenarios, and the
                                     # SIGKILL storm on the embedded default, ~4 min
    python -m chaos.run --full       # every scenario with worker_health, Celery alone and
                                     # Celery with acks_late, on Redis; some on RabbitMQ;
                                     # worker_health on the embedded default (SQLite +
                                     # the filesystem transport)
    python -m chaos.run --full --scenario storm,zombie --variant worker_health --broker amqp

Exit code 1 if a worker_health run broke a promise (a task lost, a task run twice where
that is avoidable, a live worker failed, detection slower than the bound, a poison pill not
quarantined or alerted more than once). The Celery-alone runs are the baseline: reported,
never failing the run. ``--write-docs`` puts the table into docs/reliability.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
import traceback
from pathlib import Path

from bench.common import DOCS, machine_markdown, print_machine, stamp, table, write_section

from .scenarios import SCENARIOS, Result, Scale, run_with_timer
from .stack import BROKERS, VARIANTS

SHORT = ["storm", "zombie", "db-outage", "busy", "detectors", "poison"]

#: worker_health runs that fail today for a known reason (docs/reliability.md, "Known
#: failures"): scenario or scenario/broker -> (reference and reason, strict). A strict
#: entry must fail: when it passes, the bug is fixed and the entry must go, so the suite
#: fails until it is removed (as pytest's ``xfail(strict=True)``). Not strict: the failure
#: depends on timing.
KNOWN_FAILURES: dict[str, tuple[str, bool]] = {
    # K1 (completions dropped during a database outage) and K3 (prefetched messages that
    # Celery drops on a broker disconnect left held) were fixed: completions are queued and
    # retried (worker_health/completions.py), and the heartbeat's audit no longer trusts
    # Celery's ``state.requests``, which keeps the dropped requests (Consumer.on_close).
    # K2 (a zombie claimed while marked failed) and K4 (a slow start got a worker failed)
    # were fixed: the claim checks the claimer; a worker registers when its heart starts,
    # and its sweeps run off the heart's thread.
}
FULL_AMQP = ["storm", "zombie", "broker-restart"]
#: the embedded default (SQLite + filesystem transport), worker_health only: a database
#: file has no connections to refuse, and the filesystem transport no server to restart.
#: No clock skew: without an event loop billiard's pool runs a supervisor thread whose
#: ``time.sleep`` fails with EINVAL under libfaketime (the worker exits at start).
FULL_EMBEDDED = ["storm", "zombie", "busy", "detectors", "poison", "rolling"]
SHORT_EMBEDDED = ["storm"]


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
        if not (scenarios or variants or brokers):
            runs.extend((name, "worker_health", "embedded") for name in SHORT_EMBEDDED)
        return runs
    defaults = {"redis": list(SCENARIOS), "amqp": FULL_AMQP, "embedded": FULL_EMBEDDED}
    for broker in brokers or ["redis", "amqp", "embedded"]:
        names = scenarios or defaults[broker]
        default_variants = ["worker_health"] if broker == "embedded" else list(VARIANTS)
        for name in names:
            for variant in variants or default_variants:
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
    parser.add_argument("--broker", help=f"comma-separated, from: {', '.join(BROKERS)}")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument(
        "--results", help="append each result to this JSON-lines file as soon as it is known"
    )
    parser.add_argument(
        "--table-from",
        nargs="+",
        metavar="FILE",
        help="run nothing: make the table (and with --write-docs the docs) from results files",
    )
    args = parser.parse_args(argv)
    for name in (args.scenario or "").split(","):
        if name and name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}")
    # SIGTERM (CI's timeout) unwinds like Ctrl-C: each scenario's clean-up kills its
    # workers and drops its database and redis-server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = print_machine()
    scale = Scale(short=args.short)
    results: list[Result] = []
    started = time.monotonic()
    if args.table_from:
        for path in args.table_from:
            for line in Path(path).read_text().splitlines():
                if line.strip():
                    results.append(Result(**json.loads(line)))
    for name, variant, broker in [] if args.table_from else plan(args):
        print(f"==> {name} / {variant} / {broker}", flush=True)
        try:
            result = run_with_timer(SCENARIOS[name], variant, broker, scale)
        except Exception as exc:
            traceback.print_exc()
            result = Result(name, variant, broker, problems=[f"crashed: {exc!r}"[:300]])
        result.key = name
        results.append(result)
        if args.results:
            with open(args.results, "a") as out:
                out.write(json.dumps(dataclasses.asdict(result)) + "\n")
        verdict = verdict_of(result)[0]
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
            verdict_of(r)[0],
        ]
        for r in results
    ]
    headers = ["scenario", "broker", "variant", "tasks", "lost", "ran twice", "notes", "verdict"]
    text = table(headers, rows)
    print()
    print(text)
    took = sum(r.seconds for r in results) if args.table_from else time.monotonic() - started
    print(f"\nchaos suite: {len(results)} runs in {took:.0f} s")
    if args.write_docs:
        mode = "--short" if args.short else "--full"
        body = (
            f"Run {stamp()} with `python -m chaos.run {mode}` ({took / 60:.0f} min) on: "
            f"{machine_markdown(info)}.\n\n{text}\n"
        )
        write_section(DOCS / "reliability.md", "full" if args.full else "short", body)
    unexpected = [
        r for r in results if r.variant == "worker_health" and verdict_of(r)[1] == "FAILED"
    ]
    for r in unexpected:
        print(f"[chaos] {r.scenario} / {r.broker}: {verdict_of(r)[0]}")
    return 1 if unexpected else 0


def verdict_of(r: Result) -> tuple[str, str]:
    """(text, kind) with kind one of ok, known, FAILED, baseline."""
    if r.variant != "worker_health":
        return "baseline", "baseline"
    known = KNOWN_FAILURES.get(f"{r.key}/{r.broker}") or KNOWN_FAILURES.get(r.key)
    if r.passed:
        if known and known[1]:
            return f"FAILED: passes, but is listed as known failure {known[0][:2]}", "FAILED"
        return "ok", "ok"
    problems = "; ".join(r.problems)
    if known and not problems.startswith("crashed"):
        return f"known failure ({known[0].split(':')[0]}): {problems}", "known"
    return f"FAILED: {problems}", "FAILED"


if __name__ == "__main__":
    sys.exit(main())
