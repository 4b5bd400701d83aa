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

__all__ = ["image_grid", "reconstruction_grid", "sample_grid", "loss_curves", "latent_scatter", "save_run_figures"]


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


def save_run_figures(vae: VAE, data, result, out_dir: str | Path, n_points: int = 2000) -> list[Path]:
    """Write ``reconstructions.png``, ``samples.png``, ``loss.png`` and ``latent.png`` into ``out_dir``.

    :param vae: the trained model.
    :param data: its :class:`~pyro_vae.data.Dataset` (test split is plotted).
    :param result: the :class:`~pyro_vae.train.FitResult`.
    :returns: the paths written.
    """
    out_dir = Path(out_dir)
    was_training = vae.training
    vae.eval()
    figures = {
        "reconstructions.png": reconstruction_grid(vae, data.x_test, data.image_shape),
        "samples.png": sample_grid(vae, data.image_shape),
        "loss.png": loss_curves(result.losses, result.epochs),
        "latent.png": latent_scatter(
            vae, data.x_test[:n_points], None if data.y_test is None else data.y_test[:n_points]
        ),
    }
    vae.train(was_training)
    paths = []
    for name, fig in figures.items():
        path = out_dir / name
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths
