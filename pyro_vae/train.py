"""The training loop: :func:`fit` runs :class:`pyro.infer.SVI` over minibatches and records what happened.

Per step, ``SVI.step(x, num_data=N, index=idx)`` traces the guide and the model inside
``pyro.plate("data", size=N, subsample=idx)``, estimates the ELBO, back-propagates, and hands every parameter to
the :class:`~pyro_vae.optim.SingleOptimizer`. Pyro's validation is on for the first step (it catches wrong
supports and shapes) and off afterwards, where it would cost 6–9 % of every step; our own data checks ran once at
load time and do not depend on it.

A run directory, when given, receives ``config.json`` (the config and the versions), ``metrics.jsonl`` (one JSON
record per epoch) and rotating checkpoints ``last.pt``, ``last.prev.pt`` (state dicts only; see
:mod:`pyro_vae.checkpoint`), written at every epoch end, every ``checkpoint_every`` steps and on SIGINT/SIGTERM.
Everything a bit-exact resume needs is in the checkpoint; see :func:`fit`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import torch
from tqdm import tqdm

from pyro_vae.checkpoint import CheckpointDir, atomic_write_bytes, load_checkpoint
from pyro_vae.config import RunConfig, TrainConfig
from pyro_vae.data import Dataset, EpochBatches, binarize_eval, check_batch_size, check_likelihood_data
from pyro_vae.distributed import (
    any_rank,
    barrier,
    combine_mean_se,
    context_from_env,
    noise_seed,
    sum_over_ranks,
    unwrap,
    wrap,
)
from pyro_vae.distributed import init as init_process_group
from pyro_vae.distributed import shutdown as shutdown_process_group
from pyro_vae.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, PyroVAEError
from pyro_vae.evaluation import ELBOResult, MeanSE, evaluate_elbo
from pyro_vae.model import VAE
from pyro_vae.objectives import make_objective
from pyro_vae.optim import GuardedSVI, SingleOptimizer, adamw
from pyro_vae.schedules import kl_scaled, make_schedule

logger = logging.getLogger(__name__)

__all__ = [
    "Callback",
    "EpochRecord",
    "FitResult",
    "StepState",
    "TrainingInterrupted",
    "data_fingerprint",
    "environment_info",
    "fit",
    "resolve_device",
    "resume_differences",
]


class EpochRecord(NamedTuple):
    """What one epoch produced. ELBOs are in nats per image.

    ``train_elbo`` is the mean of the epoch's finite per-step minibatch estimates (over every rank's steps under
    torchrun); ``test_elbo`` is computed on the whole test split after the epoch.
    """

    epoch: int
    step: int
    train_elbo: float
    test_elbo: MeanSE
    test_reconstruction: MeanSE
    test_kl: MeanSE
    seconds: float
    grad_norm: float
    kl_weight: float | None = None  # the KL schedule's value after the epoch; None without a schedule

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
            "kl_weight": self.kl_weight,
        }


class FitResult(NamedTuple):
    """The outcome of :func:`fit`.

    :ivar losses: per-step loss, the negative ELBO estimate in nats per image (Python floats).
    :ivar epochs: one :class:`EpochRecord` per completed epoch.
    :ivar steps: steps done in the run (batches consumed, skipped ones included; after a resume, since its start).
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
        "torch": str(torch.__version__),  # a TorchVersion, which weights_only loads refuse
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


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


class StepState(NamedTuple):
    """What a callback's ``on_step_end`` sees after each training step.

    :ivar int epoch: epoch of the batch just trained on.
    :ivar int batch: position of that batch in its epoch, from 0.
    :ivar int step: steps done so far in the run (batches consumed, skipped ones included).
    :ivar float loss: the step's loss, the negative ELBO estimate in nats per image.
    :ivar VAE vae: the model being trained.
    :ivar SingleOptimizer optimizer: its optimiser.
    :ivar run_dir: the run directory, or ``None``.
    """

    epoch: int
    batch: int
    step: int
    loss: float
    vae: VAE
    optimizer: SingleOptimizer
    run_dir: Path | None


class Callback:
    """Base class of :func:`fit` callbacks; override the hooks you need (any object with these methods will do).

    Hooks run in the training process between steps; an exception raised in a hook stops training and propagates
    out of :func:`fit` (no checkpoint is written for it).
    """

    def on_step_end(self, state: StepState) -> None:
        """Called after every step, before the step's checkpoint (if one is due)."""

    def on_epoch_end(self, record: EpochRecord) -> None:
        """Called after every epoch's evaluation, before the epoch's checkpoint."""


class TrainingInterrupted(PyroVAEError):
    """Training stopped on SIGINT or SIGTERM after finishing its step and writing a checkpoint.

    :ivar int signal_number: the signal received.
    :ivar int step: steps done when training stopped.
    :ivar checkpoint: the checkpoint written, or ``None`` without a run directory.
    :ivar int exit_code: ``128 + signal_number`` (130 for SIGINT, 143 for SIGTERM), as a shell reports it.
    """

    def __init__(self, message: str, *, signal_number: int, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.signal_number = signal_number
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = 128 + signal_number


class _SignalStop:
    """While active, the first SIGINT or SIGTERM only sets :attr:`received`, so that the loop can finish its step and
    write a checkpoint; a second one restores the previous handlers and stops at once (``KeyboardInterrupt`` for
    SIGINT, ``SystemExit(143)`` for SIGTERM). The atomic writes of :mod:`pyro_vae.checkpoint` keep the files whole
    either way. Handlers can only be installed from the main thread; elsewhere signals keep their usual effect."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalStop:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        else:
            logger.debug("fit runs outside the main thread: SIGINT/SIGTERM keep their default effect")
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            self._restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.received = signum

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


#: Settings that may change when a run is resumed, because they do not alter what the steps already taken would
#: have been: every other field of the config (seed, batch size, data, model, objective, threads, device, lr, ...)
#: must match the checkpoint, or the resumed run would not equal an uninterrupted one.
RESUME_FREE_FIELDS = {
    "data": frozenset({"data_dir"}),
    "train": frozenset(
        {"epochs", "max_steps", "progress", "checkpoint_every", "keep_last", "on_nonfinite", "max_skips"}
    ),
}
#: Files a run writes into its directory (besides the checkpoints), removed by ``overwrite=True``.
RUN_FILES = ("config.json", "metrics.jsonl", "eval.json")


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


def resume_differences(saved: dict, current: dict) -> list[str]:
    """The determinism-relevant config fields that differ between a checkpoint's config and the current one.

    :param dict saved: ``RunConfig.to_dict()`` stored in the checkpoint.
    :param dict current: the current ``RunConfig.to_dict()``, both resolved (threads and device filled in).
    :returns: ``["train.seed: 0 → 1", ...]``, empty when the run may resume.
    """
    saved = RunConfig.from_dict(saved).to_dict()  # fills fields newer than the checkpoint with their defaults
    out = []
    for section in ("data", "model", "train"):
        free = RESUME_FREE_FIELDS.get(section, frozenset())
        before, after = saved[section], current[section]
        for key in sorted(set(before) | set(after)):
            if key not in free and before.get(key) != after.get(key):
                out.append(f"{section}.{key}: {before.get(key)!r} → {after.get(key)!r}")
    return out


def _record_state(record: EpochRecord) -> dict:
    return {k: dict(v._asdict()) if isinstance(v, MeanSE) else v for k, v in record._asdict().items()}


def _record_from_state(state: dict) -> EpochRecord:
    return EpochRecord(**{k: MeanSE(**v) if isinstance(v, dict) else v for k, v in state.items()})


class _Progress(NamedTuple):
    """Where a run stands: the next batch is ``batch`` of ``epoch``; ``recorded`` says whether that epoch's record
    was already written (only after a ``max_steps`` stop in the middle of it); ``seconds`` is the time spent in it."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    recorded: bool = False
    seconds: float = 0.0


def _prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to touch a directory that holds a run unless resuming or overwriting; create it; check it is writable.
    Nothing is written before every check has passed."""
    if "\0" in str(run_dir):
        raise ConfigError(f"run directory {str(run_dir)!r} contains a NUL byte; choose another name")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} exists and is not a directory; choose another --out")
    holds_run = run_dir.is_dir() and ((run_dir / "config.json").exists() or bool(CheckpointDir(run_dir).existing()))
    if resume and overwrite:
        raise ConfigError("resume and overwrite contradict each other: resume continues a run, overwrite replaces it")
    if holds_run and not (resume or overwrite):
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume {run_dir} to continue it, --overwrite to replace it, or "
            "choose another --out"
        )
    if resume and not holds_run:
        raise ConfigError(f"{run_dir} holds no run to resume; start one with --out {run_dir}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe.", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"cannot write to run directory {run_dir} ({err.strerror}); choose another --out") from None
    if overwrite and holds_run:
        for path in CheckpointDir(run_dir).existing() + [run_dir / name for name in RUN_FILES]:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".sha256").unlink(missing_ok=True)
        logger.info("overwriting the run in %s", run_dir)


def _write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def fit(
    vae: VAE,
    data: Dataset,
    config: RunConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    force_resume: bool = False,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Train ``vae`` on ``data`` with SVI, checkpointing into ``out_dir`` so that the run survives a crash.

    Every input is checked before anything is trained or written. With a run directory, ``config.json`` is written
    first, then one ``metrics.jsonl`` line and one checkpoint per epoch (and one every ``checkpoint_every`` steps);
    the checkpoints rotate as :class:`~pyro_vae.checkpoint.CheckpointDir` describes. A checkpoint holds everything a
    bit-exact resume needs: model, optimiser and schedule states, the torch RNG states, the position (epoch, batch,
    step), the loss history, the epoch records, the metrics-file position and a fingerprint of the data.

    ``resume`` continues from a checkpoint: data order is a pure function of (seed, epoch) and the position within
    the epoch is restored by skipping indices, so on CPU with the same thread count an interrupted and resumed run
    equals an uninterrupted one bit for bit (parameters, optimiser state and per-step losses). A checkpoint whose
    determinism-relevant settings (:func:`resume_differences`) or data differ is refused unless ``force_resume``.

    On SIGINT or SIGTERM (with a run directory, in the main thread) the current step finishes, a checkpoint is
    written and :class:`TrainingInterrupted` is raised; a second signal stops at once. A NaN or infinite loss or
    gradient takes no step and, by default, raises :class:`~pyro_vae.errors.NonFiniteLossError` naming the step,
    epoch, batch, images, site or parameter and the last good checkpoint (``train.on_nonfinite="skip"`` skips up to
    ``train.max_skips`` such batches instead).

    :param vae: the model; moved to the configured device.
    :param data: a loaded :class:`~pyro_vae.data.Dataset`.
    :param config: the run configuration (default: defaults, with the model section taken from ``vae.config``); its
        ``data`` binarisation fields and ``train`` section drive the run, and its ``model`` section must describe
        ``vae`` (a mismatch is a :class:`~pyro_vae.errors.ConfigError`).
    :param out_dir: run directory (``None``: write nothing, install no signal handlers). A directory that already
        holds a run is refused unless ``resume`` or ``overwrite``.
    :param resume: ``True`` continues the run in ``out_dir`` from its newest checkpoint; a path names a checkpoint
        file (e.g. ``run/last.prev.pt``), whose directory is the run directory.
    :param bool overwrite: replace the run in ``out_dir`` (its checkpoints, config and metrics are removed first).
    :param bool force_resume: resume although determinism-relevant settings changed (the result will then not
        equal an uninterrupted run).
    :param callbacks: objects with ``on_step_end(StepState)`` and/or ``on_epoch_end(EpochRecord)`` (see
        :class:`Callback`).
    :returns: a :class:`FitResult`; after a resume its losses and epochs cover the whole run.
    :raises TrainingInterrupted: on SIGINT/SIGTERM, after the checkpoint.
    :raises NonFiniteLossError: on a non-finite loss or gradient (unless skipped).
    """
    config = _consistent_config(vae, config)
    tc, dc = config.train, config.data
    if tc.threads is not None:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    # Under torchrun every process runs this function; rank 0 alone writes (see pyro_vae.distributed).
    ctx = context_from_env(tc.device, tc.dist_backend)
    if ctx is not None:
        init_process_group(ctx)
        device = ctx.device
    main = ctx is None or ctx.is_main
    n_train = data.x_train.shape[0]
    check_batch_size(n_train, tc.batch_size)
    check_likelihood_data(data, dc.binarize, vae.likelihood.name)
    if data.input_dim != vae.input_dim:
        raise ConfigError(f"the data have {data.input_dim} values per image but the VAE expects {vae.input_dim}")
    _check_images(data)
    # The resolved config records what "auto" and "default threads" meant, so that a resume can compare them.
    resolved = config.replace(train={"threads": torch.get_num_threads(), "device": device.type})
    step_hooks = [hook for cb in callbacks if (hook := getattr(cb, "on_step_end", None)) is not None]
    epoch_hooks = [hook for cb in callbacks if (hook := getattr(cb, "on_epoch_end", None)) is not None]

    run_dir, resume_from = _locate(out_dir, resume)
    payload, ckpts, fingerprint = None, None, None
    if run_dir is not None:
        if main:
            _prepare_run_dir(run_dir, resume=resume_from is not None, overwrite=overwrite)
        barrier()  # the other ranks read the run directory only once rank 0 has prepared it
        ckpts = CheckpointDir(run_dir, keep_last=tc.keep_last)
        if main:
            ckpts.clean_temp_files()
        fingerprint = data_fingerprint(data)
        if resume_from is not None:
            payload = _load_resumable(resume_from, resolved, fingerprint, force_resume)

    vae.to(device)
    x_train = data.x_train.to(device)
    x_test = binarize_eval(data.x_test, dc.binarize, tc.seed, dc.threshold).to(device)
    rank, world_size = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    # Each rank takes its shard of the (seed, epoch) permutation; batch_size is per process.
    batches = EpochBatches(
        x_train,
        batch_size=tc.batch_size,
        seed=tc.seed,
        binarize=dc.binarize,
        threshold=dc.threshold,
        rank=rank,
        world_size=world_size,
    )
    n_batches = len(batches)
    optimizer = adamw(
        tc.lr, tc.weight_decay, clip_norm=tc.clip_norm, on_nonfinite=tc.on_nonfinite, max_skips=tc.max_skips
    )
    #: Stateful schedules whose state_dict goes into the checkpoint, by name.
    schedules: dict[str, Any] = {}
    model, guide = vae.model, vae.guide
    kl_schedule = make_schedule(tc.kl_schedule)
    if kl_schedule is not None:
        schedules["kl"] = kl_schedule
        model, guide = kl_scaled(model, guide, kl_schedule)  # weights the latent site of both programs together
    svi = GuardedSVI(model, guide, optimizer, make_objective(tc.objective, tc.num_particles))

    losses: list[float] = []
    epochs: list[EpochRecord] = []
    start = _Progress()
    if payload is not None:
        start = _restore(payload, vae, optimizer, schedules, tc, device, force_resume)
        losses = payload["losses"].tolist()
        epochs = [_record_from_state(r) for r in payload["records"]]
        if main and resume_from != ckpts.last and ckpts.last.exists():
            # Resuming from an older file on purpose: keep the newer one aside instead of rotating it down the chain.
            ckpts.last.with_name(ckpts.last.name + ".sha256").unlink(missing_ok=True)
            os.replace(ckpts.last, run_dir / "last.superseded.pt")
            logger.warning("resuming from %s; the newer %s was moved to last.superseded.pt", resume_from, ckpts.last)
        logger.info("resuming %s at epoch %d, batch %d (step %d)", run_dir, start.epoch, start.batch, start.step)
        if ctx is not None:
            # The checkpoint holds rank 0's RNG state only: each rank re-seeds its own noise stream at this step.
            torch.manual_seed(noise_seed(tc.seed, rank, start.step))
    else:
        pyro.set_rng_seed(tc.seed if ctx is None else noise_seed(tc.seed, rank))

    metrics_file = None
    env = environment_info()
    writer = run_dir if main else None  # where this process writes: rank 0 only
    if writer is not None:
        _write_json(
            run_dir / "config.json",
            {
                "config": config.to_dict(),
                "environment": env,
                "device": str(device),
                "data": {"name": data.name, "n_train": n_train, "n_test": int(x_test.shape[0])},
                "resumed_from": None if payload is None else {"checkpoint": str(resume_from), "step": start.step},
            },
        )
        metrics_file = _open_metrics(run_dir / "metrics.jsonl", payload, epochs)

    def save(progress: _Progress) -> Path | None:
        if writer is None:
            return None
        return ckpts.save(
            {
                "config": resolved.to_dict(),
                "versions": env,
                "input_dim": vae.input_dim,
                "image_shape": list(data.image_shape) if data.image_shape else None,
                "data": {"name": data.name, "n_train": n_train, "n_test": int(x_test.shape[0]), "sha256": fingerprint},
                "model": vae.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedules": {name: schedule.state_dict() for name, schedule in schedules.items()},
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                },
                "progress": progress._asdict(),
                "losses": torch.tensor(losses, dtype=torch.float64),
                "records": [_record_state(r) for r in epochs],
                "metrics": {"offset": metrics_file.tell(), "records": len(epochs)},
            }
        )

    def interrupted(signum: int, checkpoint: Path | None, epoch: int, position: int) -> TrainingInterrupted:
        name = signal.Signals(signum).name
        where = f"interrupted at step {step} by {name} (epoch {epoch}, batch {position} of {n_batches})"
        if checkpoint is None:
            return TrainingInterrupted(where, signal_number=signum, step=step, checkpoint=None)
        return TrainingInterrupted(
            f"{where}; checkpoint written to {checkpoint}; resume with: pyro-vae train --resume "
            f"{shlex.quote(str(run_dir))}",
            signal_number=signum,
            step=step,
            checkpoint=checkpoint,
        )

    if run_dir is not None and payload is None:
        save(_Progress())  # the starting point: a run killed before its first epoch ends can still be resumed
    total_steps = tc.epochs * n_batches
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)
    step = start.step
    show = sys.stderr.isatty() if tc.progress is None else tc.progress
    validate = True  # Pyro validation for the first step of every process: it checks supports and shapes
    if ctx is not None:
        wrap(vae, ctx)  # SVI's backward now averages gradients across ranks through DDP
    vae.train()
    with (
        _SignalStop() if run_dir is not None else contextlib.nullcontext(_SignalStop()) as signals,
        tqdm(total=total_steps, initial=step, disable=not show, unit="step", dynamic_ncols=True) as bar,
    ):
        try:
            for epoch in range(start.epoch, tc.epochs):
                first = start.batch if epoch == start.epoch else 0
                seconds = start.seconds if epoch == start.epoch else 0.0
                epoch_start = step - first  # global step of this epoch's batch 0
                began = time.perf_counter()
                for batch in batches.batches(epoch, start=first):
                    if step >= total_steps:
                        break
                    skipped = optimizer.skipped
                    try:
                        with pyro.validation_enabled(validate):
                            loss = svi.step(batch.x, n_train, batch.index) / n_train  # nats per image
                    except NonFiniteLossError as err:
                        raise _nonfinite_in_context(err, step, batch, n_batches, ckpts) from err
                    if validate:
                        validate = False
                        logger.info("first step checked with Pyro validation; later steps run with validation off")
                    if optimizer.skipped != skipped:
                        logger.info("the skipped batch was batch %d of epoch %d (step %d)", batch.step, epoch, step + 1)
                    losses.append(loss)
                    step += 1
                    if kl_schedule is not None:
                        kl_schedule.step()
                    bar.update()
                    if step % 10 == 0:
                        bar.set_postfix(elbo=f"{-loss:.2f}")
                    for hook in step_hooks:
                        hook(StepState(epoch, batch.step, step, loss, vae, optimizer, run_dir))
                    position = batch.step + 1
                    if _stop(signals, ctx):
                        elapsed = seconds + time.perf_counter() - began
                        checkpoint = save(_Progress(epoch, position, step, False, elapsed))
                        raise interrupted(signals.received or signal.SIGTERM, checkpoint, epoch, position)
                    if tc.checkpoint_every and step % tc.checkpoint_every == 0 and position < n_batches:
                        save(_Progress(epoch, position, step, False, seconds + time.perf_counter() - began))
                position = step - epoch_start
                owed = position > first or (epoch == start.epoch and first > 0 and not start.recorded)
                if owed:
                    seconds += time.perf_counter() - began
                    result = _evaluate(vae, x_test, tc.seed, ctx)
                    vae.train()
                    epoch_losses = [v for v in losses[epoch_start:step] if math.isfinite(v)]
                    # Under torchrun, the mean over every rank's steps (each rank's loss is its own shard's estimate).
                    loss_sum, loss_count = sum_over_ranks(math.fsum(epoch_losses), len(epoch_losses))
                    record = EpochRecord(
                        epoch=epoch,
                        step=step,
                        train_elbo=-loss_sum / max(loss_count, 1),
                        test_elbo=result.elbo,
                        test_reconstruction=result.reconstruction,
                        test_kl=result.kl,
                        seconds=seconds,
                        grad_norm=optimizer.grad_norm,
                        kl_weight=None if kl_schedule is None else kl_schedule.value,
                    )
                    epochs.append(record)
                    logger.info("epoch %d: train ELBO %.2f, test ELBO %s", epoch, record.train_elbo, record.test_elbo)
                    if kl_schedule is not None:
                        logger.info("epoch %d: KL weight %.4g (%s schedule)", epoch, record.kl_weight, kl_schedule.name)
                    if metrics_file is not None:
                        metrics_file.write((json.dumps(record.to_json()) + "\n").encode())
                        metrics_file.flush()
                    for hook in epoch_hooks:
                        hook(record)
                    done = position == n_batches
                    checkpoint = save(
                        _Progress(epoch + 1, 0, step) if done else _Progress(epoch, position, step, True, seconds)
                    )
                    if _stop(signals, ctx):
                        raise interrupted(signals.received or signal.SIGTERM, checkpoint, epoch, position)
                if step >= total_steps:
                    break
        finally:
            if metrics_file is not None:
                metrics_file.close()
            if ctx is not None:
                unwrap(vae)
                shutdown_process_group()
    return FitResult(losses, epochs, step, run_dir, optimizer)


def _stop(signals, ctx) -> bool:
    """Whether to stop after this step: a signal arrived here or, under torchrun, on any rank (all ranks must stop
    at the same step, or one would wait forever in the next gradient all-reduce)."""
    received = signals.received is not None
    return received if ctx is None else any_rank(received)


def _evaluate(vae: VAE, x_test: torch.Tensor, seed: int, ctx) -> ELBOResult:
    """Test ELBO; under torchrun each rank evaluates its shard of the test images and the means and standard errors
    are combined across ranks."""
    if ctx is None:
        return evaluate_elbo(vae, x_test, seed=seed)
    shard = x_test[ctx.rank :: ctx.world_size]
    with vae.unrouted():  # no collectives inside: ranks may evaluate different numbers of images
        part = evaluate_elbo(vae, shard, seed=noise_seed(seed, ctx.rank))
    n = shard.shape[0]
    return ELBOResult(
        combine_mean_se(part.elbo, n),
        combine_mean_se(part.reconstruction, n),
        combine_mean_se(part.kl, n),
        x_test.shape[0],
    )


def _check_images(data: Dataset) -> None:
    """Refuse images that are not float in [0, 1] and finite. :func:`~pyro_vae.data.load_dataset` validates what it
    loads; this catches a :class:`~pyro_vae.data.Dataset` built by hand, before one NaN pixel turns every weight into
    NaN in a single step."""
    for what, x in (("x_train", data.x_train), ("x_test", data.x_test)):
        if x.ndim != 2 or x.shape[0] == 0 or not x.is_floating_point():
            raise DataError(
                f"data.{what} is a {x.dtype} tensor of shape {tuple(x.shape)} but fit needs float images (N, D), "
                "N >= 1; load data with pyro_vae.load_dataset, or pass it through pyro_vae.data.validate_images"
            )
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            first = int((~finite).any(dim=1).nonzero()[0, 0])
            raise DataError(
                f"data.{what} contains {int((~finite).sum())} NaN or infinite values (first in image {first}); "
                "remove or replace those images"
            )
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 1.0:
            fix = "divide by 255" if high > 1.0 and high <= 255.0 and low >= 0.0 else "rescale them to [0, 1]"
            raise DataError(f"data.{what} has values in [{low}, {high}] but images must lie in [0, 1]; {fix}")


def _locate(out_dir: str | Path | None, resume: bool | str | Path) -> tuple[Path | None, Path | None]:
    """``(run_dir, checkpoint to resume from or None)`` from fit's ``out_dir`` and ``resume`` arguments."""
    if resume is False or resume is None:
        return (Path(out_dir) if out_dir is not None else None), None
    if resume is True:
        if out_dir is None:
            raise ConfigError("resume=True needs out_dir, the run directory to continue")
        run_dir = Path(out_dir)
        if not run_dir.is_dir():
            raise ConfigError(f"cannot resume: {run_dir} is not a directory; pass a run directory written by fit")
        checkpoint = CheckpointDir(run_dir).latest()
        if checkpoint is None:
            raise ConfigError(
                f"cannot resume: {run_dir} holds no checkpoint (the run stopped before its first one); "
                f"start it again with --overwrite"
            )
        return run_dir, checkpoint
    checkpoint = Path(resume)
    if not checkpoint.is_file():
        raise ConfigError(f"cannot resume from {checkpoint}: no such checkpoint file")
    if out_dir is not None and Path(out_dir).resolve() != checkpoint.parent.resolve():
        raise ConfigError(f"checkpoint {checkpoint} is not in the run directory {out_dir}; resume in its own directory")
    return checkpoint.parent, checkpoint


def _load_resumable(path: Path, resolved: RunConfig, fingerprint: str, force: bool) -> dict:
    """Load a checkpoint for a resume and refuse one whose settings or data differ (unless ``force``)."""
    payload = load_checkpoint(path)
    missing = [key for key in ("rng", "progress", "losses", "records", "metrics") if key not in payload]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} (format {payload['format_version']}) lacks {', '.join(missing)} and cannot be resumed "
            "bit-exactly; start a new run with --overwrite"
        )
    try:
        differences = resume_differences(payload["config"], resolved.to_dict())
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {path} holds a config this pyro_vae cannot read: {err}") from None
    if payload["data"].get("sha256") != fingerprint:
        differences.append(f"data fingerprint: {payload['data'].get('sha256', '?')[:12]}… → {fingerprint[:12]}…")
    if differences and not force:
        raise ConfigError(
            f"cannot resume {path}: these settings differ from the checkpoint's and would change the result: "
            f"{'; '.join(differences)}; restore them, or pass --force-resume to continue anyway"
        )
    if differences:
        logger.warning("resuming %s with changed settings (forced): %s", path, "; ".join(differences))
    return payload


def _restore(
    payload: dict,
    vae: VAE,
    optimizer: SingleOptimizer,
    schedules: dict[str, Any],
    tc: TrainConfig,
    device: torch.device,
    force: bool,
) -> _Progress:
    """Put the checkpoint's states into the model, optimiser, schedules and RNGs; return its progress."""
    vae.load_state_dict(payload["model"])
    state = payload["optimizer"]
    if force and state:
        # A forced resume applies the new hyperparameters; torch would otherwise restore the saved ones.
        for group in state["optimizer"]["param_groups"]:
            group.update(lr=tc.lr, weight_decay=tc.weight_decay)
    optimizer.load_state_dict(state)
    for name, schedule in schedules.items():
        if name in payload["schedules"]:
            schedule.load_state_dict(payload["schedules"][name])
    torch.set_rng_state(payload["rng"]["torch"])
    cuda_states = payload["rng"]["cuda"]
    if device.type == "cuda" and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    elif device.type == "cuda":
        logger.warning("the checkpoint holds no CUDA RNG state for this machine's GPUs; the noise will differ")
    return _Progress(**payload["progress"])


def _open_metrics(path: Path, payload: dict | None, epochs: list[EpochRecord]):
    """Open ``metrics.jsonl`` for appending: new for a new run; cut back to the checkpoint's position on resume (the
    lines written after it will be written again), or rebuilt from the checkpoint's records if it is shorter."""
    if payload is None:
        return open(path, "wb")
    offset = int(payload["metrics"]["offset"])
    if path.is_file() and path.stat().st_size >= offset:
        with open(path, "r+b") as f:
            f.truncate(offset)
    else:
        logger.warning("%s is missing or shorter than the checkpoint expects; rebuilding it from the checkpoint", path)
        _write_lines(path, [json.dumps(r.to_json()) for r in epochs])
    return open(path, "ab")


def _write_lines(path: Path, lines: list[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def _nonfinite_in_context(
    err: NonFiniteLossError, step: int, batch, n_batches: int, ckpts: CheckpointDir | None
) -> NonFiniteLossError:
    """The optimiser's message plus where in the run the bad batch was and the last good checkpoint."""
    index = batch.index.tolist()
    images = ", ".join(map(str, index[:8])) + (f", … ({len(index)} images)" if len(index) > 8 else "")
    latest = ckpts.latest() if ckpts is not None else None
    if latest is not None:
        hint = f"last good checkpoint: {latest}"
    else:
        hint = "no checkpoint yet" if ckpts is not None else "no run directory, so no checkpoint"
    error = NonFiniteLossError(
        f"{err} (step {step + 1}: epoch {batch.epoch}, batch {batch.step} of {n_batches}, images {images}); {hint}; "
        "lower the learning rate, set clip_norm, or pass --on-nonfinite skip"
    )
    error.step = getattr(err, "step", None)
    return error
