"""The reader's side of a run directory: :func:`load_run` gives a trained model, its config, its metrics and its
data, and :func:`read_run_config` the config alone. Readers take no lock; they load the newest checkpoint that
verifies and retry while a writer rotates the chain.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pyro_vae.checkpoint import CheckpointDir, Loaded, TrainingState, load_checkpoint
from pyro_vae.config import DataConfig, RunConfig, check_int
from pyro_vae.data import Dataset, binarize_eval, load_dataset
from pyro_vae.data.fingerprint import config_at, data_fingerprint, data_source
from pyro_vae.errors import CheckpointError, ConfigError, DataError
from pyro_vae.evaluation import DataProtocol, EvalResult, evaluate
from pyro_vae.labelled import build_model, class_count
from pyro_vae.labelled.evaluation import evaluate_labelled
from pyro_vae.model import VAE
from pyro_vae.run_dir.directory import is_run_config

logger = logging.getLogger(__name__)


def _find(path: Path) -> Loaded:
    """The checkpoint ``path`` names: the file itself, or the newest verifying one of a run directory."""
    if path.is_file():
        return Loaded(path, load_checkpoint(path))
    loaded = CheckpointDir(path).newest() if path.is_dir() else None
    if loaded is None:
        what = "holds no checkpoint" if path.is_dir() else "is no run directory or checkpoint file"
        raise ConfigError(f"{path} {what}; pass a run directory written by 'pyro-vae train'")
    return loaded


def _run_config(record: Any, source: Path) -> RunConfig:
    try:
        return RunConfig.from_dict(record)
    except (ConfigError, TypeError, ValueError) as err:
        raise ConfigError(f"the config saved in {source} cannot be read: {str(err).splitlines()[0]}") from None


def read_run_config(path: str | os.PathLike) -> RunConfig:
    """A run's saved config, from its ``config.json`` (a run directory) or from a checkpoint file, without loading
    any checkpoint when ``config.json`` is there.

    :raises ConfigError: one line when there is no run, or its config cannot be read.
    """
    path = Path(path)
    config = path / "config.json"
    if path.is_dir() and is_run_config(config):
        return _run_config(json.loads(config.read_bytes())["config"], config)
    loaded = _find(path)
    config = loaded.payload.get("config") if isinstance(loaded.payload, dict) else None
    return _run_config(config, loaded.path)


def _build(config: RunConfig, state: TrainingState, source: Path) -> VAE:
    """The model the config describes (a VAE, CVAE or M2: :func:`pyro_vae.labelled.build_model`; a model with labels
    reads its number of classes from the config), with the checkpoint's weights; one line when they do not fit."""
    try:
        vae = build_model(config.model, state.input_dim, state.image_shape)
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {source} describes a model this pyro_vae cannot build: {err}") from None
    state.load_weights(vae, source=source)
    return vae


class HeldOut(NamedTuple):
    """A run's test images as the model is evaluated on them, ``(M, D)``, and their labels ``(M,)`` (or ``None``)."""

    x: torch.Tensor
    y: torch.Tensor | None


@dataclasses.dataclass
class Run:
    """A trained run, as :func:`load_run` returns it.

    :ivar VAE vae: the model with the checkpoint's weights, in eval mode, on the requested device.
    :ivar RunConfig config: the run's (resolved) config.
    :ivar TrainingState state: the checkpoint it came from.
    :ivar Path path: the run directory.
    :ivar Path checkpoint: the checkpoint file.
    """

    vae: VAE
    config: RunConfig
    state: TrainingState
    path: Path
    checkpoint: Path

    @property
    def metrics(self) -> list[dict]:
        """The records of ``metrics.jsonl`` (``[]`` without one); a torn last line (a run killed mid-append) is
        ignored with a warning."""
        path = self.path / "metrics.jsonl"
        try:
            lines = path.read_bytes().split(b"\n")
        except FileNotFoundError:
            return []
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                if number < len(lines) - 1 or lines[-1] == b"":
                    raise CheckpointError(f"{path} line {number} is not JSON; the log is damaged") from None
                logger.warning("%s: ignoring its torn last line %d (the run stopped mid-write)", path, number)
        return records

    def data(self, config_override: DataConfig | None = None) -> Dataset:
        """The run's data, read from the absolute path it recorded (or as ``config_override`` says), with its
        fingerprint checked.

        :raises DataError: if the images differ from the ones the run was trained on; names both fingerprints and
            both sources.
        """
        recorded = self.state.data
        config = config_override if config_override is not None else config_at(self.config.data, recorded.path)
        data = load_dataset(config)
        fingerprint = data_fingerprint(data)
        if fingerprint != recorded.sha256:
            source = data_source(config) or data.name
            raise DataError(
                f"the data read from {source} (fingerprint {fingerprint[:16]}) are not the data run "
                f"{self.state.run_id or self.path} was trained on ({recorded.path or recorded.name}, fingerprint "
                f"{recorded.sha256[:16]}); pass the run's own data: run.data(DataConfig(...)) with the settings it was "
                "trained on (fit records config.data, which must describe the data it was given)"
            )
        return data

    def held_out(self, n: int | None = None) -> HeldOut:
        """The run's test images, binarised as they were evaluated during training, and their labels, on the model's
        device; the data are read (and their fingerprint checked) once.

        :param n: the first ``n`` images only (default: all).
        """
        data, dc = self.data(), self.config.data
        x, y = binarize_eval(data.x_test, dc.binarize, self.config.train.seed, dc.threshold), data.y_test
        if n is not None:
            check_int("n", n, low=1)
            if n > x.shape[0]:
                raise ConfigError(f"n={n} exceeds the run's {x.shape[0]} test images; use {x.shape[0]} or less")
            x, y = x[:n], None if y is None else y[:n]
        device = next(self.vae.parameters()).device
        return HeldOut(x.to(device), None if y is None else y.to(device))

    def test_images(self, n: int | None = None) -> torch.Tensor:
        """The run's test split, binarised as it was evaluated during training, on the model's device.

        :param n: the first ``n`` images only (default: all).
        """
        return self.held_out(n).x

    def test_labels(self, n: int | None = None) -> torch.Tensor | None:
        """The labels of :meth:`test_images` (the first ``n``), on the model's device; ``None`` for data without
        labels."""
        return self.held_out(n).y

    def protocol(self) -> DataProtocol:
        """The data protocol of the run's test split (data set, binarisation and its seed)."""
        return DataProtocol.from_config(self.config.data, self.config.train.seed, dataset=self.state.data.name)

    def evaluate(self, ks: Sequence[int] = (1, 100, 1000), n: int | None = None, **kw) -> EvalResult:
        """:func:`pyro_vae.evaluation.evaluate` on the run's test split with its protocol (binarisation and seed); for
        a model with labels :func:`pyro_vae.labelled.evaluation.evaluate_labelled` with the test labels (the CVAE's
        bounds are on log p(x | y), M2's on log p(x) with y summed out, and M2's result holds its accuracy).

        :param ks: particle counts of the importance-weighted bounds.
        :param n: evaluate the first ``n`` test images only (default: all).
        :param kw: passed on (``chunk_size``, ``seed``, ``progress``).
        """
        return self.evaluate_on(self.held_out(n), ks, **kw)

    def evaluate_on(self, held_out: HeldOut, ks: Sequence[int] = (1, 100, 1000), **kw) -> EvalResult:
        """:meth:`evaluate` on images (and labels) already read by :meth:`held_out`."""
        if class_count(self.vae) is None:
            return evaluate(self.vae, held_out.x, ks, protocol=self.protocol(), **kw)
        return evaluate_labelled(self.vae, held_out.x, held_out.y, ks, protocol=self.protocol(), **kw)


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu") -> Run:
    """Load a trained run: the newest checkpoint of a run directory that verifies (or the checkpoint file named).

    :param path: a run directory written by ``pyro-vae train`` / :func:`~pyro_vae.train.fit`, or one checkpoint.
    :param device: where to put the model.
    :returns: a :class:`Run` whose ``vae`` is in eval mode.
    :raises ConfigError: if there is no run at ``path``.
    :raises CheckpointError: one line for a damaged or crafted checkpoint, or weights that do not fit its config.
    """
    loaded = _find(Path(path))
    state = TrainingState.from_payload(loaded.payload, source=str(loaded.path))
    config = _run_config(state.config, loaded.path)
    vae = _build(config, state, loaded.path)
    vae.to(device).eval()
    return Run(vae, config, state, loaded.path.parent, loaded.path)
