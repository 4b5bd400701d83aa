"""What :func:`pyro_vae.train.fit` does differently for a model with labels: which images it trains on, which
labels each step passes to the Pyro programs, and what it measures after each epoch.

* **VAE**: the training images in :class:`~pyro_vae.data.EpochBatches`, labels ignored (unchanged, bit for bit).
* **CVAE**: the labelled images (all, or the ``--labelled`` N chosen by :func:`~pyro_vae.data.labels.
  select_labelled`) in ``EpochBatches`` that carry their labels; each step passes ``y``.
* **M2**: with ``--labelled`` N, the other images are unlabelled and every step holds ``batch_size`` of them and
  ``labelled_batch`` labelled ones (:class:`~pyro_vae.data.labels.MixedBatches`); without it every image is
  labelled. α defaults to 0.1 · N for the N training images.

The labelled images are recorded in the run (``labelled``: their number and :func:`~pyro_vae.data.labels.
labels_fingerprint` of their positions and labels), so a resume with another choice is refused.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pyro_vae.config import RunConfig
from pyro_vae.data import Batch, Dataset, EpochBatches, labels_fingerprint
from pyro_vae.data.labels import MixedBatches, num_classes, select_labelled, split_labelled
from pyro_vae.distributed import combine_mean_se, noise_seed
from pyro_vae.errors import ConfigError
from pyro_vae.evaluation import ELBOResult, evaluate_elbo
from pyro_vae.labelled.evaluation import evaluate_labelled_elbo
from pyro_vae.labelled.models import SSVAE, LabelledPart
from pyro_vae.model import VAE

__all__ = ["LabelledRecord", "TrainingData", "check_label_inputs", "epoch_evaluation", "step_labels", "training_data"]


class LabelledRecord(NamedTuple):
    """Which training images were labelled: their number and the fingerprint of their positions and labels."""

    n: int
    sha256: str


class TrainingData(NamedTuple):
    """What the loop trains on.

    :ivar batches: an :class:`~pyro_vae.data.EpochBatches` or a :class:`~pyro_vae.data.labels.MixedBatches`.
    :ivar int num_data: the size of the set the main minibatches come from (the ``"data"`` plate's N).
    :ivar labelled: a :class:`LabelledRecord` for a model with labels, else ``None``.
    """

    batches: EpochBatches | MixedBatches
    num_data: int
    labelled: LabelledRecord | None


def check_label_inputs(vae: VAE, data: Dataset, config: RunConfig) -> None:
    """Everything about labels that can be refused before a run directory is touched (one line each)."""
    if vae.kind == "vae":
        if config.data.labelled is not None:
            raise ConfigError("--labelled chooses the labelled images of --model m2 or cvae; the VAE reads no labels")
        return
    classes = num_classes(data, what=data.name)
    if classes != vae.num_classes:
        raise ConfigError(
            f"the data have {classes} classes but the {vae.kind} was built for {vae.num_classes}; build it with "
            "pyro_vae.labelled.build_model(config.model, data.input_dim, data.image_shape, num_classes(data))"
        )
    if config.data.labelled is not None:
        select_labelled(data.y_train, config.data.labelled, classes, config.train.seed)  # refuses a bad N


def training_data(vae: VAE, data: Dataset, config: RunConfig, device: torch.device, rank: int, world: int):
    """The minibatches of the run and the plate's N (see the module docstring)."""
    tc, dc = config.train, config.data
    common = {"seed": tc.seed, "binarize": dc.binarize, "threshold": dc.threshold, "rank": rank, "world_size": world}
    if vae.kind == "vae":
        x_train = data.x_train.to(device)
        return TrainingData(EpochBatches(x_train, batch_size=tc.batch_size, **common), x_train.shape[0], None)
    n = data.x_train.shape[0]
    if dc.labelled is None:
        index = torch.arange(n)
    else:
        index = select_labelled(data.y_train, dc.labelled, vae.num_classes, tc.seed)
    record = LabelledRecord(index.numel(), labels_fingerprint(data.y_train, index))
    if isinstance(vae, SSVAE):
        vae.set_aux_weight(n)
    split = split_labelled(data, index)
    x, y = split.x_labelled.to(device), split.y_labelled.to(device)
    if vae.kind == "m2" and split.x_unlabelled.shape[0] > 0:
        labelled_batch = tc.labelled_batch or max(1, min(tc.batch_size // 4, record.n))
        batches = MixedBatches(
            split.x_unlabelled.to(device), x, y, batch_size=tc.batch_size, labelled_batch=labelled_batch, **common
        )
        return TrainingData(batches, split.x_unlabelled.shape[0], record)
    return TrainingData(EpochBatches(x, batch_size=tc.batch_size, y=y, **common), x.shape[0], record)


def step_labels(vae: VAE, batch: Batch, num_labelled: int | None) -> dict:
    """The keyword arguments a step passes to the Pyro programs: none for the VAE, ``y`` for labelled images, and
    the :class:`~pyro_vae.labelled.LabelledPart` of a mixed M2 step."""
    if vae.kind == "vae":
        return {}
    if batch.labelled is not None:
        part = batch.labelled
        return {"labelled": LabelledPart(part.x, part.y, num_labelled, part.index)}
    return {"y": batch.y}


def epoch_evaluation(vae: VAE, x: torch.Tensor, y: torch.Tensor | None, seed: int, ctx=None):
    """The test ELBO after an epoch (the VAE's; the CVAE's given the labels; M2's with y summed out) and M2's accuracy
    (else ``None``), as ``(ELBOResult, MeanSE | None)``. Under torchrun (``ctx``) each rank evaluates its shard of the
    test images, and the means and standard errors are combined across ranks."""
    if ctx is not None:
        shard, labels = x[ctx.rank :: ctx.world_size], None if y is None else y[ctx.rank :: ctx.world_size]
        with vae.unrouted():  # no collectives inside: ranks may evaluate different numbers of images
            part, accuracy = epoch_evaluation(vae, shard, labels, noise_seed(seed, ctx.rank))
        n = shard.shape[0]
        elbo = ELBOResult(*(combine_mean_se(v, n) for v in (part.elbo, part.reconstruction, part.kl)), x.shape[0])
        return elbo, None if accuracy is None else combine_mean_se(accuracy, n)
    if vae.kind == "vae":
        return evaluate_elbo(vae, x, seed=seed), None
    result = evaluate_labelled_elbo(vae, x, y, seed=seed)
    return result.elbo, result.accuracy
