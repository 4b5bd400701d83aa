"""The run directory: :class:`RunDir` (the writer's side: lock, layout, atomic writes, metrics log, checkpoint chain,
run id) and :func:`load_run` (the reader's side: a trained model, its config, metrics and data)."""

from pyro_vae.run_dir.directory import CONFIG_FORMAT, MODES, RUN_FILES, RunDir, is_run_config
from pyro_vae.run_dir.files import MetricsLog, finite_json, json_bytes
from pyro_vae.run_dir.run import Run, load_run, read_run_config

__all__ = [
    "CONFIG_FORMAT",
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
