"""What happens around the training loop: progress, metrics, TensorBoard, checkpoints, early stopping, signals.

:func:`pyro_vae.train.fit` reads like the algorithm (for each epoch, run the steps, then evaluate); everything else is
a callback with four hooks, called in list order:

==================  ==================================================================================================
``on_fit_start``    once, with the loop (see below), after a resume has been restored and before the first step
``on_step_end``     after every step, with a :class:`StepState`
``on_epoch_end``    after every epoch's evaluation, with an :class:`EpochRecord`
``on_fit_end``      once, with the :class:`~pyro_vae.train.FitResult`, when training ended normally
``close``           always, last, also when training stopped with an exception (release files, handlers, bars)
==================  ==================================================================================================

Any object with some of these methods will do; :class:`Callback` gives no-op defaults. A hook that raises stops
training and propagates out of ``fit`` (no checkpoint is written for it).

The loop handed to ``on_fit_start`` exposes: ``vae``, ``config``, ``train_step`` (the
:class:`~pyro_vae.train.TrainStep`), ``run`` (the :class:`~pyro_vae.run_dir.RunDir`, or ``None``), ``ctx`` (the
torchrun context or ``None``), ``resumed`` (the :class:`~pyro_vae.checkpoint.TrainingState` resumed from, or
``None``), ``step`` and ``total_steps``, ``n_batches``, ``stop_reason``, ``request_stop(reason)``, ``save()`` (write
a checkpoint of the current position and return its path, ``None`` without a writer), ``training_state()``,
``metrics_offset`` and ``callback_states`` (a dict of name → zero-argument function giving a callback's plain state,
saved in every checkpoint).

The run directory's writer callbacks (:class:`MetricsLog`, :class:`TensorBoardLog`, :class:`Checkpointer`) exist only
where there is a run directory and only on rank 0; without one, ``fit`` simply has none of them.
"""

from __future__ import annotations

import logging
import math
import shlex
import signal
import threading
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from pyro_vae.config import check_float, check_int
from pyro_vae.distributed import any_rank
from pyro_vae.errors import ConfigError, PyroVAEError
from pyro_vae.progress import show_bar
from pyro_vae.stats import MeanSE

logger = logging.getLogger(__name__)

__all__ = [
    "Callback",
    "CallbackList",
    "Checkpointer",
    "EarlyStopping",
    "EpochRecord",
    "MetricsLog",
    "ProgressBar",
    "SignalStop",
    "StepState",
    "TensorBoardLog",
    "TrainingInterrupted",
]

HOOKS = ("on_fit_start", "on_step_end", "on_epoch_end", "on_fit_end")


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
    lr: float | None = None
    accuracy: float | None = None  # M2: test accuracy of q(y | x); None for the other models

    def to_json(self) -> dict:
        """One line of ``metrics.jsonl``: the fields, each statistic as its mean, plus ``test_elbo_se``."""
        line = {}
        for key, value in self._asdict().items():
            line[key] = value.mean if isinstance(value, MeanSE) else value
            if key == "test_elbo":
                line["test_elbo_se"] = value.se
        return line

    def to_state(self) -> dict:
        """Plain values for a checkpoint (:meth:`from_state` inverts it)."""
        return {k: dict(v._asdict()) if isinstance(v, MeanSE) else v for k, v in self._asdict().items()}

    @classmethod
    def from_state(cls, state: dict) -> EpochRecord:
        return cls(**{k: MeanSE(**v) if isinstance(v, dict) else v for k, v in state.items()})


class StepState(NamedTuple):
    """What a callback's ``on_step_end`` sees after each training step.

    :ivar int epoch: epoch of the batch just trained on.
    :ivar int batch: position of that batch in its epoch, from 0.
    :ivar int step: steps done so far in the run (batches consumed, skipped ones included).
    :ivar float loss: the step's loss, the negative ELBO estimate in nats per image (NaN for a skipped batch).
    :ivar vae: the model being trained.
    :ivar optimizer: its :class:`~pyro_vae.optim.SingleOptimizer`.
    :ivar run_dir: the run directory's path, or ``None``.
    """

    epoch: int
    batch: int
    step: int
    loss: float
    vae: Any
    optimizer: Any
    run_dir: Path | None


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


class Callback:
    """Base class of :func:`~pyro_vae.train.fit` callbacks; override the hooks you need."""

    def on_fit_start(self, loop) -> None:
        """Called once before the first step (after a resume has been restored)."""

    def on_step_end(self, state: StepState) -> None:
        """Called after every step, before the step's checkpoint (if one is due)."""

    def on_epoch_end(self, record: EpochRecord) -> None:
        """Called after every epoch's evaluation, before the epoch's checkpoint."""

    def on_fit_end(self, result) -> None:
        """Called once when training ended normally."""

    def close(self) -> None:
        """Called last, always: release what the callback holds."""


class CallbackList:
    """Calls each hook on every callback that has it, in order; a context manager whose exit calls every ``close``
    (in reverse order, each even if an earlier one failed)."""

    def __init__(self, callbacks):
        self.callbacks = list(callbacks)
        self._hooks = {
            name: [h for cb in self.callbacks if (h := getattr(cb, name, None))] for name in (*HOOKS, "close")
        }

    def __enter__(self) -> CallbackList:
        return self

    def __exit__(self, *exc) -> None:
        errors = []
        for close in reversed(self._hooks["close"]):
            try:
                close()
            except Exception as err:  # noqa: BLE001 - every callback gets closed; the first failure is re-raised
                errors.append(err)
        # One exception propagates (the one in flight, else the first close error); the rest are logged, not lost.
        for err in errors if exc[0] is not None else errors[1:]:
            logger.error("a callback's close() failed: %s: %s", type(err).__name__, err, exc_info=err)
        if errors and exc[0] is None:
            raise errors[0]

    def on_fit_start(self, loop) -> None:
        for hook in self._hooks["on_fit_start"]:
            hook(loop)

    def on_step_end(self, state: StepState) -> None:
        for hook in self._hooks["on_step_end"]:
            hook(state)

    def on_epoch_end(self, record: EpochRecord) -> None:
        for hook in self._hooks["on_epoch_end"]:
            hook(record)

    def on_fit_end(self, result) -> None:
        for hook in self._hooks["on_fit_end"]:
            hook(result)


class ProgressBar(Callback):
    """A tqdm bar over the run's steps, with the minibatch ELBO every 10 steps.

    :param show: ``None`` shows it only when stderr is a terminal.
    """

    def __init__(self, show: bool | None = None):
        self.show = show_bar(show)
        self.bar = None

    def on_fit_start(self, loop) -> None:
        self.bar = tqdm(
            total=loop.total_steps, initial=loop.step, disable=not self.show, unit="step", dynamic_ncols=True
        )

    def on_step_end(self, state: StepState) -> None:
        self.bar.update()
        if state.step % 10 == 0 and math.isfinite(state.loss):
            self.bar.set_postfix(elbo=f"{-state.loss:.2f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLog(Callback):
    """One JSON line per epoch in ``RUN/metrics.jsonl`` (see :meth:`EpochRecord.to_json`), plus ``stop_reason`` on
    the line of an epoch after which training stopped early. On resume the log is cut back to the checkpoint's
    offset first, so that the epochs trained again are not recorded twice."""

    def __init__(self, run):
        self.run, self.log, self.loop = run, None, None

    def on_fit_start(self, loop) -> None:
        self.loop = loop
        offset = None if loop.resumed is None else loop.resumed.metrics_offset
        self.log = self.run.metrics(offset, rebuild=[record.to_json() for record in loop.records])
        loop.metrics_offset = self.log.offset

    def on_epoch_end(self, record: EpochRecord) -> None:
        line = record.to_json()
        if self.loop.stop_reason is not None:
            line["stop_reason"] = self.loop.stop_reason
        self.log.append(line)
        self.loop.metrics_offset = self.log.offset

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


class TensorBoardLog(Callback):
    """Scalars under ``RUN/tensorboard/``: per step the minibatch ELBO, per epoch the train and test ELBO, the test
    reconstruction and KL, the KL weight, the gradient norm and the learning rate (``tensorboard --logdir RUN``).

    Needs the ``tensorboard`` package (``pip install "pyro_vae[tensorboard]"``); without it the constructor raises
    a :class:`~pyro_vae.errors.ConfigError` that says so, before anything is trained or written.
    """

    EVERY = 10  #: steps between minibatch-ELBO points

    def __init__(self, run):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--tensorboard needs the tensorboard package, which is not installed; "
                'install it with: pip install "pyro_vae[tensorboard]"'
            ) from None
        self._writer_class, self.run = SummaryWriter, run
        self.writer, self._purge = None, None  # _purge: set by on_fit_start

    def on_fit_start(self, loop) -> None:
        # purge_step drops events a crashed run wrote after the checkpoint being resumed, as the metrics log does.
        self._purge = loop.step + 1 if loop.resumed is not None else None

    def _write(self, tag: str, value: float, step: int) -> None:
        # The writer (and RUN/tensorboard/) is made at the first scalar, which comes after the Checkpointer's first
        # checkpoint: a run that fails before it must leave nothing behind, and RunDir removes only its own files.
        if self.writer is None:
            self.writer = self._writer_class(log_dir=str(self.run.path / "tensorboard"), purge_step=self._purge)
        self.writer.add_scalar(tag, value, step)

    def on_step_end(self, state: StepState) -> None:
        if state.step % self.EVERY == 0 and math.isfinite(state.loss):
            self._write("train/minibatch_elbo", -state.loss, state.step)

    def on_epoch_end(self, record: EpochRecord) -> None:
        scalars = {
            "train/elbo": record.train_elbo,
            "test/elbo": record.test_elbo.mean,
            "test/reconstruction": record.test_reconstruction.mean,
            "test/kl": record.test_kl.mean,
            "train/kl_weight": record.kl_weight,
            "train/grad_norm": record.grad_norm,
            "train/lr": record.lr,
        }
        for tag, value in scalars.items():
            if value is not None and math.isfinite(value):
                self._write(tag, value, record.step)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class EarlyStopping(Callback):
    """Stop when the test ELBO has not improved by more than ``min_delta`` nats for ``patience`` epochs.

    The best epoch's state is kept as ``RUN/best.pt`` by the :class:`Checkpointer`; the patience count is saved in
    every checkpoint, so a resumed run continues it. The metrics line of the last epoch says why training stopped.

    :param int patience: epochs without improvement before stopping (>= 1).
    :param float min_delta: the least increase of the test ELBO (nats per image) that counts as an improvement.
    """

    name = "early_stopping"

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience = check_int("early-stopping patience", patience, low=1)
        self.min_delta = float(check_float("early-stopping min_delta", min_delta, low=0.0))
        self.best, self.best_epoch, self.waited = -math.inf, None, 0
        self.improved, self.loop = False, None

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "waited": self.waited}

    def on_fit_start(self, loop) -> None:
        self.loop = loop
        loop.callback_states[self.name] = self.state_dict
        saved = loop.resumed.callbacks.get(self.name) if loop.resumed is not None else None
        if saved:
            self.best, self.best_epoch, self.waited = float(saved["best"]), saved["best_epoch"], int(saved["waited"])
        if self.waited >= self.patience:  # the resumed run had stopped early (or the patience was lowered)
            self._stop()

    def on_epoch_end(self, record: EpochRecord) -> None:
        # A partial epoch's record (a max_steps stop mid-epoch; its epoch is recorded again when a resume completes
        # it) is no epoch of patience: counting it would make an interrupted run stop earlier than an uninterrupted.
        partial = self.loop.position.batch > 0
        value = record.test_elbo.mean
        self.improved = not partial and value > self.best + self.min_delta
        if self.improved:
            self.best, self.best_epoch, self.waited = value, record.epoch, 0
        elif not partial:
            self.waited += 1
            if self.waited >= self.patience:
                self._stop()

    def _stop(self) -> None:
        self.loop.request_stop(
            f"early stopping: the test ELBO did not improve by more than {self.min_delta:g} nats for "
            f"{self.waited} epochs (best {self.best:.4f} after epoch {self.best_epoch})"
        )


class Checkpointer(Callback):
    """Writes ``config.json`` and the starting checkpoint, a checkpoint every ``every`` steps (within an epoch), one
    at every epoch end, and ``best.pt`` whenever ``best`` (an :class:`EarlyStopping`) saw an improvement.

    :param run: the :class:`~pyro_vae.run_dir.RunDir` (opened for writing).
    :param every: steps between mid-epoch checkpoints, or ``None``.
    :param best: the run's :class:`EarlyStopping`, or ``None``.
    """

    def __init__(self, run, every: int | None = None, best: EarlyStopping | None = None):
        self.run, self.every, self.best = run, every, best
        self.loop = None

    def on_fit_start(self, loop) -> None:
        self.loop = loop
        self.run.write_config(loop.run_record())
        if loop.resumed is None:
            loop.save()  # the starting point: a run killed before its first epoch ends can still be resumed

    def on_step_end(self, state: StepState) -> None:
        if self.every and state.step % self.every == 0 and state.batch + 1 < self.loop.n_batches:
            self.loop.save()

    def on_epoch_end(self, record: EpochRecord) -> None:
        self.loop.save()
        if self.best is not None and self.best.improved:
            self.run.save_best(self.loop.training_state())


class SignalStop(Callback):
    """While training, the first SIGINT or SIGTERM only sets a flag: the current step finishes, a checkpoint is
    written and :class:`TrainingInterrupted` is raised. A second signal restores the previous handlers and stops at
    once (``KeyboardInterrupt`` for SIGINT, ``SystemExit(143)`` for SIGTERM); the atomic writes keep the files whole
    either way. Under torchrun all ranks stop at the same step (a flag on any rank stops all). Handlers can only be
    installed from the main thread; elsewhere signals keep their usual effect."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self.loop = None

    def on_fit_start(self, loop) -> None:
        self.loop = loop
        if threading.current_thread() is not threading.main_thread():
            logger.debug("fit runs outside the main thread: SIGINT/SIGTERM keep their default effect")
            return
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            self.close()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.received = signum

    def _stop_now(self) -> bool:
        received = self.received is not None
        return received if self.loop.ctx is None else any_rank(received)

    def on_step_end(self, state: StepState) -> None:
        if self._stop_now():
            self._interrupt(self.loop.save(), state.epoch, state.batch + 1)

    def on_epoch_end(self, record: EpochRecord) -> None:
        if self._stop_now():
            self._interrupt(self.loop.last_checkpoint, record.epoch, self.loop.position.batch or self.loop.n_batches)

    def _interrupt(self, checkpoint: Path | None, epoch: int, position: int) -> None:
        signum = self.received or signal.SIGTERM
        step = self.loop.step
        where = (
            f"interrupted at step {step} by {signal.Signals(signum).name} "
            f"(epoch {epoch}, batch {position} of {self.loop.n_batches})"
        )
        if checkpoint is not None:
            where += (
                f"; checkpoint written to {checkpoint}; resume with: pyro-vae train --resume "
                f"{shlex.quote(str(self.loop.run.path))}"
            )
        raise TrainingInterrupted(where, signal_number=signum, step=step, checkpoint=checkpoint)

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
