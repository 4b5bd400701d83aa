"""Every benchmark script runs in its --quick smoke mode (asserting nothing about time)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# Listed by hand so that a new script is added on purpose; test_every_benchmark_is_listed keeps the list complete.
SCRIPTS = [
    "compile_speed.py",
    "defaults.py",
    "distributed_speed.py",
    "eval_speed.py",
    "gradient_variance.py",
    "quality.py",
    "train_speed.py",
]


def test_every_benchmark_is_listed():
    on_disk = {p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    assert set(SCRIPTS) == on_disk, f"add new benchmark scripts to SCRIPTS in {Path(__file__).name}"


# train_speed --quick took 51 s on the CI machine.
SLOW = {"train_speed.py"}


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in SCRIPTS])
def test_benchmark_quick_run(script):
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "|" in proc.stdout, "a benchmark prints a table"
