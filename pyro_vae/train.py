"""The training loop: :func:`fit` runs :class:`pyro.infer.SVI` over minibatches and records what happened.

Per step, ``SVI.step(x, num_data=N, index=idx)`` traces the guide and the model inside
``pyro.plate("data", size=N, subsample=idx)``, estimates the ELBO, back-propagates, and hands every parameter to
the :class:`~pyro_vae.optim.SingleOptimizer`. Pyro's validation is on for the first step (it catches wrong
supports and shapes) and off afterwards, where it would cost 6–9 % of every step; our own data checks ran once at
load time and do not depend on it.

A run directory, when given, receives ``config.json`` (the resolved config and the versions), ``metrics.jsonl``
(one JSON record per epoch) and ``last.pt`` (state dicts only; see :mod:`pyro_vae.checkpoint`).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pyro
import torch
from pyro.infer import SVI
from tqdm import tqdm

from pyro_vae.checkpoint import save_checkpoint
from pyro_vae.config import RunConfig
from pyro_vae.data import Dataset, EpochBatches, binarize_eval, check_batch_size, check_likelihood_data
from pyro_vae.errors import ConfigError
from pyro_vae.evaluation import ELBOResult, MeanSE, evaluate_elbo
from pyro_vae.model import VAE
from pyro_vae.objectives import make_objective
from pyro_vae.optim import SingleOptimizer, adamw

logger = logging.getLogger(__name__)

__all__ = ["EpochRecord", "FitResult", "fit", "resolve_device", "environment_info"]


class EpochRecord(NamedTuple):
    """What one epoch produced. ELBOs are in nats per image."""

    epoch: int
    step: int
    train_elbo: float
    test_elbo: MeanSE
    test_reconstruction: MeanSE
    test_kl: MeanSE
    seconds: float
    grad_norm: float

    def to_json(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "train_elbo": self.train_elbo,
            "test_elbo": self.test_elbo.mean,
            "test_elbo_se": self.test_elbo.se,
            "test_reconstruction": self.test_reconstruction.mean,
            "test_kl": self.test_kl.mean,
            "seconds": self.seconds,
            "grad_norm": self.grad_norm,
        }


class FitResult(NamedTuple):
    """The outcome of :func:`fit`.

    :ivar losses: per-step loss, the negative ELBO estimate in nats per image (Python floats).
    :ivar epochs: one :class:`EpochRecord` per completed epoch.
    :ivar steps: optimiser steps taken.
    :ivar run_dir: the run directory, or ``None``.
    :ivar optimizer: the optimiser (its state continues a run).
    """

    losses: list[float]
    epochs: list[EpochRecord]
    steps: int
    run_dir: Path | None
    optimizer: SingleOptimizer

    @property
    def test_elbo(self) -> MeanSE | None:
        """Test ELBO after the last epoch."""
        return self.epochs[-1].test_elbo if self.epochs else None


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error that says so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def environment_info() -> dict:
    """Versions and thread count, recorded with every run."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg_version = version("pyro_vae")
    except PackageNotFoundError:
        pkg_version = "unknown"
    return {
        "pyro_vae": pkg_version,
        "pyro": pyro.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _consistent_config(vae: VAE, config: RunConfig | None) -> RunConfig:
    """The run config with a model section that describes ``vae``; a config that contradicts the VAE is refused, so
    that ``config.json`` never records a model other than the one trained."""
    if config is None:
        return RunConfig(model=vae.config) if vae.config is not None else RunConfig()
    if vae.config is not None and config.model != vae.config:
        differ = [
            f"{name} ({getattr(config.model, name)!r} in the config, {getattr(vae.config, name)!r} in the VAE)"
            for name in vae.config.__dataclass_fields__
            if getattr(config.model, name) != getattr(vae.config, name)
        ]
        raise ConfigError(
            f"config.model does not describe the VAE: {'; '.join(differ)}; "
            "build the VAE with VAE.from_config(config.model, data.input_dim)"
        )
    return config


def fit(vae: VAE, data: Dataset, config: RunConfig | None = None, *, out_dir: str | Path | None = None) -> FitResult:
    """Train ``vae`` on ``data`` with SVI.

    :param vae: the model; moved to the configured device.
    :param data: a loaded :class:`~pyro_vae.data.Dataset`.
    :param config: the run configuration (default: defaults, with the model section taken from ``vae.config``); its
        ``data`` binarisation fields and ``train`` section drive the run, and its ``model`` section must describe
        ``vae`` (a mismatch is a :class:`~pyro_vae.errors.ConfigError`).
    :param out_dir: run directory for ``config.json``, ``metrics.jsonl`` and ``last.pt`` (``None``: write nothing).
    :returns: a :class:`FitResult`.
    """
    config = _consistent_config(vae, config)
    tc, dc = config.train, config.data
    if tc.threads is not None:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    n_train = data.x_train.shape[0]
    check_batch_size(n_train, tc.batch_size)
    check_likelihood_data(data, dc.binarize, vae.likelihood.name)
    if data.input_dim != vae.input_dim:
        raise ConfigError(f"the data have {data.input_dim} values per image but the VAE expects {vae.input_dim}")

    vae.to(device)
    x_train = data.x_train.to(device)
    x_test = binarize_eval(data.x_test, dc.binarize, tc.seed, dc.threshold).to(device)
    batches = EpochBatches(
        x_train, batch_size=tc.batch_size, seed=tc.seed, binarize=dc.binarize, threshold=dc.threshold
    )
    optimizer = adamw(tc.lr, tc.weight_decay, clip_norm=tc.clip_norm)
    svi = SVI(vae.model, vae.guide, optimizer, make_objective(tc.objective, tc.num_particles))

    run_dir = Path(out_dir) if out_dir is not None else None
    metrics_file = None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(
            run_dir / "config.json",
            {
                "config": config.to_dict(),
                "environment": environment_info(),
                "device": str(device),
                "data": {"name": data.name, "n_train": n_train, "n_test": int(x_test.shape[0])},
            },
        )
        metrics_file = open(run_dir / "metrics.jsonl", "w")

    pyro.set_rng_seed(tc.seed)
    total_steps = tc.epochs * len(batches)
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)
    progress = sys.stderr.isatty() if tc.progress is None else tc.progress
    losses: list[float] = []
    epochs: list[EpochRecord] = []
    step = 0
    vae.train()
    try:
        with tqdm(total=total_steps, disable=not progress, unit="step", dynamic_ncols=True) as bar:
            for epoch in range(tc.epochs):
                if step >= total_steps:
                    break
                start_time = time.perf_counter()
                epoch_losses: list[float] = []
                for batch in batches.batches(epoch):
                    if step >= total_steps:
                        break
                    if step == 0:
                        with pyro.validation_enabled(True):
                            loss = svi.step(batch.x, n_train, batch.index)
                        logger.info("first step checked with Pyro validation; later steps run with validation off")
                    else:
                        with pyro.validation_enabled(False):
                            loss = svi.step(batch.x, n_train, batch.index)
                    loss /= n_train  # SVI's loss is scaled to the whole data set; report nats per image
                    losses.append(loss)
                    epoch_losses.append(loss)
                    step += 1
                    bar.update()
                    if step % 10 == 0:
                        bar.set_postfix(elbo=f"{-loss:.2f}")
                seconds = time.perf_counter() - start_time
                result: ELBOResult = evaluate_elbo(vae, x_test, seed=tc.seed)
                vae.train()
                record = EpochRecord(
                    epoch=epoch,
                    step=step,
                    train_elbo=-math.fsum(epoch_losses) / max(len(epoch_losses), 1),
                    test_elbo=result.elbo,
                    test_reconstruction=result.reconstruction,
                    test_kl=result.kl,
                    seconds=seconds,
                    grad_norm=optimizer.grad_norm,
                )
                epochs.append(record)
                logger.info("epoch %d: train ELBO %.2f, test ELBO %s", epoch, record.train_elbo, record.test_elbo)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record.to_json()) + "\n")
                    metrics_file.flush()
    finally:
        if metrics_file is not None:
            metrics_file.close()

    if run_dir is not None:
        save_checkpoint(
            run_dir / "last.pt",
            {
                "config": config.to_dict(),
                "input_dim": vae.input_dim,
                "image_shape": list(data.image_shape) if data.image_shape else None,
                "model": vae.state_dict(),
                "optimizer": optimizer.state_dict(),
                "progress": {"epoch": len(epochs), "step": step},
                "torch_rng_state": torch.get_rng_state(),
            },
        )
    return FitResult(losses, epochs, step, run_dir, optimizer)
