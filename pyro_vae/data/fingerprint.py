"""What identifies the data a run saw: a sha256 fingerprint of its images and where they were read from.

A run records a :class:`DataRecord` (in every checkpoint), so that a later ``evaluate`` or ``sample`` reads the same
file from any working directory (the path is stored absolute) and refuses different data (the fingerprint differs).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import NamedTuple

import torch

from pyro_vae.config import DEFAULT_FASHION_MNIST_DIR, DataConfig
from pyro_vae.data.datasets import Dataset

__all__ = ["DataRecord", "config_at", "data_fingerprint", "data_record", "data_source", "labels_fingerprint"]

#: Where each data set is read from when ``data_dir`` is not given (mirrors :mod:`pyro_vae.data.datasets`).
_DEFAULT_DIRS = {"fashion-mnist": DEFAULT_FASHION_MNIST_DIR, "mnist": "./data"}


class DataRecord(NamedTuple):
    """The data of a run, as its checkpoints record them.

    :ivar str name: the :attr:`~pyro_vae.data.Dataset.name`, e.g. ``"npz:faces.npz"``.
    :ivar int n_train: training images.
    :ivar int n_test: test images.
    :ivar str sha256: :func:`data_fingerprint` of the images.
    :ivar path: the absolute, resolved file (``npz``) or directory (``fashion-mnist``, ``mnist``) the images were read
        from; ``None`` for the embedded set, which lives in the package.
    """

    name: str
    n_train: int
    n_test: int
    sha256: str
    path: str | None = None
    #: :func:`labels_fingerprint` of the labelled images a model with labels trained on (which images, which
    #: labels); ``None`` for the VAE, which reads no labels, and in records written before the field existed.
    labels: str | None = None


def _update(digest, tensor: torch.Tensor) -> None:
    """Feed the shape, dtype and bytes of ``tensor`` to ``digest``: equal tensors feed equal bytes, on any device."""
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tuple(tensor.shape)}:{tensor.dtype};".encode())
    digest.update(tensor.view(torch.uint8).numpy())


def data_fingerprint(data: Dataset) -> str:
    """sha256 over the shapes, dtypes and bytes of the training and test images: identifies the data a run saw.

    :returns: a hex digest; equal for equal data, whatever file or loader they came from.
    """
    digest = hashlib.sha256()
    for x in (data.x_train, data.x_test):
        _update(digest, x)
    return digest.hexdigest()


def labels_fingerprint(y: torch.Tensor, index: torch.Tensor | None = None) -> str:
    """sha256 over labels and, when given, the positions of the labelled images: identifies which images a run had
    labels for and what those labels were, so that a run can record it and a resume can refuse other labels.

    :param torch.Tensor y: ``(N,)`` int64 labels (of the whole training set, or of the labelled images only).
    :param index: ``(n,)`` int64 positions of the labelled images among the training images, e.g. from
        :func:`~pyro_vae.data.select_labelled`; ``None`` (default) fingerprints ``y`` alone.
    :returns: a hex digest; it changes when one label or one position changes, and differs between ``index=None``
        and any ``index``.
    """
    digest = hashlib.sha256(b"labels;")
    _update(digest, y)
    if index is not None:
        digest.update(b"index;")
        _update(digest, index)
    return digest.hexdigest()


def data_source(config: DataConfig) -> str | None:
    """The file or directory ``config`` reads, resolved to an absolute path (``None`` for the embedded set)."""
    if config.dataset == "npz":
        return str(Path(config.path).expanduser().resolve())
    if config.dataset in _DEFAULT_DIRS:
        return str(Path(config.data_dir or _DEFAULT_DIRS[config.dataset]).expanduser().resolve())
    return None


def data_record(data: Dataset, config: DataConfig) -> DataRecord:
    """The :class:`DataRecord` of ``data``, loaded with ``config``: sizes, fingerprint and absolute source path."""
    return DataRecord(
        name=data.name,
        n_train=int(data.x_train.shape[0]),
        n_test=int(data.x_test.shape[0]),
        sha256=data_fingerprint(data),
        path=data_source(config),
    )


def config_at(config: DataConfig, path: str | None) -> DataConfig:
    """``config`` reading from the recorded absolute ``path`` instead of the (possibly relative) one it names, so
    that a run's data are found again from any working directory. ``path=None`` leaves ``config`` unchanged."""
    if path is None:
        return config
    if config.dataset == "npz":
        return dataclasses.replace(config, path=path)
    if config.dataset in _DEFAULT_DIRS:
        return dataclasses.replace(config, data_dir=path)
    return config
