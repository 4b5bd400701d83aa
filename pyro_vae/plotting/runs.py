"""Figures of a trained run: the ones training writes (:func:`save_run_figures`) and any kind on demand
(:func:`run_figure`, behind ``pyro-vae plot``).

Every image figure shows the test split as the run saw it: the binarisation that evaluation used
(:func:`pyro_vae.data.binarize_eval`, fixed by the run's seed) is the model's input, and the grey originals are shown
beside it where they differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from matplotlib.figure import Figure

from pyro_vae.config import RunConfig, check_int
from pyro_vae.data import Dataset, binarize_eval
from pyro_vae.errors import ConfigError, unknown_choice
from pyro_vae.model import VAE
from pyro_vae.networks import eval_mode
from pyro_vae.plotting.conditioning import reads_labels
from pyro_vae.plotting.generative import class_grid, interpolation, latent_traversal, sample_grid
from pyro_vae.plotting.images import reconstruction_grid
from pyro_vae.plotting.latent import latent_scatter, most_active_dims
from pyro_vae.plotting.reports import loss_curves
from pyro_vae.run_dir import Run, RunDir, read_run_config

__all__ = ["PLOT_KINDS", "EvalSplit", "run_figure", "save_run_figures", "eval_split"]

#: Test images that rank the latent dimensions of a traversal by activity.
TRAVERSAL_RANKING_IMAGES = 1000


class EvalSplit(NamedTuple):
    """A run's test split, as the figures need it.

    :ivar original: the images as loaded, ``(M, D)`` (grey levels).
    :ivar model_input: what the model encodes: ``original`` binarised as the run's evaluation did, ``(M, D)``.
    :ivar labels: ``(M,)`` integer labels, or ``None``.
    :ivar class_names: the name of each label, or ``None``.
    :ivar binarize: the run's binarisation (``"none"``: ``model_input`` is ``original``).
    """

    original: torch.Tensor
    model_input: torch.Tensor
    labels: torch.Tensor | None
    class_names: tuple[str, ...] | None
    binarize: str


def eval_split(data: Dataset, config: RunConfig) -> EvalSplit:
    """The test split of ``data`` with the binarisation ``config`` evaluates on (the whole split is drawn, so the
    first images match :meth:`pyro_vae.run_dir.Run.test_images` and the training-time evaluation)."""
    dc = config.data
    seen = binarize_eval(data.x_test, dc.binarize, config.train.seed, dc.threshold)
    return EvalSplit(data.x_test, seen, data.y_test, data.class_names, dc.binarize)


def _reconstructions(vae: VAE, split: EvalSplit, shape, n: int, seed: int, draws: bool) -> Figure:
    seen = None if split.binarize == "none" else split.model_input
    return reconstruction_grid(vae, split.original, shape, n=n, model_input=seen, labels=split.labels)


def _samples(vae: VAE, split: EvalSplit | None, shape, n: int, seed: int, draws: bool) -> Figure:
    return sample_grid(vae, shape, n=n, seed=seed, draws=draws, class_names=split and split.class_names)


def _classes(vae: VAE, split: EvalSplit | None, shape, n: int, seed: int, draws: bool) -> Figure:
    return class_grid(vae, n, class_names=split and split.class_names, image_shape=shape, seed=seed)


def _latent(vae: VAE, split: EvalSplit, shape, n: int, seed: int, draws: bool) -> Figure:
    labels = None if split.labels is None else split.labels[:n]
    return latent_scatter(vae, split.model_input[:n], labels, class_names=split.class_names)


def _picked(split: EvalSplit, seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``count`` test images (model input) in an order seeded by ``seed``, and their labels (or ``None``)."""
    if split.model_input.shape[0] < 2:
        raise ConfigError(f"this figure needs at least 2 test images, the run has {split.model_input.shape[0]}")
    order = torch.randperm(split.model_input.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    return split.model_input[order], None if split.labels is None else split.labels[order]


def _traversal(vae: VAE, split: EvalSplit, shape, n: int, seed: int, draws: bool) -> Figure:
    x, y = _picked(split, seed, TRAVERSAL_RANKING_IMAGES)
    dims = most_active_dims(vae, x, y).dims[:n]
    return latent_traversal(vae, x[0], dims=dims, image_shape=shape, labels=None if y is None else y[:1])


def _interpolation(vae: VAE, split: EvalSplit, shape, n: int, seed: int, draws: bool) -> Figure:
    if not reads_labels(vae):
        x, _ = _picked(split, seed, 2)
        return interpolation(vae, x[0], x[1], steps=max(n, 2), image_shape=shape)
    # a model with labels: two images of one class (the first picked image's), the path decoded at that class
    x, y = _picked(split, seed, split.model_input.shape[0])
    same = (y == y[0]).nonzero().flatten()
    if same.numel() < 2:
        raise ConfigError(f"the interpolation needs 2 test images of class {int(y[0])}, the run's test split has 1")
    return interpolation(vae, x[0], x[same[1]], steps=max(n, 2), image_shape=shape, label=int(y[0]))


class _Kind(NamedTuple):
    build: Callable[..., Figure]
    default_n: int
    needs_data: bool


_KINDS = {
    "reconstructions": _Kind(_reconstructions, 8, True),
    "samples": _Kind(_samples, 64, False),
    "latent": _Kind(_latent, 2000, True),
    "traversal": _Kind(_traversal, 8, True),
    "interpolation": _Kind(_interpolation, 10, True),
    "classes": _Kind(_classes, 8, True),  # the data only for the class names
}
#: The figures :func:`run_figure` draws (``pyro-vae plot --kind``).
PLOT_KINDS = tuple(_KINDS)


def run_figure(run: Run, kind: str, n: int | None = None, seed: int = 0, draws: bool = False) -> Figure:
    """One figure of a loaded run (:func:`pyro_vae.load_run`), on its own test split.

    :param run: the run.
    :param str kind: one of :data:`PLOT_KINDS`: ``reconstructions`` (original, binarised input, reconstruction),
        ``samples`` (from the prior), ``latent`` (posterior means in the 2 most active dimensions),
        ``traversal`` (the most active dimensions varied one per row), ``interpolation`` (between two test images;
        of one class, decoded at it, for a model with labels), ``classes`` (a model with labels: one row of samples
        per class, named where the data set names its classes).
    :param n: size: test images (reconstructions 8, latent 2000), samples (64), rows (traversal 8, at most
        ``latent_dim``), path steps (interpolation 10) or samples per class (classes 8).
    :param int seed: seed of the prior draws (samples) or of which test images are traversed / interpolated.
    :param bool draws: samples only: draws x ~ p(x|z) instead of the decoder means.
    :raises ConfigError: for an unknown kind (with the closest name), a bad ``n``, or ``draws`` with another kind,
        before any data are read.
    """
    spec = _KINDS.get(kind)
    if spec is None:
        raise unknown_choice("plot kind", kind, PLOT_KINDS)
    n = spec.default_n if n is None else check_int("n", n, low=1)
    if draws and kind != "samples":
        raise ConfigError(f"draws applies to the samples figure only, not to {kind!r}; leave it out")
    if kind == "classes" and not reads_labels(run.vae):
        raise ConfigError(
            f"the classes figure draws one row per class of a model with labels, and run {run.path} is a "
            f"{run.vae.kind}; train with --model cvae or m2"
        )
    split = eval_split(run.data(), run.config) if spec.needs_data else None
    with eval_mode(run.vae):
        return spec.build(run.vae, split, run.state.image_shape, n, seed, draws)


def save_run_figures(
    vae: VAE,
    data: Dataset,
    result,
    out_dir: str | Path,
    n_points: int = 2000,
    config: RunConfig | None = None,
) -> list[Path]:
    """Write ``reconstructions.png`` (original, model input, reconstruction), ``samples.png`` (decoder means),
    ``loss.png`` and ``latent.png`` (the two most active dimensions, classes named) into ``out_dir``; for a model
    with labels also ``classes.png`` (:func:`~pyro_vae.plotting.class_grid`, one row per class).

    :param vae: the trained model.
    :param data: its :class:`~pyro_vae.data.Dataset` (the test split is plotted).
    :param result: the :class:`~pyro_vae.train.FitResult`.
    :param out_dir: the run directory.
    :param int n_points: test images in the latent plot.
    :param config: the run's config, for its binarisation; default the one saved in ``out_dir``.
    :returns: the paths written.
    """
    split = eval_split(data, read_run_config(out_dir) if config is None else config)
    shape: Sequence[int] | None = data.image_shape
    with eval_mode(vae):
        figures = {
            "reconstructions.png": _reconstructions(vae, split, shape, 8, 0, False),
            "samples.png": _samples(vae, split, shape, 64, 0, False),
            "loss.png": loss_curves(result.losses, result.epochs),
            "latent.png": _latent(vae, split, shape, n_points, 0, False),
        }
        if reads_labels(vae):
            figures["classes.png"] = _classes(vae, split, shape, 8, 0, False)
    run = RunDir(out_dir)  # atomic writes: a full disk keeps the previous image, never a 0-byte one
    return [run.write_figure(name, fig) for name, fig in figures.items()]
