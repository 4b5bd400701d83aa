"""The training step, built once from a :class:`~pyro_vae.config.TrainConfig` and called once per minibatch.

::

    step = TrainStep(vae, TrainConfig(lr=1e-3), num_data=N)
    for x, index in minibatches:          # x (B, D), index (B,): rows of the N training images
        loss = step.step(x, index)        # nats per image; NaN for a skipped batch

:class:`TrainStep` binds the four separate objects of a Pyro fit, as :class:`pyro.infer.SVI` does: the model and
the guide (``vae.model``, ``vae.guide``, weighted by the KL schedule when there is one), the objective
(:func:`~pyro_vae.objectives.make_objective`) and the optimiser (:func:`~pyro_vae.optim.adamw`, whose non-finite
guard sees the loss through :class:`~pyro_vae.optim.GuardedSVI`). :func:`pyro_vae.train.fit`,
``benchmarks/train_speed.py`` and a user's own loop all call it, so they train alike, bit for bit.

With ``TrainConfig(compile=True)`` the steps after the first run through a compiled graph
(:func:`~pyro_vae.compile.compile_step`) where the configuration compiles, and eagerly (with one log line saying
why) where it does not; the optimiser, its guard and :meth:`TrainStep.state_dict` are the same either way, so a
checkpoint of a compiled run resumes eagerly and the other way round.
"""

from __future__ import annotations

import logging
from typing import Any

import pyro
import torch

from pyro_vae.compile import CompiledStep, compile_step
from pyro_vae.config import TrainConfig, check_int
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.model import VAE
from pyro_vae.objectives import make_objective
from pyro_vae.optim import GuardedSVI, SingleOptimizer, adamw
from pyro_vae.schedules import KLSchedule, kl_scaled, make_schedule

logger = logging.getLogger(__name__)

__all__ = ["TrainStep"]


class TrainStep:
    """One SVI step on a minibatch, with everything around it built once from the config.

    Built from ``config``: the objective (``objective``, ``num_particles``), the AdamW optimiser (``lr``,
    ``weight_decay``, ``clip_norm``) with its non-finite guard (``on_nonfinite``, ``max_skips``), and the KL schedule
    (``kl_schedule``), which weights the latent site of the model and the guide together and advances once per
    call. The other fields (epochs, batch size, device, threads, seed, ...) belong to the loop around the step and
    are not read here: move ``vae`` to its device and seed Pyro before the first call.

    **Validation.** Pyro's validation (supports, shapes) is on for the first call of each ``TrainStep`` and off for
    every later one, whatever the global setting: it would cost 6–9 % of every step, and the data were checked
    once when loaded.

    **The non-finite guard** covers the whole step. A NaN or infinite loss or gradient, and a non-finite parameter
    or sample that Pyro's validation refuses during the first step, all end the same way: no optimiser step, the
    parameters and the optimiser state unchanged, and with ``on_nonfinite="raise"`` a
    :class:`~pyro_vae.errors.NonFiniteLossError` whose ``.step`` (a :class:`~pyro_vae.optim.NonFiniteStep`) names
    the site or the parameter; with ``"skip"`` the call returns NaN and :attr:`skipped` grows (at most
    ``max_skips`` times, then it raises).

    **Compilation** (``config.compile``). The first call runs eagerly, with validation, as always. The second call
    traces the step once and hands it to ``torch.compile`` (:func:`~pyro_vae.compile.compile_step`; Inductor then
    compiles on the first compiled call), for a static batch size: the larger of the first two calls' batch sizes,
    so that a run resumed at an epoch's last, smaller batch still compiles for the full one. Every later batch of
    that size runs the graph; a batch of another size (an epoch's last, partial batch) runs the eager step, on the
    same optimiser. The noise comes from the same torch generator, so compiled and eager runs draw the same samples
    and differ only by float32 reassociation in Inductor's fused kernels. The KL schedule's weight is an input of the
    graph, written every step, so the default warm-up compiles. A configuration that cannot compile (the ``free_bits``
    schedule, ``iwae:k:dreg``, DistributedDataParallel, an untraceable guide) logs one line and stays eager.
    The compiled step adds no state: :meth:`state_dict` is the same with and without it.

    :param vae: the model to train, already on its device.
    :param config: the training settings.
    :param num_data: N, the number of images the minibatches are drawn from: the plate's size, which scales the
        minibatch ELBO by N / B. ``None`` treats each minibatch as the whole data set (N = B).
    :param total_steps: the steps the run will take, if known: a KL warm-up that would not reach weight 1 within
        them (the run would end on a weighted ELBO) is logged as one INFO line saying what to change.
    :raises ConfigError: for a config that is not a :class:`~pyro_vae.config.TrainConfig`, or a bad ``num_data``.

    :ivar SingleOptimizer optimizer: the optimiser (its state is part of :meth:`state_dict`).
    :ivar kl_schedule: the :class:`~pyro_vae.schedules.KLSchedule`, or ``None`` for the plain ELBO.
    :ivar objective: the :class:`pyro.infer.ELBO` (:func:`~pyro_vae.objectives.make_objective`).
    :ivar svi: the :class:`~pyro_vae.optim.GuardedSVI` that takes the eager steps.
    :ivar compiled: the :class:`~pyro_vae.compile.CompiledStep` once built, else ``None`` (eager, or not yet built).
    """

    def __init__(self, vae: VAE, config: TrainConfig, *, num_data: int | None = None, total_steps: int | None = None):
        if not isinstance(config, TrainConfig):
            raise ConfigError(
                f"TrainStep needs a pyro_vae.TrainConfig, got {type(config).__name__}; pass TrainConfig(...), or "
                "run_config.train for a RunConfig"
            )
        check_int("num_data (the training set's size)", num_data, low=1, allow_none=True)
        self.vae = vae
        self.config = config
        self.num_data = num_data
        self.optimizer: SingleOptimizer = adamw(
            config.lr,
            config.weight_decay,
            clip_norm=config.clip_norm,
            on_nonfinite=config.on_nonfinite,
            max_skips=config.max_skips,
        )
        model, guide = vae.model, vae.guide
        self.kl_schedule: KLSchedule | None = make_schedule(config.kl_schedule)
        if self.kl_schedule is not None:
            model, guide = kl_scaled(model, guide, self.kl_schedule, vae.latent_sites)  # both programs' latents
            unfinished = self.kl_schedule.unfinished_warning(total_steps) if total_steps is not None else None
            if unfinished is not None:  # INFO: legal, and the short smoke runs of tutorials and tests would be noisy
                logger.info(unfinished)
        self.objective = make_objective(config.objective, config.num_particles, enumerate=vae.enumerates)
        self.svi = GuardedSVI(model, guide, self.optimizer, self.objective)
        self._validate = True
        self.compiled: CompiledStep | None = None
        self._compile_pending = config.compile
        self._first_batch = 0

    def step(self, x: torch.Tensor, index: torch.Tensor | None = None, **labels) -> float:
        """One SVI step on the minibatch ``x``, then one step of the KL schedule.

        :param x: images ``(B, D)``, binarised as the likelihood needs.
        :param index: ``(B,)`` positions of the rows of ``x`` among the ``num_data`` images (default ``arange(B)``);
            they are the plate's subsample indices.
        :param labels: what a model with labels reads besides the images (:mod:`pyro_vae.labelled`): ``y=`` the
            labels of ``x``, and for M2 ``labelled=`` the step's :class:`~pyro_vae.labelled.LabelledPart`.
        :returns: the loss in nats per image: the minibatch's negative ELBO estimate (scaled to the data set by
            N / B) divided by ``num_data`` (plus the labelled set's size in a mixed M2 step), or by B when
            ``num_data`` is ``None``. NaN for a skipped batch.
        :raises NonFiniteLossError: for a non-finite loss, gradient or value, unless it is skipped.
        """
        if self._validate:
            return self._first_step(x, index, labels)
        if self._compile_pending:
            self._build_compiled(x)
        with pyro.validation_enabled(False):
            if self.compiled is not None:
                index = index if index is not None else torch.arange(x.shape[0], device=x.device)
                loss = self.compiled(x, index) / (self.num_data or x.shape[0])  # nats per image
            else:
                loss = self.svi.step(x, self.num_data, index, **labels) / self._images(x, labels)  # nats per image
        if self.kl_schedule is not None:
            self.kl_schedule.step()
        return loss

    def _images(self, x: torch.Tensor, labels: dict) -> int:
        """The images the loss sums over: N (or B), plus the labelled set's N_l in a mixed M2 step."""
        labelled = labels.get("labelled")
        return (self.num_data or x.shape[0]) + (labelled.num_data if labelled is not None else 0)

    def _first_step(self, x: torch.Tensor, index: torch.Tensor | None, labels: dict) -> float:
        self._check_batch(x, index)
        with pyro.validation_enabled(True):
            loss = self.svi.step(x, self.num_data, index, **labels) / self._images(x, labels)  # nats per image
        self._validate = False
        self._first_batch = x.shape[0]
        logger.info("first step checked with Pyro validation; later steps run with validation off")
        if self.kl_schedule is not None:
            self.kl_schedule.step()
        return loss

    def _build_compiled(self, x: torch.Tensor) -> None:
        """Trace and wrap the compiled step once (``None`` when it falls back: ``compile_step`` logs why)."""
        self._compile_pending = False
        self.compiled = compile_step(
            self.vae,
            self.objective,
            self.optimizer,
            num_data=self.num_data,
            batch_size=max(self._first_batch, x.shape[0]),
            device=x.device,
            kl_schedule=self.kl_schedule,
        )

    def _check_batch(self, x: torch.Tensor, index: torch.Tensor | None) -> None:
        """The minibatch's shapes, once: a wrong one would otherwise surface as a traceback from inside Pyro."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.vae.input_dim or x.shape[0] == 0:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"TrainStep.step needs images of shape (B, {self.vae.input_dim}) with B >= 1, got {got}")
        if self.num_data is not None and x.shape[0] > self.num_data:
            raise DataError(f"a minibatch of {x.shape[0]} images cannot come from num_data={self.num_data} images")
        if index is not None and (not isinstance(index, torch.Tensor) or tuple(index.shape) != (x.shape[0],)):
            got = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
            raise DataError(f"index must be a tensor of shape ({x.shape[0]},), one position per image, got {got}")

    @property
    def skipped(self) -> int:
        """Batches skipped by the non-finite guard so far."""
        return self.optimizer.skipped

    @property
    def grad_norm(self) -> float:
        """Total gradient 2-norm of the last step, before clipping (NaN before the first)."""
        return self.optimizer.grad_norm

    @property
    def kl_weight(self) -> float | None:
        """The KL schedule's current value, or ``None`` without a schedule."""
        return None if self.kl_schedule is None else self.kl_schedule.value

    @property
    def steps(self) -> int:
        """Batches consumed: optimiser steps taken plus batches skipped (restored by :meth:`load_state_dict`)."""
        return self.optimizer.steps + self.optimizer.skipped

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer": ..., "schedules": {"kl": ...}}``: plain data and tensors, loadable with
        ``torch.load(weights_only=True)`` (``"schedules"`` is empty without a KL schedule)."""
        schedules = {} if self.kl_schedule is None else {"kl": self.kl_schedule.state_dict()}
        return {"optimizer": self.optimizer.state_dict(), "schedules": schedules}

    def load_state_dict(self, state: dict[str, Any], *, hyperparameters_from_config: bool = False) -> None:
        """Restore :meth:`state_dict` (the model's own state is ``vae.load_state_dict``'s business).

        :param state: a :meth:`state_dict`.
        :param bool hyperparameters_from_config: apply this step's ``lr`` and ``weight_decay`` to the restored
            optimiser (a forced resume with changed settings); by default torch restores the saved ones.
        """
        optimizer_state = state["optimizer"]
        if hyperparameters_from_config and optimizer_state:
            inner = dict(optimizer_state["optimizer"])
            inner["param_groups"] = [
                {**group, "lr": self.config.lr, "weight_decay": self.config.weight_decay}
                for group in inner["param_groups"]
            ]
            optimizer_state = {**optimizer_state, "optimizer": inner}
        self.optimizer.load_state_dict(optimizer_state)
        if self.kl_schedule is not None and "kl" in state.get("schedules", {}):
            self.kl_schedule.load_state_dict(state["schedules"]["kl"])
