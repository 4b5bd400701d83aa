"""Figures for a trained VAE. Every function returns a :class:`matplotlib.figure.Figure`.

Figures are built with matplotlib's object-oriented API (no ``pyplot`` state), so the library never changes the
user's backend and figures can be made in scripts, notebooks and tests alike. Nothing in the package below this
layer imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from pyro_vae.model import VAE, posterior_mean
from pyro_vae.networks import eval_mode
from pyro_vae.run_dir import RunDir

__all__ = [
    "image_grid",
    "reconstruction_grid",
    "sample_grid",
    "loss_curves",
    "latent_scatter",
    "latent_posteriors",
    "comparison_figure",
    "save_run_figures",
]


def _shape(image_shape: Sequence[int] | None, dim: int) -> tuple[int, int]:
    if image_shape:
        h, w = tuple(image_shape)[-2:]
        return int(h), int(w)
    side = math.isqrt(dim)
    return (side, side) if side * side == dim else (1, dim)


def image_grid(
    images: torch.Tensor, image_shape: Sequence[int] | None = None, ncols: int = 8, title: str = ""
) -> Figure:
    """Images ``(n, D)`` in [0, 1] as a grid with ``ncols`` columns."""
    images = images.detach().float().cpu()
    h, w = _shape(image_shape, images.shape[-1])
    n = images.shape[0]
    nrows = max(1, math.ceil(n / ncols))
    canvas = np.ones((nrows * (h + 1) - 1, ncols * (w + 1) - 1), dtype=np.float32)
    for i, img in enumerate(images.reshape(n, h, w).numpy()):
        r, c = divmod(i, ncols)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = img
    fig = Figure(figsize=(ncols * 0.9 * max(w / h, 1), nrows * 0.9), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(canvas, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return fig


def reconstruction_grid(vae: VAE, x: torch.Tensor, image_shape: Sequence[int] | None = None, n: int = 8) -> Figure:
    """Originals (top row) and their reconstructions E[x | z = posterior mean] (bottom row)."""
    x = x[:n].to(next(vae.parameters()).device)
    recon = vae.reconstruct(x)
    return image_grid(torch.cat([x, recon]), image_shape, ncols=x.shape[0], title="data (top) and reconstructions")


def sample_grid(vae: VAE, image_shape: Sequence[int] | None = None, n: int = 64, seed: int = 0) -> Figure:
    """Mean images of ``n`` codes drawn from the prior N(0, I)."""
    generator = torch.Generator(device=next(vae.parameters()).device).manual_seed(seed)
    return image_grid(
        vae.sample(n, generator=generator), image_shape, ncols=int(math.ceil(math.sqrt(n))), title="samples"
    )


def loss_curves(losses: Sequence[float], epochs: Sequence = (), steps_per_epoch: int | None = None) -> Figure:
    """Training ELBO per step (light) with a moving average, and the test ELBO per epoch (with ± 1 SE)."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    elbo = -np.asarray(losses, dtype=np.float64)
    if elbo.size:
        ax.plot(np.arange(1, elbo.size + 1), elbo, color="C0", alpha=0.3, lw=0.8, label="train ELBO (per step)")
        window = max(1, elbo.size // 50)
        if window > 1:
            smooth = np.convolve(elbo, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(window, elbo.size + 1), smooth, color="C0", lw=1.5, label=f"moving average ({window})")
        lo, hi = np.percentile(elbo, [5, 100])
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    if epochs:
        steps = [e.step for e in epochs]
        mean = np.array([e.test_elbo.mean for e in epochs])
        se = np.array([e.test_elbo.se for e in epochs])
        ax.errorbar(steps, mean, yerr=se, color="C1", marker="o", ms=3, label="test ELBO (per epoch)")
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO (nats per image)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def latent_scatter(
    vae: VAE, x: torch.Tensor, labels: torch.Tensor | None = None, dims: tuple[int, int] = (0, 1)
) -> Figure:
    """Posterior means of ``x`` in two latent dimensions (the first two by default), coloured by label."""
    device = next(vae.parameters()).device
    with torch.no_grad():
        z = posterior_mean(vae.encode(x.to(device))).cpu().numpy()
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.add_subplot()
    if vae.latent_dim < 2:
        ax.scatter(
            z[:, 0], np.zeros_like(z[:, 0]), s=4, c=None if labels is None else labels.cpu().numpy(), cmap="tab10"
        )
    else:
        sc = ax.scatter(
            z[:, dims[0]],
            z[:, dims[1]],
            s=4,
            alpha=0.7,
            c=None if labels is None else labels.cpu().numpy(),
            cmap="tab10",
        )
        if labels is not None:
            fig.colorbar(sc, ax=ax, label="label")
        ax.set_ylabel(f"z[{dims[1]}]")
    ax.set_xlabel(f"z[{dims[0]}]")
    ax.set_title("posterior means" + ("" if vae.latent_dim == 2 else f" (dimensions {dims[0]} and {dims[1]})"))
    return fig


def _tab10(labels: np.ndarray) -> np.ndarray:
    """RGBA colours ``(B, 4)`` of integer labels in matplotlib's ``tab10`` (labels 0–9, as in the scatter plots)."""
    from matplotlib import colormaps

    return colormaps["tab10"](np.asarray(labels) % 10)


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


def _draw_clouds(ax, q, dims: tuple[int, int], n_samples: int, seed: int, colours) -> np.ndarray:
    """Scatter ``n_samples`` draws of q per point in ``dims`` (from their own seeded stream); returns the clouds'
    centres ``(B, 2)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        z = q.sample((n_samples,))[..., list(dims)].cpu().numpy()  # (S, B, 2)
    cloud_colours = None if colours is None else np.broadcast_to(colours, z.shape[:2]).ravel()
    ax.scatter(*z.reshape(-1, 2).T, s=2, alpha=0.25, c=cloud_colours, cmap="tab10", vmin=0, vmax=9, lw=0)
    return z.mean(0)


def _draw_ellipses(ax, centres: np.ndarray, covariance: torch.Tensor, n_std: float, colours) -> np.ndarray:
    """Draw each point's ``n_std``-σ ellipse of its 2×2 marginal ``covariance`` ``(B, 2, 2)`` around ``centres``
    ``(B, 2)``, and widen the data limits to hold them; returns ``centres``."""
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
        edgecolors="C0" if colours is None else _tab10(colours),
        alpha=0.7,
        linewidths=0.8,
    )
    ax.add_collection(ellipses, autolim=False)
    # the axes limits must hold the whole ellipses, not only their centres: half-extent n_std·√Σ_ii
    reach = n_std * covariance.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt().cpu().numpy()  # (B, 2)
    ax.update_datalim(np.concatenate([centres - reach, centres + reach]))
    return centres


def latent_posteriors(
    vae: VAE,
    x: torch.Tensor,
    labels: torch.Tensor | None = None,
    dims: tuple[int, int] = (0, 1),
    n_std: float = 2.0,
    n_samples: int = 32,
    seed: int = 0,
    title: str | None = None,
) -> Figure:
    r"""Each data point's posterior q(z | x) in two latent dimensions: its mean, and either its ``n_std``-standard-
    deviation covariance ellipse (Gaussian families, from ``scale_tril`` or the variance) or, for families without
    a closed-form covariance (flows), a cloud of ``n_samples`` draws. Colours follow the labels.

    The ellipse of a 2×2 marginal covariance :math:`\Sigma = V \operatorname{diag}(\lambda) V^\top` has
    semi-axes :math:`n_\sigma \sqrt{\lambda_i}` along the eigenvectors :math:`v_i`; for a Gaussian it holds
    :math:`1 - e^{-n_\sigma^2/2}` of the mass (86 % for 2 σ).

    :param vae: a trained model with ``latent_dim >= 2``.
    :param x: data ``(B, D)``; a few dozen points keep the ellipses readable.
    :param labels: ``(B,)`` integer labels for the colours, or ``None``.
    :param dims: the two latent dimensions to draw.
    :param float n_std: ellipse size in standard deviations.
    :param int n_samples: draws per point for flows.
    :param int seed: seed of the flow draws.
    :param title: axes title (default: says what is drawn).
    """
    if vae.latent_dim < 2:
        raise ValueError(f"latent_posteriors needs latent_dim >= 2, the VAE has {vae.latent_dim}")
    device = next(vae.parameters()).device
    colours = None if labels is None else labels.cpu().numpy()
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.add_subplot()
    with torch.no_grad():
        q = vae.encode(x.to(device))
        covariance = _marginal_covariance(q, dims)
        if covariance is None:
            centres = _draw_clouds(ax, q, dims, n_samples, seed, colours)
            what = f"{n_samples} posterior draws per point"
        else:
            centres = _draw_ellipses(ax, posterior_mean(q)[..., list(dims)].cpu().numpy(), covariance, n_std, colours)
            what = f"posterior means and {n_std:g}σ ellipses"
    sc = ax.scatter(centres[:, 0], centres[:, 1], s=8, c=colours, cmap="tab10", vmin=0, vmax=9, edgecolors="k", lw=0.3)
    if labels is not None:
        fig.colorbar(sc, ax=ax, label="label")
    ax.autoscale_view()
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel(f"z[{dims[0]}]")
    ax.set_ylabel(f"z[{dims[1]}]")
    ax.set_title(title if title is not None else what)
    return fig


def comparison_figure(result) -> Figure:
    """Three panels from a :class:`~pyro_vae.compare.CompareResult`: test ELBO (mean ± SE over seeds, each seed as a
    dot) and, when measured, the importance-sampled bound -NLL on log p(x) beside it; median seconds per epoch (with
    the ratio to ``mvn_diag`` above each bar); and peak resident-set growth."""
    rows = result.rows
    names = [row.guide for row in rows]
    positions = np.arange(len(rows))
    fig = Figure(figsize=(max(8.0, 1.6 * len(rows) * 1.5), 3.8), layout="constrained")
    ax_elbo, ax_time, ax_mem = fig.subplots(1, 3)
    means = np.array([row.test_elbo.mean for row in rows])
    ses = np.nan_to_num(np.array([row.test_elbo.se for row in rows]))
    ax_elbo.errorbar(positions, means, yerr=ses, fmt="o", color="C0", capsize=4, label="test ELBO")
    for i, guide in enumerate(names):
        seeds = [run.test_elbo.mean for run in result.runs if run.guide == guide]
        ax_elbo.scatter(np.full(len(seeds), i + 0.15), seeds, s=10, color="C1", alpha=0.7)
    if getattr(result, "nll_k", None) is not None:
        bound = np.array([np.nan if row.nll is None else -row.nll.mean for row in rows])
        bound_se = np.nan_to_num(np.array([np.nan if row.nll is None else row.nll.se for row in rows]))
        ax_elbo.errorbar(
            positions - 0.15, bound, yerr=bound_se, fmt="s", color="C3", capsize=4, label=f"-IS-NLL, k={result.nll_k}"
        )
    ax_elbo.legend(loc="lower left", fontsize=8)
    ax_elbo.set_ylabel("nats per image")
    ax_elbo.set_title("bounds on log p(x) (higher is better)")
    seconds = [row.seconds_per_epoch for row in rows]
    bars = ax_time.bar(positions, seconds, color="C2")
    for bar, row in zip(bars, rows, strict=True):
        if row.time_ratio is not None:
            ax_time.annotate(
                f"{row.time_ratio:.2f}×",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax_time.set_ylabel("seconds per epoch (median)")
    ax_time.set_title("training time")
    memory = [np.nan if row.peak_memory_mib is None else row.peak_memory_mib for row in rows]
    ax_mem.bar(positions, memory, color="C4")
    ax_mem.set_ylabel("peak RSS growth (MiB)")
    ax_mem.set_title("memory")
    for ax in (ax_elbo, ax_time, ax_mem):
        ax.set_xticks(positions, names, rotation=30, ha="right")
        ax.grid(alpha=0.3, axis="y")
    return fig


def save_run_figures(vae: VAE, data, result, out_dir: str | Path, n_points: int = 2000) -> list[Path]:
    """Write ``reconstructions.png``, ``samples.png``, ``loss.png`` and ``latent.png`` into ``out_dir``.

    :param vae: the trained model.
    :param data: its :class:`~pyro_vae.data.Dataset` (test split is plotted).
    :param result: the :class:`~pyro_vae.train.FitResult`.
    :returns: the paths written.
    """
    with eval_mode(vae):
        figures = {
            "reconstructions.png": reconstruction_grid(vae, data.x_test, data.image_shape),
            "samples.png": sample_grid(vae, data.image_shape),
            "loss.png": loss_curves(result.losses, result.epochs),
            "latent.png": latent_scatter(
                vae, data.x_test[:n_points], None if data.y_test is None else data.y_test[:n_points]
            ),
        }
    run = RunDir(out_dir)  # atomic writes: a full disk keeps the previous image, never a 0-byte one
    return [run.write_figure(name, fig) for name, fig in figures.items()]
