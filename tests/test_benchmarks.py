"""Every benchmark script runs in its --quick smoke mode (asserting nothing about time)."""

import os
import re
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
    "semi_supervised.py",
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


@pytest.mark.slow
def test_train_speed_components_only():
    """--components-only prints only the component table: its header with threads and load, the --quick rows (one
    per option, against the seed) in order, and the derived s/epoch pair of conv against mlp."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train_speed.py"), "--components-only", "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert not any(line.startswith("| B | L | guide") or line.startswith("| guide |") for line in lines)
    load = r"# \d+ threads; 1-minute load \S+ at start, \S+ at end, on \d+ CPUs.*"
    assert any(re.fullmatch(load, line) for line in lines)
    table = [line for line in lines if line.startswith(("| prior", "| likelihood", "| network")) and "s/" not in line]
    rows = [line.split(" | ")[:3] for line in table]
    assert rows == [
        ["| prior", "vamp:50", "binarised"],
        ["| likelihood", "discretized_logistic", "grey"],
        ["| network", "conv", "binarised"],
    ]
    assert [line.split(" | ")[0] for line in lines if line.startswith(("| mlp", "| conv"))] == ["| mlp", "| conv"]


def test_components_load_line_flags_load_above_the_cpu_count():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from _components import load_line
    finally:
        sys.path.remove(str(BENCHMARKS))
    cpus = os.cpu_count()
    assert "UNDER LOAD" not in load_line(1, float(cpus), 0.0)  # as many runnable threads as CPUs: no competition
    assert "UNDER LOAD" in load_line(1, cpus + 0.5, 0.0)
    assert "UNDER LOAD" in load_line(1, 0.0, cpus + 0.5)  # the end counts as the start does
    assert load_line(3, None, None) == f"# 3 threads; 1-minute load unknown at start, unknown at end, on {cpus} CPUs"
