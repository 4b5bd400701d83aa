"""The training loop: :func:`fit` runs a :class:`TrainStep` (``SVI.step`` inside ``pyro.plate("data", size=N,
subsample=idx)``, Pyro validation on for the first step only) over minibatches; callbacks do the rest.

What happens around the loop lives in :mod:`pyro_vae.callbacks`; the run directory in
:class:`~pyro_vae.run_dir.RunDir`; the checkpoint payload, everything a bit-exact resume needs, in
:class:`~pyro_vae.checkpoint.TrainingState`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import pyro
import torch

from pyro_vae.callbacks import (
    Callback,
    CallbackList,
    Checkpointer,
    EarlyStopping,
    EpochRecord,
    MetricsLog,
    ProgressBar,
    SignalStop,
    StepState,
    TensorBoardLog,
    TrainingInterrupted,
)
from pyro_vae.checkpoint import Progress, TrainingState, capture_rng, environment_info, restore_rng
from pyro_vae.config import RunConfig
from pyro_vae.data import (
    Dataset,
    binarize_eval,
    check_batch_size,
    check_dataset,
    check_likelihood_data,
    data_record,
    derive_seed,
)
from pyro_vae.distributed import ddp, noise_seed, resolve_device, session, sum_over_ranks
from pyro_vae.errors import ConfigError, NonFiniteLossError
from pyro_vae.labelled.training import check_label_inputs, epoch_evaluation, step_labels, training_data
from pyro_vae.model import VAE
from pyro_vae.run_dir import RunDir
from pyro_vae.run_dir.opening import open_run
from pyro_vae.step import TrainStep

logger = logging.getLogger(__name__)

__all__ = [
    "Callback",
    "EpochRecord",
    "FitResult",
    "StepState",
    "TrainStep",
    "TrainingInterrupted",
    "fit",
]


class FitResult(NamedTuple):
    """The outcome of :func:`fit`.

    :ivar losses: per-step loss, the negative ELBO estimate in nats per image (Python floats; NaN where skipped).
    :ivar epochs: one :class:`EpochRecord` per completed epoch.
    :ivar steps: steps done in the run (batches consumed, skipped ones included; after a resume, the run's total).
    :ivar run_dir: the run directory, or ``None``.
    :ivar optimizer: the optimiser (its state continues a run).
    :ivar stop_reason: why training ended before its budget (early stopping), else ``None``.
    """

    losses: list[float]
    epochs: list[EpochRecord]
    steps: int
    run_dir: Path | None
    optimizer: object
    stop_reason: str | None = None

    @property
    def test_elbo(self):
        """Test ELBO after the last epoch (a :class:`~pyro_vae.stats.MeanSE`), or ``None``."""
        return self.epochs[-1].test_elbo if self.epochs else None


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

    Every input is checked before anything is trained or written, and a refused run leaves nothing behind. With a
    run directory (one writer at a time: :class:`~pyro_vae.run_dir.RunDir` holds its lock), ``config.json`` is
    written first, then one ``metrics.jsonl`` line and one checkpoint per epoch (and one every ``checkpoint_every``
    steps). ``resume`` continues from a checkpoint: data order is a pure function of (seed, epoch) and the position
    within the epoch is restored by skipping indices, so on CPU with the same thread count an interrupted and
    resumed run equals an uninterrupted one bit for bit. A checkpoint whose determinism-relevant settings
    (:func:`~pyro_vae.config.resume_differences`), world size or data differ is refused unless ``force_resume``.

    SIGINT/SIGTERM finish the step, write a checkpoint and raise :class:`TrainingInterrupted`. A non-finite loss,
    gradient or value takes no step and raises :class:`~pyro_vae.errors.NonFiniteLossError` naming the step,
    images, site or parameter and the last good checkpoint (or is skipped: ``train.on_nonfinite="skip"``).

    :param vae: the model; moved to the configured device.
    :param data: a loaded :class:`~pyro_vae.data.Dataset`.
    :param config: the run configuration (default: defaults, with the model section taken from ``vae.config``); its
        ``model`` section must describe ``vae``.
    :param out_dir: run directory (``None``: write nothing, install no signal handlers).
    :param resume: ``True`` continues the run in ``out_dir`` from its newest good checkpoint; a path names a
        checkpoint file (e.g. ``run/last.prev.pt``), whose directory is the run directory.
    :param bool overwrite: replace the run in ``out_dir`` (only the files a run writes are removed).
    :param bool force_resume: resume although settings changed, or adopt a checkpoint from another run.
    :param callbacks: extra callbacks (see :mod:`pyro_vae.callbacks`), called after the built-in readers and before
        the checkpoint of each step or epoch.
    :returns: a :class:`FitResult`; after a resume its losses and epochs cover the whole run.
    """
    config = _consistent_config(vae, config)
    _check_inputs(vae, data, config, callbacks)
    with (
        session(config) as ctx,
        open_run(out_dir, resume, overwrite, force_resume, config.train.keep_last, ctx) as run,
    ):
        loop = _Loop(vae, data, config, ctx, run, force_resume)
        with CallbackList(_callbacks(config, loop, list(callbacks))) as hooks:
            hooks.on_fit_start(loop)
            with loop.distributed():
                for epoch in loop.epochs():
                    for batch in loop.batches(epoch):
                        hooks.on_step_end(loop.train_on(batch))
                    if loop.epoch_owed(epoch):
                        hooks.on_epoch_end(loop.end_epoch(epoch))
            result = loop.result()
            hooks.on_fit_end(result)
    return result


def _callbacks(config: RunConfig, loop: _Loop, extra: list) -> list:
    """Readers first, then the user's callbacks, then what writes the step's or epoch's checkpoint, then signals."""
    tc = config.train
    given = [cb for cb in extra if isinstance(cb, EarlyStopping)]
    extra = [cb for cb in extra if not isinstance(cb, EarlyStopping)]
    early = given[0] if given else None
    if tc.early_stop is not None and not given:
        early = EarlyStopping(tc.early_stop, tc.early_stop_min_delta)
    writer = loop.run is not None and loop.is_main
    out = [cb for cb in (early, ProgressBar(tc.progress)) if cb is not None]
    if writer:
        out += [MetricsLog(loop.run)] + ([TensorBoardLog(loop.run)] if tc.tensorboard else [])
    out += extra
    if writer:
        out.append(Checkpointer(loop.run, tc.checkpoint_every, early))
    return out + ([SignalStop()] if loop.run is not None else [])


class _Loop:
    """The state of one :func:`fit`: position, losses, records, the step, and what callbacks may ask of it."""

    def __init__(self, vae: VAE, data: Dataset, config: RunConfig, ctx, run: RunDir | None, force: bool):
        tc, dc = config.train, config.data
        self.vae, self.config, self.ctx, self.run, self.data = vae, config, ctx, run, data
        self.device = ctx.device if ctx is not None else resolve_device(tc.device)
        self.rank, self.world_size = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        self.is_main = self.rank == 0
        if tc.threads is not None:
            torch.set_num_threads(tc.threads)  # process-wide, as torch has it; recorded in the resolved config
        # The resolved config records what "auto" and "default threads" meant, so that a resume can compare them.
        self.resolved = config.replace(train={"threads": torch.get_num_threads(), "device": self.device.type})
        self.training = training_data(vae, data, config, self.device, self.rank, self.world_size)
        labels = None if self.training.labelled is None else self.training.labelled.sha256
        self.data_record = data_record(data, config.data)._replace(labels=labels)  # sizes, fingerprints, path
        self.fingerprint = self.data_record.sha256
        self.resumed = run.resume_state() if run is not None and run.resuming else None
        if self.resumed is not None:
            self._check_resumable(force)
        vae.to(self.device)
        self.x_test = binarize_eval(data.x_test, dc.binarize, tc.seed, dc.threshold).to(self.device)
        self.y_test = None if data.y_test is None or vae.kind == "vae" else data.y_test.to(self.device)
        self.batch_source, self.n_train = self.training.batches, self.training.num_data
        self.n_batches = len(self.batch_source)
        self.losses: list[float] = []
        self.records: list[EpochRecord] = []
        self.position = Progress()
        self.stop_reason: str | None = None
        self.metrics_offset, self.last_checkpoint = 0, None  # metrics.jsonl bytes the state matches; a Path or None
        self.callback_states: dict = {}
        self.total_steps = min(tc.epochs * self.n_batches, tc.max_steps or math.inf)
        main_steps = self.total_steps if self.is_main else None  # rank 0 alone warns of an unfinished warm-up
        self.train_step = TrainStep(vae, tc, num_data=self.n_train, total_steps=main_steps)
        self._began = time.perf_counter()
        if self.resumed is not None:
            self._restore(force)  # with the prior's parameters (a VampPrior's pseudo-inputs) from the checkpoint
        else:  # a new run: the prior starts from the run's seed (a VampPrior from training images, chosen by it)
            vae.prior.initialise(data.x_train, torch.Generator().manual_seed(derive_seed("prior", tc.seed)))
            pyro.set_rng_seed(tc.seed if ctx is None else noise_seed(tc.seed, self.rank))

    # -- position --------------------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.position.step

    def epochs(self) -> Iterator[int]:
        for epoch in range(self.position.epoch, self.config.train.epochs):
            if self.done:
                return
            if epoch != self.position.epoch:
                self.position = Progress(epoch, 0, self.step)
            self._began = time.perf_counter()
            yield epoch

    def batches(self, epoch: int):
        for batch in self.batch_source.batches(epoch, start=self.position.batch):
            if self.done:
                return
            yield batch

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps or self.stop_reason is not None

    def request_stop(self, reason: str) -> None:
        """Stop after the current step or epoch (e.g. early stopping); ``reason`` goes into the metrics."""
        self.stop_reason = reason
        logger.info("%s", reason)

    def _seconds(self) -> float:
        return self.position.seconds + time.perf_counter() - self._began

    # -- the step and the epoch ------------------------------------------------------------------------------------
    def train_on(self, batch) -> StepState:
        try:
            loss = self.train_step.step(batch.x, batch.index, **self._labels(batch))
        except NonFiniteLossError as err:
            raise self._nonfinite_in_context(err, batch) from err
        self.losses.append(loss)
        seconds = self._seconds()
        self._began = time.perf_counter()
        self.position = Progress(batch.epoch, batch.step + 1, self.step + 1, False, seconds)
        return StepState(batch.epoch, batch.step, self.step, loss, self.vae, self.train_step.optimizer, self._path())

    def _labels(self, batch) -> dict:
        labelled = self.training.labelled
        return step_labels(self.vae, batch, None if labelled is None else labelled.n)

    def epoch_owed(self, epoch: int) -> bool:
        """Whether this epoch's record is due: it trained at least one step here, or it was resumed in its middle
        and its record was not written before the stop (a ``max_steps`` stop records a partial epoch)."""
        p = self.position
        return p.epoch == epoch and not p.recorded and p.batch > 0

    def end_epoch(self, epoch: int) -> EpochRecord:
        seconds = self._seconds()
        with pyro.validation_enabled(False):  # non-finite weights are the guard's to report, not a ValueError's
            result, accuracy = epoch_evaluation(self.vae, self.x_test, self.y_test, self.config.train.seed, self.ctx)
        if not math.isfinite(result.elbo.mean):
            latest = self.run.latest() if self.run is not None else None
            raise NonFiniteLossError(
                f"the test ELBO after epoch {epoch} is {result.elbo.mean} ({self.train_step.skipped} batches were "
                f"skipped for non-finite values); last good checkpoint: {latest}; lower the learning rate or set "
                "clip_norm"
            )
        epoch_start = self.step - self.position.batch
        finite = [v for v in self.losses[epoch_start : self.step] if math.isfinite(v)]
        total, count = sum_over_ranks(math.fsum(finite), len(finite))  # every rank's steps under torchrun
        step = self.train_step
        record = EpochRecord(
            epoch, self.step, -total / max(count, 1), result.elbo, result.reconstruction, result.kl, seconds,
            step.grad_norm, step.kl_weight, self.config.train.lr, None if accuracy is None else accuracy.mean,
        )  # fmt: skip
        self.records.append(record)
        score = "" if accuracy is None else f", test accuracy {accuracy.mean:.4f}"
        logger.info("epoch %d: train ELBO %.2f, test ELBO %s%s", epoch, record.train_elbo, record.test_elbo, score)
        complete = self.position.batch == self.n_batches
        self.position = Progress(epoch + 1, 0, self.step) if complete else self.position._replace(recorded=True)
        self.position = self.position._replace(seconds=0.0 if complete else seconds)
        self._began = time.perf_counter()
        return record

    def result(self) -> FitResult:
        if self.train_step.skipped:
            logger.warning(
                "%d batches were skipped for non-finite values (on_nonfinite='skip')", self.train_step.skipped
            )
        return FitResult(
            self.losses, self.records, self.step, self._path(), self.train_step.optimizer, self.stop_reason
        )

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def _path(self) -> Path | None:
        return self.run.path if self.run is not None else None

    def training_state(self) -> TrainingState:
        tc, data = self.config.train, self.data
        step_state = self.train_step.state_dict()
        return TrainingState(
            run_id=self.run.run_id,
            config=self.resolved.to_dict(),
            versions=environment_info(),
            input_dim=self.vae.input_dim,
            image_shape=list(data.image_shape) if data.image_shape else None,
            data=self.data_record,
            world_size=self.world_size,
            global_batch=tc.batch_size * self.world_size,
            model=self.vae.state_dict(),
            optimizer=step_state["optimizer"],
            schedules=step_state["schedules"],
            rng=capture_rng(self.device),
            progress=self.position._replace(seconds=self._seconds()) if self.position.batch else self.position,
            losses=torch.tensor(self.losses, dtype=torch.float64),
            records=[r.to_state() for r in self.records],
            metrics_offset=self.metrics_offset,
            callbacks={name: state() for name, state in self.callback_states.items()},
        )

    def save(self) -> Path | None:
        """Write a checkpoint of the current position (rank 0 with a run directory; else nothing)."""
        if self.run is None or not self.is_main:
            return None
        self.last_checkpoint = self.run.save_checkpoint(self.training_state())
        return self.last_checkpoint

    def run_record(self) -> dict:
        """What ``config.json`` holds besides the run id."""
        return {
            "config": self.config.to_dict(),
            "environment": environment_info(),
            "device": str(self.device),
            "world_size": self.world_size,
            "global_batch": self.config.train.batch_size * self.world_size,
            "data": dict(self.data_record._asdict()),
            "resumed_from": None if self.resumed is None else {"step": self.resumed.progress.step},
            "labelled": None if self.training.labelled is None else dict(self.training.labelled._asdict()),
            "aux_weight": getattr(self.vae, "aux_weight", None),  # M2's α as trained (0.1·N unless given)
        }  # fmt: skip

    # -- resume ----------------------------------------------------------------------------------------------------
    def _check_resumable(self, force: bool) -> None:
        state, source = self.resumed, self.run.source
        differences = state.differences(self.resolved.to_dict(), self.world_size, self.fingerprint, self.data_record)
        if differences and not force:
            raise ConfigError(
                f"cannot resume {source}: these settings differ from the checkpoint's and would change the result: "
                f"{'; '.join(differences)}; restore them, or pass --force-resume to continue anyway"
            )
        if differences:
            logger.warning("resuming %s with changed settings (forced): %s", source, "; ".join(differences))

    def _restore(self, force: bool) -> None:
        state, tc = self.resumed, self.config.train
        state.load_weights(self.vae, source=self.run.source)
        self.train_step.load_state_dict(
            {"optimizer": state.optimizer, "schedules": state.schedules}, hyperparameters_from_config=force
        )
        restore_rng(state.rng, self.device)
        self.position = state.progress
        self.losses = state.losses.tolist()
        self.records = [EpochRecord.from_state(r) for r in state.records]
        if self.position.step >= self.total_steps and tc.max_steps is not None and tc.max_steps == self.total_steps:
            raise ConfigError(
                f"nothing to resume: the run in {self.run.path} already took {self.position.step} steps and max_steps "
                f"is {tc.max_steps}; pass a larger --max-steps to train on (epochs={tc.epochs} allows "
                f"{tc.epochs * self.n_batches})"
            )
        if self.position.step >= self.total_steps:
            logger.warning("the run in %s already completed its %d epochs; nothing to train", self.run.path, tc.epochs)
        logger.info("resuming %s at epoch %d, batch %d (step %d)", self.run.path, *self.position[:3])
        if self.ctx is not None:
            # The checkpoint holds rank 0's RNG state only: each rank re-seeds its own noise stream at this step.
            torch.manual_seed(noise_seed(tc.seed, self.rank, self.step))

    @contextlib.contextmanager
    def distributed(self):
        """Under torchrun, route the VAE's modules through DDP while training (see :func:`pyro_vae.distributed`)."""
        self.vae.train()
        with ddp(self.vae, self.ctx):
            yield

    def _nonfinite_in_context(self, err: NonFiniteLossError, batch) -> NonFiniteLossError:
        """The guard's message plus where in the run the bad batch was and the last good checkpoint."""
        index = batch.index.tolist()
        images = ", ".join(map(str, index[:8])) + (f", … ({len(index)} images)" if len(index) > 8 else "")
        latest = self.run.latest() if self.run is not None else None
        hint = (
            f"last good checkpoint: {latest}" if latest else ("no checkpoint yet" if self.run else "no run directory")
        )
        if getattr(err, "on_nonfinite", "raise") == "raise":
            fix = "lower the learning rate, set clip_norm, or pass --on-nonfinite skip"
        else:
            fix = (
                f"lower the learning rate or set clip_norm; --on-nonfinite skip is on and {err.skipped} batches were "
                f"skipped already (raise --max-skips, now {err.max_skips}, to allow more)"
            )
        error = NonFiniteLossError(
            f"{err} (step {self.step + 1}: epoch {batch.epoch}, batch {batch.step} of {self.n_batches}, "
            f"images {images}); {hint}; {fix}"
        )
        for name in ("step", "on_nonfinite", "skipped", "max_skips"):
            setattr(error, name, getattr(err, name, None))
        return error


def _check_inputs(vae: VAE, data: Dataset, config: RunConfig, callbacks: Sequence) -> None:
    """Everything about the data that can be refused before a run directory is touched."""
    check_dataset(data)
    if sum(isinstance(cb, EarlyStopping) for cb in callbacks) + (config.train.early_stop is not None) > 1:
        raise ConfigError("early stopping is given twice; set train.early_stop or pass one EarlyStopping callback")
    vae.check_data_shape(data.input_dim, data.image_shape)
    check_label_inputs(vae, data, config)
    check_batch_size(data.x_train.shape[0], config.train.batch_size)
    check_likelihood_data(data, config.data.binarize, vae.likelihood)


def _consistent_config(vae: VAE, config: RunConfig | None) -> RunConfig:
    """The run config with a model section that describes ``vae``; a config that contradicts the VAE is refused, so
    that ``config.json`` never records a model other than the one trained."""
    if config is None:
        return RunConfig(model=vae.config) if vae.config is not None else RunConfig()
    if vae.config is not None and config.model.num_classes is None and vae.config.num_classes is not None:
        config = config.replace(model={"num_classes": vae.config.num_classes})  # the data's C, which built the model
    if vae.config is not None and config.model != vae.config:
        differ = [
            f"{name} ({getattr(config.model, name)!r} in the config, {getattr(vae.config, name)!r} in the VAE)"
            for name in vae.config.__dataclass_fields__
            if getattr(config.model, name) != getattr(vae.config, name)
        ]
        raise ConfigError(
            f"config.model does not describe the VAE: {'; '.join(differ)}; "
            "build it with pyro_vae.labelled.build_model(config.model, data.input_dim, data.image_shape, "
            "num_classes(data)) (VAE.from_config for the VAE)"
        )
    return config
