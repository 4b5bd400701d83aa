"""Figures of the latent space: posterior means in the most active dimensions, and each point's posterior q(z | x).

Which dimensions to draw: by default the most active ones, ranked by the active-unit statistic of
:func:`pyro_vae.evaluation.latent_activity`, :math:`A_d = \\operatorname{Var}_x(\\mathbb{E}_q[z_d])`. Dimensions that
the model does not use have :math:`A_d \\approx 0`, and a plot of them shows one blob. Colours follow the labels, and
the legend names the classes where the data set has names (:attr:`pyro_vae.data.Dataset.class_names`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pyro_vae.errors import ConfigError
from pyro_vae.evaluation import latent_activity
from pyro_vae.importance import own_rng
from pyro_vae.model import VAE, posterior_mean
from pyro_vae.plotting.conditioning import encode, image_labels

__all__ = ["ActiveDims", "latent_posteriors", "latent_scatter", "most_active_dims"]

#: Above this many classes the colours are a continuous map with a colour bar instead of a legend of names.
_MAX_NAMED_CLASSES = 20
_ORDINALS = ("most active", "2nd most active", "3rd most active")


class ActiveDims(NamedTuple):
    """The latent dimensions ranked by activity.

    :ivar dims: dimension indices, most active first, ``(L,)``.
    :ivar activity: the activity :math:`A_d` of every dimension, ``(L,)``, indexed by dimension.
    :ivar means: the posterior means ``(N, L)`` it was computed from.
    """

    dims: tuple[int, ...]
    activity: torch.Tensor
    means: torch.Tensor


@torch.no_grad()
def most_active_dims(vae: VAE, x: torch.Tensor, labels: torch.Tensor | None = None) -> ActiveDims:
    """Rank the latent dimensions by activity (variance over ``x`` of the posterior mean), most active first; ties
    keep the lower index first.

    :param vae: the model.
    :param x: images ``(N, D)``, N >= 2 (one image has no variance).
    :param labels: ``(N,)`` labels of ``x``: a CVAE encodes q(z | x, y) with them (required there); M2 encodes at
        its classifier's class, the VAE ignores them (:mod:`pyro_vae.plotting.conditioning`).
    """
    if x.shape[0] < 2:
        raise ConfigError(f"ranking latent dimensions by activity needs at least 2 images, got {x.shape[0]}")
    x = x.to(next(vae.parameters()).device)
    y = image_labels(vae, x, labels, "ranking latent dimensions")
    means = posterior_mean(encode(vae, x, y)).cpu()  # (N, L)
    activity = latent_activity(means)
    order = torch.sort(activity, descending=True, stable=True).indices
    return ActiveDims(tuple(order.tolist()), activity, means)


def _axis_label(dim: int, activity: torch.Tensor, rank: int | None) -> str:
    what = f"{_ORDINALS[rank]}, " if rank is not None and rank < len(_ORDINALS) else ""
    return f"z[{dim}] ({what}Var {float(activity[dim]):.3g})"


def _label_colours(labels: np.ndarray) -> np.ndarray:
    """RGBA ``(B, 4)`` per integer label: ``tab10`` for up to 10 classes, ``tab20`` up to 20, ``viridis`` beyond."""
    from matplotlib import colormaps

    top = int(labels.max()) + 1 if labels.size else 1
    if top <= 10:
        return colormaps["tab10"](labels % 10)
    if top <= _MAX_NAMED_CLASSES:
        return colormaps["tab20"](labels % 20)
    return colormaps["viridis"](labels / max(top - 1, 1))


def _class_legend(fig: Figure, ax, labels: np.ndarray, class_names: Sequence[str] | None) -> None:
    """A legend with one entry per class present, named by ``class_names`` (the label number otherwise); a colour bar
    when there are too many classes to name."""
    present = np.unique(labels)
    if int(labels.max()) + 1 > _MAX_NAMED_CLASSES:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        fig.colorbar(ScalarMappable(Normalize(0, int(labels.max())), "viridis"), ax=ax, label="label")
        return
    colours = _label_colours(present)
    handles = [
        Line2D([], [], ls="", marker="o", color=colour, label=class_names[k] if class_names else str(k))
        for k, colour in zip(present.tolist(), colours, strict=True)
    ]
    # a figure legend "outside": constrained layout makes room for it beside the axes, over no data point
    fig.legend(handles=handles, title="class", loc="outside right upper", fontsize=8)


def _labels(labels: torch.Tensor | None) -> np.ndarray | None:
    return None if labels is None else labels.detach().cpu().numpy().astype(np.int64)


def latent_scatter(
    vae: VAE,
    x: torch.Tensor,
    labels: torch.Tensor | None = None,
    dims: tuple[int, int] | None = None,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """Posterior means of ``x`` in two latent dimensions, coloured by class.

    :param vae: the model.
    :param x: images ``(N, D)``, as the model sees them (binarised where it was trained on binarised data).
    :param labels: ``(N,)`` integer labels, or ``None``; a CVAE also encodes with them (it needs them).
    :param dims: the two dimensions to draw; default the two most active (:func:`most_active_dims`). The axis labels
        give each one's activity and, for the default, its rank.
    :param class_names: the name of each label (e.g. ``Dataset.class_names``), for the legend.
    """
    ranked = most_active_dims(vae, x, labels)
    z, activity = ranked.means.numpy(), ranked.activity
    chosen = ranked.dims[:2] if dims is None else tuple(dims)
    ranks = (0, 1) if dims is None else (None, None)
    colours = None if labels is None else _label_colours(_labels(labels))
    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.add_subplot()
    y = z[:, chosen[1]] if vae.latent_dim >= 2 else np.zeros(len(z))
    ax.scatter(z[:, chosen[0]], y, s=4, alpha=0.7, c=colours, lw=0)
    if labels is not None:
        _class_legend(fig, ax, _labels(labels), class_names)
    ax.set_xlabel(_axis_label(chosen[0], activity, ranks[0]))
    if vae.latent_dim >= 2:
        ax.set_ylabel(_axis_label(chosen[1], activity, ranks[1]))
    which = "the 2 most active" if dims is None else "2"
    ax.set_title(
        f"posterior means E[z|x] of {len(z)} images: {which} of {vae.latent_dim} dimensions\n"
        "(activity Var = variance over images of E[z_d|x])",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    return fig


def _marginal_covariance(q, dims: tuple[int, int]) -> torch.Tensor | None:
    """Covariance ``(B, 2, 2)`` of ``z[dims]`` under q, where q has one in closed form; ``None`` otherwise (flows)."""
    index = list(dims)
    tril = getattr(q, "scale_tril", None)  # MultivariateNormal, LowRankMultivariateNormal
    if tril is not None:
        rows = tril[..., index, :]  # (B, 2, L): the marginal covariance is rows @ rowsᵀ, no L×L matrix needed
        return rows @ rows.mT
    try:
        variance = q.variance  # Normal(...).to_event(1): independent coordinates
    except NotImplementedError:
        return None
    return torch.diag_embed(variance[..., index])


def _draw_ellipses(ax, centres: np.ndarray, covariance: torch.Tensor, n_std: float, colours) -> None:
    """Draw each point's ``n_std``-σ ellipse of its 2×2 marginal ``covariance`` ``(B, 2, 2)`` around ``centres``
    ``(B, 2)``, and widen the data limits to hold them."""
    from matplotlib.collections import EllipseCollection

    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())  # ascending: (B, 2), (B, 2, 2)
    major = eigenvectors[..., :, 1].cpu().numpy()  # (B, 2)
    axes = 2 * n_std * eigenvalues.clamp(min=0).sqrt().cpu().numpy()  # full axis lengths, (B, 2)
    angles = np.degrees(np.arctan2(major[:, 1], major[:, 0]))
    ellipses = EllipseCollection(
        axes[:, 1],
        axes[:, 0],
        angles,
        units="xy",
        offsets=centres,
        offset_transform=ax.transData,
        facecolors="none",
        edgecolors="C0" if colours is None else colours,
        alpha=0.8,
        linewidths=0.9,
    )
    ax.add_collection(ellipses, autolim=False)
    # the axes limits must hold the whole ellipses, not only their centres: half-extent n_std·√Σ_ii
    reach = n_std * covariance.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt().cpu().numpy()  # (B, 2)
    ax.update_datalim(np.concatenate([centres - reach, centres + reach]))


def _kde(samples: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Gaussian kernel density of 2-d ``samples`` ``(S, 2)`` at ``points`` ``(P, 2)``, up to a constant factor.

    The kernel covariance is the samples' covariance times Scott's factor squared, :math:`S^{-2/(d+4)} = S^{-1/3}`
    for d = 2 (as ``scipy.stats.gaussian_kde`` chooses by default).
    """
    cov = np.cov(samples.T) * len(samples) ** (-1 / 3)
    cov += np.eye(2) * (1e-9 * np.trace(cov) + 1e-12)  # a degenerate cloud (a line) still has an inverse
    diff = points[:, None, :] - samples[None, :, :]  # (P, S, 2)
    return np.exp(-0.5 * np.einsum("psi,ij,psj->ps", diff, np.linalg.inv(cov), diff)).mean(1)


def _draw_density(ax, z: np.ndarray, mass: float, colours) -> None:
    """Per posterior, its draws ``z`` ``(S, B, 2)`` as small dots and the contour of the highest-density region
    that holds ``mass`` of them (the level is the (1 − mass) quantile of the KDE at the draws)."""
    flat_colours = None if colours is None else np.repeat(colours[None], z.shape[0], 0).reshape(-1, 4)
    ax.scatter(*z.reshape(-1, 2).T, s=1.5, alpha=0.5, c=flat_colours, lw=0)
    for b in range(z.shape[1]):
        cloud = z[:, b]
        level = np.quantile(_kde(cloud, cloud), 1.0 - mass)
        lo, hi = cloud.min(0), cloud.max(0)
        pad = 0.15 * (hi - lo) + 1e-6
        gx, gy = np.meshgrid(*(np.linspace(lo[i] - pad[i], hi[i] + pad[i], 48) for i in range(2)))
        density = _kde(cloud, np.stack([gx.ravel(), gy.ravel()], 1)).reshape(gx.shape)
        if density.max() > level:  # a grid too coarse for a needle-thin cloud finds no contour; its dots remain
            ax.contour(
                gx, gy, density, levels=[level], colors=["C0" if colours is None else colours[b]], linewidths=0.9
            )


def _draw_regions(ax, q, x: torch.Tensor, dims: tuple[int, int], n_std: float, n_samples: int, seed: int, colours):
    """Draw each posterior's region holding :math:`1 - e^{-n_\\sigma^2/2}` of its mass in ``dims``: an ellipse
    where q has a closed-form covariance, else a KDE contour of ``n_samples`` draws seeded on ``x``'s device
    (:func:`~pyro_vae.importance.own_rng`: the caller's stream is left as it was). Returns the centres
    ``(B, 2)`` and what was drawn, in words."""
    mass = 1.0 - np.exp(-(n_std**2) / 2)
    covariance = _marginal_covariance(q, dims)
    if covariance is None:
        with own_rng(x, seed):
            z = q.sample((n_samples,))[..., list(dims)].cpu().numpy()  # (S, B, 2)
        _draw_density(ax, z, mass, colours)
        return z.mean(0), f"{mass:.0%} region (KDE of {n_samples} draws)"
    centres = posterior_mean(q)[..., list(dims)].cpu().numpy()
    _draw_ellipses(ax, centres, covariance, n_std, colours)
    return centres, f"{n_std:g}σ ellipse ({mass:.0%})"


def _posterior_legend(fig: Figure, what: str) -> None:
    fig.legend(
        handles=[
            Line2D([], [], ls="", marker="o", mfc="w", mec="k", label="posterior mean E[z|x]"),
            Line2D([], [], color="0.3", lw=0.9, label=what),
        ],
        loc="outside right lower",
        fontsize=8,
    )


def latent_posteriors(
    vae: VAE,
    x: torch.Tensor,
    labels: torch.Tensor | None = None,
    dims: tuple[int, int] | None = None,
    n_std: float = 2.0,
    n_samples: int = 400,
    seed: int = 0,
    title: str | None = None,
    class_names: Sequence[str] | None = None,
) -> Figure:
    r"""Each data point's posterior q(z | x) in two latent dimensions: its mean, and the region that holds
    :math:`1 - e^{-n_\sigma^2/2}` of its mass (86 % for 2 σ), coloured by class.

    * Gaussian families: the ``n_std``-σ ellipse of the 2×2 marginal covariance
      :math:`\Sigma = V \operatorname{diag}(\lambda) V^\top` (from ``scale_tril`` or the variance), with semi-axes
      :math:`n_\sigma \sqrt{\lambda_i}` along the eigenvectors :math:`v_i`.
    * Families without a closed-form covariance (flows): ``n_samples`` draws per point as small dots, and the
      contour of the highest-density region holding the same mass, from a Gaussian KDE of the draws; a bent or
      skewed posterior shows as a bent or skewed contour.

    :param vae: a trained model with ``latent_dim >= 2``.
    :param x: data ``(B, D)``; a few dozen points keep the regions readable.
    :param labels: ``(B,)`` integer labels for the colours, or ``None``.
    :param dims: the two latent dimensions to draw; default the two most active over ``x``
        (:func:`most_active_dims`).
    :param float n_std: region size in standard deviations (default 2).
    :param int n_samples: draws per point for flows (default 400).
    :param int seed: seed of the flow draws (drawn from their own stream; the global one is left as it was).
    :param title: axes title (default: says what is drawn).
    :param class_names: the name of each label, for the legend.
    """
    if vae.latent_dim < 2:
        raise ConfigError(f"latent_posteriors needs latent_dim >= 2, the VAE has {vae.latent_dim}")
    dims = most_active_dims(vae, x, labels).dims[:2] if dims is None else tuple(dims)
    colours = None if labels is None else _label_colours(_labels(labels))
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.add_subplot()
    with torch.no_grad():
        x = x.to(next(vae.parameters()).device)
        q = encode(vae, x, image_labels(vae, x, labels, "latent_posteriors"))
        centres, what = _draw_regions(ax, q, x, dims, n_std, n_samples, seed, colours)
    ax.scatter(centres[:, 0], centres[:, 1], s=10, c="C0" if colours is None else colours, edgecolors="k", lw=0.4)
    if labels is not None:
        _class_legend(fig, ax, _labels(labels), class_names)
    _posterior_legend(fig, what)
    ax.autoscale_view()
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel(f"z[{dims[0]}]")
    ax.set_ylabel(f"z[{dims[1]}]")
    ax.set_title(title if title is not None else f"posteriors q(z|x): means and {what}", fontsize=9)
    return fig
