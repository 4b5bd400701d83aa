"""Figures for a trained VAE. Every function returns a :class:`matplotlib.figure.Figure`.

Figures are built with matplotlib's object-oriented API (no ``pyplot`` state), so the library never changes the
user's backend and figures can be made in scripts, notebooks and tests alike. Nothing in the package below this
layer imports it.

* :mod:`~pyro_vae.plotting.images`: image grids, grey or colour (``image_shape`` ``(C, H, W)``, C in {1, 3}, or the
  legacy grey ``(H, W)``), labelled rows, reconstructions;
* :mod:`~pyro_vae.plotting.latent`: posterior means in the most active dimensions, posterior regions;
* :mod:`~pyro_vae.plotting.generative`: prior samples (means or draws), latent traversals, interpolations, and
  the class grid of a model with labels (:mod:`~pyro_vae.plotting.conditioning` says which labels each figure
  conditions on);
* :mod:`~pyro_vae.plotting.reports`: loss curves and the comparison figure;
* :mod:`~pyro_vae.plotting.runs`: the figures of a run (:func:`save_run_figures`, :func:`run_figure`).
"""

from pyro_vae.plotting.generative import class_grid, interpolation, labelled_samples, latent_traversal, sample_grid
from pyro_vae.plotting.images import image_grid, image_layout, image_rows, reconstruction_grid
from pyro_vae.plotting.latent import (
    ActiveDims,
    _marginal_covariance,  # noqa: F401  (tests check each family's covariance through it)
    latent_posteriors,
    latent_scatter,
    most_active_dims,
)
from pyro_vae.plotting.reports import comparison_figure, loss_curves
from pyro_vae.plotting.runs import PLOT_KINDS, EvalSplit, eval_split, run_figure, save_run_figures

__all__ = [
    "PLOT_KINDS",
    "ActiveDims",
    "EvalSplit",
    "class_grid",
    "comparison_figure",
    "eval_split",
    "image_grid",
    "image_layout",
    "image_rows",
    "interpolation",
    "labelled_samples",
    "latent_posteriors",
    "latent_scatter",
    "latent_traversal",
    "loss_curves",
    "most_active_dims",
    "reconstruction_grid",
    "run_figure",
    "sample_grid",
    "save_run_figures",
]
