"""Mini-batches and binarisation, reproducible down to the bit.

Everything random here draws from generators seeded by :func:`derive_seed`, a pure function of the run seed and the
position in training, so that

* the data order of an epoch depends only on ``(seed, epoch)``;
* a run resumed in the middle of an epoch sees exactly the batches, and the binarised pixels, it would have seen
  without the interruption;
* the global torch RNG (which seeds weights and the guide's noise) is never consumed by data handling.

The binarisation protocols (:data:`pyro_vae.config.BINARIZATIONS`) are

* ``dynamic``: every batch is drawn afresh, ``x_bin ~ Bernoulli(x)``, with a generator seeded by
  ``derive_seed("dynamic", seed, epoch, step, rank)``;
* ``static``: one draw ``x_bin ~ Bernoulli(x)`` of the whole set, seeded by ``derive_seed("static", seed)``, made
  once and reused every epoch;
* ``threshold``: ``x_bin = (x > threshold)``;
* ``none``: grey levels as they are.

Bernoulli draws come from a generator on the data's device; CPU and CUDA generators produce different streams, so
results are reproducible for a given device type.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch

from pyro_vae.config import BINARIZATIONS, check_float, check_int
from pyro_vae.config.data_kinds import DATA_KINDS, check_admits
from pyro_vae.errors import DataError, unknown_choice

if TYPE_CHECKING:
    from pyro_vae.data.datasets import Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "Batch",
    "Binarizer",
    "EpochBatches",
    "binarization_seed",
    "binarize_eval",
    "check_batch_size",
    "check_labels",
    "check_likelihood_data",
    "data_kind",
    "derive_seed",
]


def derive_seed(*parts: int | str) -> int:
    """Mix integers and tags into one seed for :meth:`torch.Generator.manual_seed`.

    The seed is the first 8 bytes (big-endian) of the BLAKE2b digest of the parts joined by ``":"``, shifted right
    by one bit: ``int.from_bytes(blake2b("static:0".encode(), digest_size=8).digest(), "big") >> 1`` for
    ``derive_seed("static", 0)``. Unlike a linear formula such as ``seed * 1_000_003 + epoch``, different tuples
    never collide in practice, and the result always lies in ``[0, 2**63)``.

    :param parts: integers and short tags, e.g. ``("dynamic", seed, epoch, step, rank)``.
    :returns: an integer in ``[0, 2**63)``.
    """
    text = ":".join(str(part) for part in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _check_binarize(binarize: str) -> None:
    if binarize not in BINARIZATIONS:
        raise unknown_choice("binarization", binarize, BINARIZATIONS)


def data_kind(x: torch.Tensor) -> str:
    """The kind of images ``x`` in [0, 1] (:data:`pyro_vae.config.data_kinds.DATA_KINDS`): ``"binary"`` when every
    value is 0 or 1, ``"8bit"`` when every value lies on the grid k/255 (within float32 rounding: 255·x is within
    1e-3 of an integer), else ``"unit"``.

    :param x: images ``(N, D)`` (any shape), on any device.
    """
    if bool(((x == 0) | (x == 1)).all()):
        return "binary"
    steps = x * 255.0
    return "8bit" if bool(((steps - steps.round()).abs() <= 1e-3).all()) else "unit"


def check_likelihood_data(dataset: Dataset, binarize: str, likelihood) -> None:
    """Refuse data the likelihood does not admit, before training (the rule: :mod:`pyro_vae.config.data_kinds`).

    The model sees binary data under every binarisation but ``none``, and the data as they are under ``none``: then
    ``bernoulli`` needs binary data and ``discretized_logistic`` data on the 8-bit grid, in both splits.

    :param Dataset dataset: the loaded data.
    :param str binarize: one of :data:`pyro_vae.config.BINARIZATIONS`.
    :param likelihood: a :class:`pyro_vae.likelihoods.Likelihood` (its ``support`` and ``spec`` are read).
    :raises DataError: one line naming the likelihood, the data and what to do.
    :raises ConfigError: for an unknown ``binarize``.
    """
    _check_binarize(binarize)
    if binarize != "none" or dataset.binary:
        kind = "binary"
    else:
        kind = max(data_kind(dataset.x_train), data_kind(dataset.x_test), key=DATA_KINDS.index)
    check_admits(likelihood.spec, likelihood.support, kind, dataset.name)


def check_batch_size(n: int, batch_size: int) -> None:
    """Refuse a batch larger than the training set, which would otherwise give a silent epoch of no batches.

    :param int n: number of training images.
    :param int batch_size: images per batch.
    :raises DataError: if ``batch_size > n``.
    """
    if batch_size > n:
        raise DataError(f"batch size {batch_size} exceeds the {n} training images; use --batch-size {n} or less")


class Batch(NamedTuple):
    """One mini-batch.

    :param torch.Tensor index: ``(B,)`` int64 positions of the images in the training set, on the data's device.
    :param torch.Tensor x: ``(B, D)`` images, binarised according to the protocol, on the data's device.
    :param int epoch: the epoch the batch belongs to.
    :param int step: the batch's position within the epoch (on this rank), from 0.
    :param y: ``(B,)`` int64 labels of the rows of ``x``, on the data's device; ``None`` (default) for unlabelled
        rows.
    :param labelled: the labelled part of a mixed (semi-supervised) step, itself a :class:`Batch` whose ``index``
        holds positions in the labelled set and whose ``y`` is set (see :class:`~pyro_vae.data.MixedBatches`);
        ``None`` (default) otherwise.
    """

    index: torch.Tensor
    x: torch.Tensor
    epoch: int
    step: int
    y: torch.Tensor | None = None
    labelled: Batch | None = None


class Binarizer:
    """The one place for the binarisation rule of training images (see the module docstring).

    ``static`` and ``threshold`` are applied once, here, to the whole set; ``dynamic`` draws afresh for each batch in
    :meth:`batch`. ``stream`` keeps the draws of two image sets of one run apart: the training set of a plain run is
    stream ``""`` (tags ``"static"``, ``"dynamic"``), the labelled set of a semi-supervised run stream ``"labelled"``
    (tags ``"static-labelled"``, ``"dynamic-labelled"``), so that no two images share their Bernoulli noise.

    :param torch.Tensor x: ``(N, D)`` float images in ``[0, 1]``, on any device.
    :param str binarize: one of :data:`pyro_vae.config.BINARIZATIONS`.
    :param int seed: run seed.
    :param float threshold: cut-off for ``threshold``, default 0.5.
    :param str stream: which image set of the run ``x`` is, default ``""``.
    :raises ConfigError: for an unknown ``binarize`` or a bad ``threshold``.
    """

    def __init__(self, x: torch.Tensor, *, binarize: str, seed: int, threshold: float = 0.5, stream: str = ""):
        _check_binarize(binarize)
        check_float("threshold", threshold, low=0.0, high=1.0, open_low=True, open_high=True)
        self.binarize = binarize
        self.seed = seed
        self.device = x.device
        suffix = f"-{stream}" if stream else ""
        self._dynamic_tag = "dynamic" + suffix
        if binarize == "static":
            self.data = torch.bernoulli(x, generator=_generator(x.device, derive_seed("static" + suffix, seed)))
        elif binarize == "threshold":
            self.data = (x > threshold).to(x.dtype)
        else:
            self.data = x

    def batch(self, index: torch.Tensor, epoch: int, step: int, rank: int) -> torch.Tensor:
        """The binarised rows ``index`` (on the data's device) of step ``step`` of ``epoch`` on ``rank``: ``(B, D)``;
        ``dynamic`` draws from ``derive_seed(tag, seed, epoch, step, rank)``."""
        x = self.data.index_select(0, index)
        if self.binarize == "dynamic":
            seed = derive_seed(self._dynamic_tag, self.seed, epoch, step, rank)
            x = torch.bernoulli(x, generator=_generator(self.device, seed))
        return x


def check_labels(y: torch.Tensor, n: int | None, *, what: str = "y") -> torch.Tensor:
    """Refuse labels that are not an int64 ``(n,)`` tensor, one per image (``n=None``: any length).

    Labels loaded by :func:`~pyro_vae.data.load_dataset` already are; this guards tensors passed by hand.

    :returns: ``y``.
    :raises DataError: one line naming what came and what to do.
    """
    ok = isinstance(y, torch.Tensor) and y.dtype == torch.int64 and y.ndim == 1 and n in (None, y.shape[0])
    if not ok:
        got = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        shape = "(N,)" if n is None else f"({n},)"
        raise DataError(
            f"{what} is a {got} but labels must be an int64 tensor of shape {shape}, one per image; "
            "use Dataset.y_train, or torch.as_tensor(y, dtype=torch.int64)"
        )
    return y


class EpochBatches:
    """Seeded, resumable, optionally sharded mini-batches of a training set.

    The order of epoch ``e`` is ``torch.randperm(N, generator=Generator().manual_seed(derive_seed("order", seed,
    e)))`` (drawn on the CPU whatever the data's device, so it is the same everywhere), or ``0..N-1`` without
    shuffling. As :class:`torch.utils.data.DistributedSampler` does, the order is then padded by wrapping around
    to a multiple of ``world_size`` (or cut down to one with ``drop_last``) and rank ``r`` takes
    ``order[r::world_size]``; that shard is cut into consecutive batches. Every rank thus gets the same number of
    batches per epoch.

    :param torch.Tensor x: ``(N, D)`` float images in ``[0, 1]`` on any device, e.g. ``Dataset.x_train``.
    :param int batch_size: images per batch.
    :param int seed: run seed; order and binarisation derive from it.
    :param str binarize: one of :data:`pyro_vae.config.BINARIZATIONS` (see the module docstring).
    :param float threshold: cut-off for ``threshold``, default 0.5.
    :param bool shuffle: permute each epoch (default) or keep the stored order.
    :param bool drop_last: drop the images that do not fill a whole batch on every rank (no wrap-around padding and
        no short last batch); default ``False``: the last batch may be smaller.
    :param int rank: this process's index among ``world_size``, default 0.
    :param int world_size: number of processes sharing the data, default 1.
    :param y: ``(N,)`` int64 labels of ``x``; when given, every batch carries ``y[index]`` (on ``x``'s device) as
        :attr:`Batch.y`. Images, positions and binarisation are the same with and without labels.
    :raises DataError: if a batch is larger than the images one rank gets, or ``y`` does not fit ``x``.
    """

    def __init__(
        self,
        x: torch.Tensor,
        *,
        batch_size: int,
        seed: int,
        binarize: str,
        threshold: float = 0.5,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        y: torch.Tensor | None = None,
    ):
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
            raise TypeError(f"x must be a float (N, D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        _check_binarize(binarize)
        check_float("threshold", threshold, low=0.0, high=1.0, open_low=True, open_high=True)
        self._y = None if y is None else check_labels(y, x.shape[0]).to(x.device)
        check_int("batch_size", batch_size, low=1)
        check_int("world_size", world_size, low=1)
        check_int("rank", rank, low=0, high=world_size - 1, why=f"ranks count from 0 in a world of {world_size}")
        check_int("seed", seed, low=0)
        self.num_images = x.shape[0]
        self.batch_size = batch_size
        self.seed = seed
        self.binarize = binarize
        self.threshold = threshold
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.device = x.device
        n = self.num_images
        self._shard_size = n // world_size if drop_last else math.ceil(n / world_size)
        if world_size == 1:
            check_batch_size(n, batch_size)
        elif batch_size > self._shard_size:
            raise DataError(
                f"batch size {batch_size} exceeds the {self._shard_size} training images each of the {world_size} "
                f"processes gets; use --batch-size {self._shard_size} or less"
            )
        self._binarizer = Binarizer(x, binarize=binarize, seed=seed, threshold=threshold)

    def len_per_epoch(self) -> int:
        """Number of batches this rank yields per epoch."""
        if self.drop_last:
            return self._shard_size // self.batch_size
        return math.ceil(self._shard_size / self.batch_size)

    def __len__(self) -> int:
        return self.len_per_epoch()

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's image positions for ``epoch``, before cutting into batches.

        :param int epoch: epoch number.
        :returns: a CPU int64 tensor of ``len_per_epoch() * batch_size`` positions or fewer.
        """
        n = self.num_images
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed("order", self.seed, epoch))
            perm = torch.randperm(n, generator=generator)
        else:
            perm = torch.arange(n)
        total = self._shard_size * self.world_size
        if total < n:
            perm = perm[:total]
        elif total > n:
            pad = total - n
            perm = torch.cat([perm, perm.repeat(math.ceil(pad / n))[:pad]])
        return perm[self.rank :: self.world_size]

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Yield the batches of ``epoch``, from batch ``start`` on.

        Skipping is index arithmetic, so ``list(batches(e, start=k))`` equals ``list(batches(e))[k:]`` exactly,
        dynamically binarised pixels included.

        :param int epoch: epoch number; with ``seed`` it fixes the order and the binarisation.
        :param int start: number of leading batches to skip when resuming, ``0 <= start <= len(self)``.
        :returns: an iterator of :class:`Batch`.
        """
        n_batches = self.len_per_epoch()
        check_int("start", start, low=0, high=n_batches, why="the batches in an epoch")
        return self._iterate(epoch, start, n_batches)

    def _iterate(self, epoch: int, start: int, n_batches: int) -> Iterator[Batch]:
        shard = self.order(epoch)
        size = self.batch_size
        for step in range(start, n_batches):
            index = shard[step * size : (step + 1) * size].to(self.device)
            x = self._binarizer.batch(index, epoch, step, self.rank)
            y = None if self._y is None else self._y.index_select(0, index)
            yield Batch(index=index, x=x, epoch=epoch, step=step, y=y)

    def __repr__(self) -> str:
        return (
            f"EpochBatches(num_images={self.num_images}, batch_size={self.batch_size}, seed={self.seed}, "
            f"binarize={self.binarize!r}, shuffle={self.shuffle}, drop_last={self.drop_last}, rank={self.rank}, "
            f"world_size={self.world_size}, batches_per_epoch={len(self)})"
        )


#: The binarisations that draw random numbers (Bernoulli draws), and so depend on a seed.
SEEDED_BINARIZATIONS = ("dynamic", "static")


def binarization_seed(binarize: str, seed: int) -> int | None:
    """The seed that fixed an evaluation split's binarisation, as a protocol records it: ``seed`` for the
    binarisations that draw (``dynamic``, ``static``: :func:`binarize_eval` draws from ``derive_seed("eval", seed)``),
    ``None`` for those that do not (``threshold`` is a deterministic cut, ``none`` leaves the data as they are).

    This is the one rule for when a seed is part of the data protocol; two splits binarised without a draw are the
    same data whatever the run's seed, so recording it there would make equal protocols look different.

    :param str binarize: one of :data:`pyro_vae.config.BINARIZATIONS`.
    :param int seed: the run seed.
    :raises ConfigError: for an unknown ``binarize``.
    """
    _check_binarize(binarize)
    return seed if binarize in SEEDED_BINARIZATIONS else None


def binarize_eval(x: torch.Tensor, binarize: str, seed: int, threshold: float = 0.5) -> torch.Tensor:
    """The fixed binarisation of an evaluation split, so that reported numbers carry a protocol.

    ``dynamic`` and ``static`` both evaluate on one Bernoulli draw seeded by ``derive_seed("eval", seed)`` (on the
    data's device), the same draw for every evaluation of a run; ``threshold`` gives ``(x > threshold)``;
    ``none`` returns ``x`` itself.

    :param torch.Tensor x: ``(M, D)`` float images in ``[0, 1]``, e.g. ``Dataset.x_test``.
    :param str binarize: one of :data:`pyro_vae.config.BINARIZATIONS`.
    :param int seed: run seed.
    :param float threshold: cut-off for ``threshold``, default 0.5.
    :returns: ``(M, D)`` images of ``x``'s dtype and device.
    :raises ConfigError: for an unknown ``binarize``.
    """
    _check_binarize(binarize)
    if binarize in SEEDED_BINARIZATIONS:
        return torch.bernoulli(x, generator=_generator(x.device, derive_seed("eval", seed)))
    if binarize == "threshold":
        return (x > threshold).to(x.dtype)
    return x
