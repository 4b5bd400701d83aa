"""Checkpoints: state dicts only, atomic writes, a sha256 sidecar, ``weights_only=True`` loads, rotation.

A checkpoint is a dict of tensors and plain Python values (no pickled objects), so it loads with
``torch.load(..., weights_only=True)`` and a malicious file cannot run code; :func:`save_checkpoint` refuses any
other value before it writes.

* :mod:`~pyro_vae.checkpoint.files`: atomic writes (:func:`atomic_write`), :func:`save_checkpoint`,
  :func:`load_checkpoint`, checksums;
* :mod:`~pyro_vae.checkpoint.chain`: :class:`CheckpointDir`, the rotating ``last.pt``, ``last.prev.pt``, ... of a run,
  and a reader that survives the rotation;
* :mod:`~pyro_vae.checkpoint.state`: :class:`TrainingState`, the payload as a typed, checked record.
"""

from pyro_vae.checkpoint.chain import CheckpointDir, Loaded
from pyro_vae.checkpoint.files import (
    FORMAT_VERSION,
    LAST,
    atomic_write,
    atomic_write_bytes,
    chain_names,
    load_checkpoint,
    safe_name,
    save_checkpoint,
    sha256_of,
)
from pyro_vae.checkpoint.state import Progress, TrainingState, capture_rng, environment_info, restore_rng
from pyro_vae.data.fingerprint import DataRecord

__all__ = [
    "FORMAT_VERSION",
    "LAST",
    "CheckpointDir",
    "DataRecord",
    "Loaded",
    "Progress",
    "TrainingState",
    "atomic_write",
    "capture_rng",
    "environment_info",
    "restore_rng",
    "atomic_write_bytes",
    "chain_names",
    "load_checkpoint",
    "safe_name",
    "save_checkpoint",
    "sha256_of",
]
