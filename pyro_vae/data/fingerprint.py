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

__all__ = ["DataRecord", "config_at", "data_fingerprint", "data_record", "data_source"]

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


def data_fingerprint(data: Dataset) -> str:
    """sha256 over the shapes, dtypes and bytes of the training and test images: identifies the data a run saw.

    :returns: a hex digest; equal for equal data, whatever file or loader they came from.
    """
    digest = hashlib.sha256()
    for x in (data.x_train, data.x_test):
        x = x.detach().cpu().contiguous()
        digest.update(f"{tuple(x.shape)}:{x.dtype};".encode())
        digest.update(x.view(torch.uint8).numpy())
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
