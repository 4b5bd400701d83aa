"""Data for pyro_vae: loading and validating image sets, and reproducible mini-batches.

* :func:`load_dataset` turns a :class:`~pyro_vae.config.DataConfig` into a validated :class:`Dataset`, and
  :func:`check_dataset` checks a :class:`Dataset` built by hand (image validation lives in ``data/images.py`` only);
* :class:`EpochBatches` yields seeded, resumable, optionally sharded and binarised :class:`Batch` records;
* :func:`read_idx` / :func:`write_idx` handle the IDX files of MNIST and Fashion-MNIST.
"""

from pyro_vae.data.batches import (
    Batch,
    EpochBatches,
    binarize_eval,
    check_batch_size,
    check_likelihood_data,
    data_kind,
    derive_seed,
)
from pyro_vae.data.datasets import Dataset, check_dataset, load_dataset, validate_images
from pyro_vae.data.fingerprint import DataRecord, config_at, data_fingerprint, data_record
from pyro_vae.data.idx import read_idx, write_idx

__all__ = [
    "Batch",
    "DataRecord",
    "Dataset",
    "EpochBatches",
    "binarize_eval",
    "check_batch_size",
    "check_dataset",
    "check_likelihood_data",
    "config_at",
    "data_kind",
    "data_fingerprint",
    "data_record",
    "derive_seed",
    "load_dataset",
    "read_idx",
    "validate_images",
    "write_idx",
]
