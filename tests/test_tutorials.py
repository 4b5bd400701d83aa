"""Every tutorial notebook runs, in smoke mode, and is committed without outputs.

Each notebook is executed with :mod:`nbclient` in a ``python3`` kernel with ``PYRO_VAE_SMOKE_TEST=1``, which the
notebooks read to pick tiny settings (as Pyro's ``tests/test_examples.py`` runs its examples with small arguments).
A meta-test fails when a notebook in ``tutorials/`` is not in the executed list.

With ``PYRO_VAE_FULL_TUTORIALS=1`` the notebooks also run in full mode, with the settings their text describes and
the assertions that check their text against their numbers (smoke-mode numbers are noise, so those assertions run in
full mode only). That takes tens of minutes and is not part of CI:
``PYRO_VAE_FULL_TUTORIALS=1 pytest tests/test_tutorials.py -k full``. With ``PYRO_VAE_TUTORIALS_OUT=DIR`` as well,
each executed notebook is written to ``DIR`` so that its text can be read against its outputs.
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
    "06_labels.ipynb",
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


def _execute(name: str, monkeypatch, *, smoke: bool, timeout: int):
    """Run one notebook in a fresh kernel; fail on a cell error or on anything written to stderr."""
    _require_kernel()
    # The kernel is a child process and inherits these: the mode, no GUI backend, and this checkout's package.
    if smoke:
        monkeypatch.setenv("PYRO_VAE_SMOKE_TEST", "1")
    else:
        monkeypatch.delenv("PYRO_VAE_SMOKE_TEST", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    nb = _read(name)
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name=KERNEL_NAME, resources={"metadata": {"path": str(TUTORIALS_DIR)}}
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
    return nb


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in TUTORIALS])
def test_tutorial_runs(name, monkeypatch):
    _execute(name, monkeypatch, smoke=True, timeout=600)


FULL = os.environ.get("PYRO_VAE_FULL_TUTORIALS") == "1"
# Per cell: the longest full-mode cell trains six models and evaluates each with 1000 particles, minutes on an idle
# machine; a busy shared one can be ten times slower.
FULL_CELL_TIMEOUT_S = 4 * 3600


@pytest.mark.slow
@pytest.mark.skipif(
    not FULL,
    reason="full-mode tutorials take tens of minutes; set PYRO_VAE_FULL_TUTORIALS=1 to run them (not part of CI)",
)
@pytest.mark.parametrize("name", TUTORIALS)
def test_tutorial_runs_in_full_mode(name, monkeypatch):
    nb = _execute(name, monkeypatch, smoke=False, timeout=FULL_CELL_TIMEOUT_S)
    out = os.environ.get("PYRO_VAE_TUTORIALS_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, Path(out) / name)
