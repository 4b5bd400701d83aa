"""Labels for the conditional and semi-supervised models: checking them, choosing the labelled images, and mixed
batches of labelled and unlabelled images.

* :func:`num_classes` checks that a data set's labels are integers ``0..C-1``, every class present in training, and
  returns ``C``;
* :func:`select_labelled` keeps ``n`` labelled training images, balanced over the classes and seeded;
* :func:`split_labelled` cuts the training set into those labelled images and the unlabelled rest;
* :class:`MixedBatches` yields the steps of a semi-supervised (M2) run: each a :class:`~pyro_vae.data.Batch` of
  unlabelled images with a labelled :class:`~pyro_vae.data.Batch` attached.

Like :mod:`pyro_vae.data.batches`, every random choice here is a pure function of the run seed and the position in
training (generators seeded by :func:`~pyro_vae.data.derive_seed`); the global torch RNG is never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import NamedTuple

import torch

from pyro_vae.config import check_int
from pyro_vae.data.batches import Batch, Binarizer, EpochBatches, check_labels, derive_seed
from pyro_vae.data.datasets import Dataset
from pyro_vae.data.images import labels
from pyro_vae.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["LabelledSplit", "MixedBatches", "num_classes", "select_labelled", "split_labelled"]

_REMAP = "labels must be 0..C-1: remap them with numpy.unique(y, return_inverse=True)"


def _class_name(c: int, class_names: tuple[str, ...] | None) -> str:
    return f"class {c} ({class_names[c]!r})" if class_names and c < len(class_names) else f"class {c}"


def _check_range(y: torch.Tensor, c: int | None, split: str, what: str) -> None:
    """Refuse a negative label, or (``c`` given) one ``>= c``: one line naming the value and the split."""
    low = int(y.min())
    if low < 0:
        raise DataError(f"{what} has label {low} in the {split} split, but {_REMAP}")
    high = int(y.max())
    if c is not None and high >= c:
        raise DataError(f"{what} has label {high} in the {split} split but only {c} classes, so {_REMAP}")


def num_classes(data: Dataset, *, what: str = "the data") -> int:
    """The number of classes ``C`` of a labelled data set, whose labels must be the integers ``0..C-1``.

    ``C`` is ``len(data.class_names)`` when the data set names its classes, else the largest label of both splits
    plus one. Every class ``0..C-1`` must have a training image, and there must be at least two.

    :param Dataset data: the loaded data, with ``y_train`` and ``y_test``.
    :param str what: how to name the data in messages.
    :returns: ``C >= 2``.
    :raises DataError: one line, naming the problem and the fix, if the data have no labels (or no test labels), a
        label is negative or ``>= C``, there are fewer than 2 classes, or a class has no training image.
    """
    if data.y_train is None:
        raise DataError(
            f"{what} ({data.name}) has no labels; --model cvae/m2 need labels: give an npz with y (and y_test), or "
            "use --dataset embedded, fashion-mnist or mnist"
        )
    if data.y_test is None:
        raise DataError(
            f"{what} ({data.name}) has training labels but none for its {len(data.x_test)} test images, which the "
            "test accuracy and conditional ELBO need; give y_test with x_test in the npz"
        )
    y_train = labels(data.y_train, len(data.x_train), what="data.y_train", images="data.x_train")
    y_test = labels(data.y_test, len(data.x_test), what="data.y_test", images="data.x_test")
    names = data.class_names
    for split, y in (("training", y_train), ("test", y_test)):
        _check_range(y, len(names) if names else None, split, what)
    c = len(names) if names else 1 + max(int(y_train.max()), int(y_test.max()))
    if c < 2:
        raise DataError(
            f"{what} has a single class (every label is 0), but a conditional model needs at least 2 classes; "
            "give labels of two or more classes, or train --model vae"
        )
    counts = torch.bincount(y_train, minlength=c)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise DataError(
            f"{what} has no training image of {_class_name(missing[0], names)}"
            + (f" (nor of {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f" among its {c} classes; every class needs training images, so {_REMAP}"
        )
    return c


def _shares(n: int, c: int, generator: torch.Generator) -> torch.Tensor:
    """``(C,)`` int64 labelled images per class: ``n // C`` each, one more for ``n % C`` classes chosen by a seeded
    permutation."""
    shares = torch.full((c,), n // c, dtype=torch.int64)
    shares[torch.randperm(c, generator=generator)[: n % c]] += 1
    return shares


def select_labelled(y_train: torch.Tensor, n: int, num_classes: int, seed: int) -> torch.Tensor:
    """The positions of ``n`` labelled training images, balanced over the classes.

    Each class gets ``n // C`` images and ``n % C`` classes, chosen by a seeded permutation, one more; within class
    ``c`` the images are the first of a seeded permutation of its positions. All draws come, in that order (the
    classes' shares, then class 0, 1, ...), from one CPU generator seeded by ``derive_seed("labelled", seed)``, so
    the result is a pure function of ``(y_train, n, num_classes, seed)``, on any device.

    :param torch.Tensor y_train: ``(N,)`` int64 labels in ``0..C-1``.
    :param int n: labelled images to keep, ``C <= n <= N``.
    :param int num_classes: ``C``, e.g. from :func:`num_classes`.
    :param int seed: run seed.
    :returns: ``(n,)`` int64 CPU positions in ``0..N-1``, sorted ascending, without repeats.
    :raises DataError: one line if ``n < C``, ``n > N``, a label lies outside ``0..C-1``, or a class has fewer
        images than its share.
    :raises ConfigError: if ``n``, ``num_classes`` or ``seed`` is not an integer of the right sign.
    """
    y = check_labels(y_train, None, what="y_train").cpu()
    check_int("labelled", n, low=1)
    check_int("num_classes", num_classes, low=2)
    check_int("seed", seed, low=0)
    c, total = num_classes, y.shape[0]
    if n < c:
        raise DataError(
            f"--labelled {n} is below the {c} classes, but --labelled N must be at least the number of classes C so "
            f"every class has a label; use --labelled {c} or more"
        )
    if n > total:
        raise DataError(f"--labelled {n} exceeds the {total} training images; use --labelled {total} or less")
    _check_range(y, c, "training", "y_train")
    generator = torch.Generator().manual_seed(derive_seed("labelled", seed))
    shares = _shares(n, c, generator)
    counts = torch.bincount(y, minlength=c)
    short = (counts < shares).nonzero().flatten().tolist()
    if short:
        k = short[0]
        largest = c * int(counts.min())
        raise DataError(
            f"class {k} has {int(counts[k])} training images but --labelled {n} gives each of the {c} classes "
            f"{n // c}{' or ' + str(n // c + 1) if n % c else ''}; lower --labelled to {largest} or less "
            f"({c} classes × {int(counts.min())} images of the smallest class)"
        )
    chosen = []
    for k in range(c):
        positions = (y == k).nonzero().flatten()  # ascending
        chosen.append(positions[torch.randperm(len(positions), generator=generator)[: int(shares[k])]])
    return torch.cat(chosen).sort().values


class LabelledSplit(NamedTuple):
    """The training set cut into its labelled images and the unlabelled rest (see :func:`split_labelled`).

    :ivar torch.Tensor x_labelled: ``(n, D)`` the labelled images, in the order of ``labelled_index``.
    :ivar torch.Tensor y_labelled: ``(n,)`` int64 their labels.
    :ivar torch.Tensor x_unlabelled: ``(N - n, D)`` the other images, in training-set order (``0`` rows when every
        image is labelled).
    :ivar torch.Tensor labelled_index: ``(n,)`` int64 CPU positions of the labelled images in the training set.
    """

    x_labelled: torch.Tensor
    y_labelled: torch.Tensor
    x_unlabelled: torch.Tensor
    labelled_index: torch.Tensor


def split_labelled(data: Dataset, index: torch.Tensor) -> LabelledSplit:
    """Cut ``data``'s training set into the images at ``index``, with their labels, and the rest; the two parts are
    disjoint, cover the training set and keep their order.

    :param Dataset data: a labelled data set.
    :param torch.Tensor index: ``(n,)`` int64 distinct positions in ``0..N-1``, e.g. from :func:`select_labelled`.
    :raises DataError: one line if ``data`` has no labels or ``index`` is not distinct positions of training images.
    """
    if data.y_train is None:
        raise DataError(f"{data.name} has no labels to split off; give an npz with y (and y_test)")
    total = data.x_train.shape[0]
    index = check_labels(index, None, what="the labelled index").cpu()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= total):
        raise DataError(
            f"the labelled index holds positions {int(index.min())}..{int(index.max())} but the training set has "
            f"{total} images (0..{total - 1}); use select_labelled to choose them"
        )
    mask = torch.zeros(total, dtype=torch.bool)
    mask[index] = True
    if int(mask.sum()) != index.numel():
        raise DataError("the labelled index names an image twice; use select_labelled to choose distinct images")
    device = data.x_train.device
    return LabelledSplit(
        x_labelled=data.x_train.index_select(0, index.to(device)),
        y_labelled=data.y_train.index_select(0, index.to(data.y_train.device)),
        x_unlabelled=data.x_train[(~mask).to(device)],
        labelled_index=index,
    )


def _check_batch_sizes(n_u: int, n_l: int, batch_size: int, labelled_batch: int) -> None:
    """Refuse a labelled batch outside ``1..N_l`` and an unlabelled batch larger than ``N_u`` (one line each)."""
    check_int("labelled_batch", labelled_batch, low=1)
    if labelled_batch > n_l:
        raise DataError(
            f"labelled batch {labelled_batch} exceeds the {n_l} labelled images; use a labelled batch of {n_l} or "
            "less, or more labelled images (--labelled)"
        )
    check_int("batch_size", batch_size, low=1)
    if n_u == 0:
        raise DataError(
            f"every training image is labelled, so there are no unlabelled images for batches of {batch_size}; use "
            "fewer labelled images (--labelled), or train on the labelled images alone"
        )
    if batch_size > n_u:
        raise DataError(
            f"batch size {batch_size} exceeds the {n_u} unlabelled training images; use --batch-size {n_u} or less, "
            "or fewer labelled images (--labelled)"
        )


class MixedBatches:
    """Seeded, resumable, optionally sharded steps of a semi-supervised run: each step holds ``batch_size``
    unlabelled images and ``labelled_batch`` labelled ones, so labelled and unlabelled data mix at a set ratio.

    An epoch is one pass over the unlabelled images: they come exactly as ``EpochBatches(x_unlabelled, ...)`` (same
    seed, binarisation, rank and world size) gives them, one :class:`~pyro_vae.data.Batch` per step. The labelled
    images come from their own stream, which never mixes with the unlabelled one: the stream of epoch ``e`` is the
    concatenation of permutations of ``0..N_l-1``, the ``k``-th drawn from ``derive_seed("labelled-order", seed, e,
    k)``, and every step takes the next ``world_size · labelled_batch`` positions of it, rank ``r`` every
    ``world_size``-th from the ``r``-th::

        step s, rank r:  stream[s·W·B_l + r + W·i]  for i = 0 .. B_l - 1

    so with one process step ``s`` takes ``stream[s·B_l : (s+1)·B_l]``, each labelled image comes once in each cycle
    of ``N_l`` positions, and the ranks share out each step's positions without overlap. A step whose positions
    straddle two cycles may hold one image twice (the end of one permutation meets the start of the next), as may
    the ranks of one step together; every labelled image comes equally often in expectation.

    Labelled images are binarised like the unlabelled ones but with their own draws: ``derive_seed("dynamic-labelled",
    seed, epoch, step, rank)`` for ``dynamic``, ``derive_seed("static-labelled", seed)`` for ``static`` (see
    :class:`~pyro_vae.data.batches.Binarizer`).

    Everything is a pure function of ``(seed, epoch, step, rank)``: ``list(batches(e, start=k)) ==
    list(batches(e))[k:]``, pixels included.

    :param torch.Tensor x_unlabelled: ``(N_u, D)`` float images in ``[0, 1]``, ``N_u >= batch_size``.
    :param torch.Tensor x_labelled: ``(N_l, D)`` float images in ``[0, 1]``, on the same device.
    :param torch.Tensor y_labelled: ``(N_l,)`` int64 labels of ``x_labelled``.
    :param int batch_size: unlabelled images per step (on each rank).
    :param int labelled_batch: labelled images per step (on each rank), ``1 <= labelled_batch <= N_l``.
    :param int seed: run seed.
    :param str binarize: one of :data:`pyro_vae.config.BINARIZATIONS`.
    :param float threshold: cut-off for ``threshold``, default 0.5.
    :param int rank: this process's index among ``world_size``, default 0.
    :param int world_size: number of processes sharing the data, default 1.
    :ivar int num_images: ``N_u``, the unlabelled images an epoch passes over.
    :ivar int num_labelled: ``N_l``, the labelled images.
    :raises DataError: one line if a batch is larger than its image set, or the labels do not fit the images.
    """

    def __init__(
        self,
        x_unlabelled: torch.Tensor,
        x_labelled: torch.Tensor,
        y_labelled: torch.Tensor,
        *,
        batch_size: int,
        labelled_batch: int,
        seed: int,
        binarize: str,
        threshold: float = 0.5,
        rank: int = 0,
        world_size: int = 1,
    ):
        for name, x in (("x_unlabelled", x_unlabelled), ("x_labelled", x_labelled)):
            if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
                raise TypeError(f"{name} must be a float (N, D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if x_labelled.shape[1] != x_unlabelled.shape[1] or x_labelled.device != x_unlabelled.device:
            raise DataError(
                f"x_labelled holds {x_labelled.shape[1]} values per image on {x_labelled.device} but x_unlabelled "
                f"{x_unlabelled.shape[1]} on {x_unlabelled.device}; both must be rows of one training set"
            )
        n_u, n_l = x_unlabelled.shape[0], x_labelled.shape[0]
        y = check_labels(y_labelled, n_l, what="y_labelled")
        _check_batch_sizes(n_u, n_l, batch_size, labelled_batch)
        self._unlabelled = EpochBatches(
            x_unlabelled,
            batch_size=batch_size,
            seed=seed,
            binarize=binarize,
            threshold=threshold,
            rank=rank,
            world_size=world_size,
        )
        self._labelled = Binarizer(x_labelled, binarize=binarize, seed=seed, threshold=threshold, stream="labelled")
        self._y = y.to(x_labelled.device)
        self.num_images, self.num_labelled = n_u, n_l
        self.batch_size, self.labelled_batch = batch_size, labelled_batch
        self.seed, self.binarize, self.threshold = seed, binarize, threshold
        self.rank, self.world_size = rank, world_size
        self.device = x_unlabelled.device

    def len_per_epoch(self) -> int:
        """Steps per epoch on this rank: the unlabelled batches of :class:`~pyro_vae.data.EpochBatches`."""
        return self._unlabelled.len_per_epoch()

    def __len__(self) -> int:
        return self.len_per_epoch()

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's unlabelled positions for ``epoch`` (:meth:`pyro_vae.data.EpochBatches.order`)."""
        return self._unlabelled.order(epoch)

    def labelled_positions(self, epoch: int, step: int) -> torch.Tensor:
        """The positions in the labelled set that step ``step`` of ``epoch`` takes on this rank (class docstring).

        :returns: ``(labelled_batch,)`` int64 CPU positions in ``0..N_l-1``.
        """
        return self._positions(epoch, step, {})

    def _positions(self, epoch: int, step: int, permutations: dict[int, torch.Tensor]) -> torch.Tensor:
        """:meth:`labelled_positions`, drawing the permutations it needs into ``permutations`` (``k`` → the ``k``-th
        permutation of the epoch's stream) so that consecutive steps draw each one once; older ones are dropped."""
        n, width = self.num_labelled, self.world_size
        stream_at = step * width * self.labelled_batch + self.rank + width * torch.arange(self.labelled_batch)
        first, last = int(stream_at[0]) // n, int(stream_at[-1]) // n
        for k in [k for k in permutations if k < first]:
            del permutations[k]
        for k in range(first, last + 1):
            if k not in permutations:
                generator = torch.Generator().manual_seed(derive_seed("labelled-order", self.seed, epoch, k))
                permutations[k] = torch.randperm(n, generator=generator)
        stream = torch.cat([permutations[k] for k in range(first, last + 1)])
        return stream[stream_at - first * n]

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Yield the steps of ``epoch``, from step ``start`` on: ``Batch(index, x, epoch, step, y=None,
        labelled=Batch(index_l, x_l, epoch, step, y=y_l))``, ``index_l`` positions in the labelled set.

        :param int epoch: epoch number; with ``seed`` it fixes both streams and the binarisation.
        :param int start: number of leading steps to skip when resuming, ``0 <= start <= len(self)``.
        """
        unlabelled = self._unlabelled.batches(epoch, start)  # checks start before the first step is drawn
        return self._iterate(unlabelled, epoch)

    def _iterate(self, unlabelled: Iterator[Batch], epoch: int) -> Iterator[Batch]:
        permutations: dict[int, torch.Tensor] = {}
        for batch in unlabelled:
            index = self._positions(epoch, batch.step, permutations).to(self.device)
            x = self._labelled.batch(index, epoch, batch.step, self.rank)
            y = self._y.index_select(0, index)
            yield batch._replace(labelled=Batch(index=index, x=x, epoch=epoch, step=batch.step, y=y))

    def __repr__(self) -> str:
        return (
            f"MixedBatches(num_images={self.num_images}, num_labelled={self.num_labelled}, "
            f"batch_size={self.batch_size}, labelled_batch={self.labelled_batch}, seed={self.seed}, "
            f"binarize={self.binarize!r}, rank={self.rank}, world_size={self.world_size}, steps_per_epoch={len(self)})"
        )
