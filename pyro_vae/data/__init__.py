"""Data for pyro_vae: loading and validating image sets, and reproducible mini-batches.

* :func:`load_dataset` turns a :class:`~pyro_vae.config.DataConfig` into a validated :class:`Dataset`, and
  :func:`check_dataset` checks a :class:`Dataset` built by hand (image validation lives in ``data/images.py`` only);
* :class:`EpochBatches` yields seeded, resumable, optionally sharded and binarised :class:`Batch` records, with
  labels when given;
* :func:`num_classes`, :func:`select_labelled`, :func:`split_labelled` and :class:`MixedBatches` (in
  ``data/labels.py``) check labels, keep a seeded, class-balanced labelled subset, and mix labelled and unlabelled
  images in each step of a semi-supervised run; :func:`labels_fingerprint` identifies which labels a run saw;
* :func:`read_idx` / :func:`write_idx` handle the IDX files of MNIST and Fashion-MNIST.
"""

from pyro_vae.data.batches import (
    Batch,
    EpochBatches,
    binarize_eval,
    check_batch_size,
    check_labels,
    check_likelihood_data,
    data_kind,
    derive_seed,
)
from pyro_vae.data.datasets import Dataset, check_dataset, load_dataset, validate_images
from pyro_vae.data.fingerprint import DataRecord, config_at, data_fingerprint, data_record, labels_fingerprint
from pyro_vae.data.idx import read_idx, write_idx
from pyro_vae.data.labels import LabelledSplit, MixedBatches, num_classes, select_labelled, split_labelled

__all__ = [
    "Batch",
    "DataRecord",
    "Dataset",
    "EpochBatches",
    "LabelledSplit",
    "MixedBatches",
    "binarize_eval",
    "check_batch_size",
    "check_labels",
    "check_dataset",
    "check_likelihood_data",
    "config_at",
    "data_kind",
    "data_fingerprint",
    "data_record",
    "derive_seed",
    "labels_fingerprint",
    "load_dataset",
    "num_classes",
    "read_idx",
    "select_labelled",
    "split_labelled",
    "validate_images",
    "write_idx",
]
