"""``python -m bench.throughput --candidate PATH``: the ``candidate`` variant runs
worker_health from another checkout, every other variant from this one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import throughput
from bench.common import ROOT


def _bench(candidate: Path | None) -> throughput.Bench:
    db: Any = type("DB", (), {"url": "postgres://root@127.0.0.1:5432/x"})()
    return throughput.Bench(db, Path("/tmp"), "redis://127.0.0.1:6379/11", candidate=candidate)


def test_the_candidate_runs_worker_health_from_its_own_checkout(tmp_path: Path) -> None:
    bench = _bench(tmp_path)
    env = bench.env(throughput.CANDIDATE, "q")
    assert env["BENCH_VARIANT"] == "worker_health"
    assert env["PYTHONPATH"] == str(tmp_path)
    # ``python -m`` puts the working directory first on sys.path: it must be the candidate's
    assert bench.cwd(throughput.CANDIDATE) == tmp_path


def test_the_other_variants_run_from_this_checkout(tmp_path: Path) -> None:
    bench = _bench(tmp_path)
    for variant in throughput.VARIANTS:
        env = bench.env(variant, "q")
        assert env["BENCH_VARIANT"] == variant
        assert env["PYTHONPATH"] == str(ROOT)
        assert bench.cwd(variant) == ROOT


@pytest.mark.parametrize(
    "argv",
    [
        ["--candidate", "/nonexistent-checkout"],
        ["--candidate", str(ROOT), "--profile"],
        ["--candidate", str(ROOT), "--write-docs"],
        ["--variants", "plain,candidate"],  # no --candidate: an unknown variant
    ],
)
def test_bad_candidate_arguments_are_refused_before_anything_runs(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        throughput.main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
