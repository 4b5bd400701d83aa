"""Every tutorial notebook runs, in smoke mode, and is committed without outputs.

Each notebook is executed with :mod:`nbclient` in a ``python3`` kernel with ``PYRO_VAE_SMOKE_TEST=1``, which the
notebooks read to pick tiny settings (as Pyro's ``tests/test_examples.py`` runs its examples with small arguments).
A meta-test fails when a notebook in ``tutorials/`` is not in the executed list.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Imported outright, not with importorskip: a skipped tutorial would be a tutorial that CI never runs. All three
# come with the package's "test" extra.
import nbclient
import nbformat
import pytest
from jupyter_client import kernelspec

REPO_ROOT = Path(__file__).resolve().parents[1]
TUTORIALS_DIR = REPO_ROOT / "tutorials"
KERNEL_NAME = "python3"

# Listed by hand, so that a new notebook must be added here on purpose; test_every_tutorial_is_executed checks
# that this list and the notebooks on disk agree.
TUTORIALS = [
    "01_vae_basics.ipynb",
    "02_swapping_guides.ipynb",
    "03_likelihoods_and_gaps.ipynb",
    "04_training_scripts.ipynb",
    "05_priors_likelihoods_networks.ipynb",
    "07_your_own_model.ipynb",
]


def _notebooks_on_disk() -> set[str]:
    return {path.name for path in TUTORIALS_DIR.glob("*.ipynb")}


def _read(name: str):
    return nbformat.read(TUTORIALS_DIR / name, as_version=4)


def _require_kernel() -> None:
    specs = kernelspec.find_kernel_specs()
    if KERNEL_NAME not in specs:
        pytest.fail(
            f"no {KERNEL_NAME!r} Jupyter kernel is installed for this Python ({sys.executable}); found "
            f"{sorted(specs) or 'none'}. Run `{sys.executable} -m pip install ipykernel` in this environment, "
            "which provides the python3 kernel"
        )


def test_every_tutorial_is_executed():
    on_disk = _notebooks_on_disk()
    assert on_disk, f"no notebooks found in {TUTORIALS_DIR}"
    assert set(TUTORIALS) == on_disk, (
        f"TUTORIALS in {Path(__file__).name} lists {sorted(TUTORIALS)} but {TUTORIALS_DIR} holds {sorted(on_disk)}; "
        "add new notebooks to TUTORIALS (and remove deleted ones)"
    )


@pytest.mark.parametrize("name", TUTORIALS)
def test_tutorials_committed_without_outputs(name):
    nb = _read(name)
    dirty = [
        index
        for index, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{name}: code cells {dirty} have outputs or execution counts; clear them before committing "
        f"(jupyter nbconvert --clear-output --inplace tutorials/{name})"
    )
    assert nb.metadata.get("kernelspec", {}).get("name") == KERNEL_NAME, f"{name}: kernelspec must be {KERNEL_NAME!r}"


# Notebooks 02 and 04 take more than 20 s even in smoke mode.
SLOW = {"02_swapping_guides.ipynb", "04_training_scripts.ipynb"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in TUTORIALS])
def test_tutorial_runs(name, monkeypatch):
    _require_kernel()
    # The kernel is a child process and inherits these: tiny settings, no GUI backend, and this checkout's package.
    monkeypatch.setenv("PYRO_VAE_SMOKE_TEST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    nb = _read(name)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name=KERNEL_NAME, resources={"metadata": {"path": str(TUTORIALS_DIR)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and the traceback, if a cell fails
    stderr = [
        (index, line)
        for index, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream" and output.name == "stderr"
        for line in output.text.splitlines()
        if line.strip()
    ]
    assert not stderr, f"{name} wrote to stderr (warnings?) in cells (index, line): {stderr}"
