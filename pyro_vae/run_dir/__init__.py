"""The run directory: :class:`RunDir` (the writer's side: lock, layout, atomic writes, metrics log, checkpoint chain,
run id) and :func:`load_run` (the reader's side: a trained model, its config, metrics and data).

The reader's names load on first use, so that a writer (or a lock probe) does not import Pyro and the model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pyro_vae.run_dir.directory import CONFIG_FORMAT, MODES, RUN_FILES, RunDir, is_run_config
from pyro_vae.run_dir.files import MetricsLog, finite_json, json_bytes

__all__ = [
    "CONFIG_FORMAT",
    "HeldOut",
    "MODES",
    "RUN_FILES",
    "MetricsLog",
    "Run",
    "RunDir",
    "finite_json",
    "is_run_config",
    "json_bytes",
    "load_run",
    "read_run_config",
]
_READERS = ("HeldOut", "Run", "load_run", "read_run_config")


def __getattr__(name: str):
    if name not in _READERS:
        raise AttributeError(f"module 'pyro_vae.run_dir' has no attribute {name!r}")
    value = getattr(importlib.import_module("pyro_vae.run_dir.run"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from pyro_vae.run_dir.run import HeldOut, Run, load_run, read_run_config
