"""Image grids: flat rows ``(n, D)`` laid out as grey or colour pictures, alone or in labelled rows.

Layout convention of the whole project: data are flat ``(N, D)`` with ``D = C * H * W`` in channel-first order, and
``image_shape`` is ``(C, H, W)`` with ``C`` in {1, 3}; the legacy ``(H, W)`` means ``C = 1``. Grey images are drawn
with the ``gray`` colour map on [0, 1], colour images as RGB (transposed to ``(H, W, C)`` for ``imshow``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from pyro_vae.errors import DataError
from pyro_vae.model import VAE
from pyro_vae.plotting.conditioning import image_labels

__all__ = ["image_grid", "image_layout", "image_rows", "reconstruction_grid", "to_pixels"]

#: Channel counts a picture can have: grey and RGB.
CHANNELS = (1, 3)
#: Inches per image in a grid.
_CELL = 0.9


def image_layout(image_shape: Sequence[int] | None, dim: int) -> tuple[int, int, int]:
    """``(C, H, W)`` of flat rows of ``dim`` values.

    :param image_shape: ``(C, H, W)`` with ``C`` in {1, 3}, or the legacy grey ``(H, W)``; ``None`` for flat data,
        drawn as square grey images when ``dim`` is a square and as one row of pixels otherwise.
    :param int dim: D, the values per row.
    :raises DataError: one line when ``image_shape`` does not describe rows of ``dim`` values.
    """
    if not image_shape:
        side = math.isqrt(dim)
        return (1, side, side) if side * side == dim else (1, 1, dim)
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or shape[0] not in CHANNELS or math.prod(shape) != dim:
        raise DataError(
            f"image_shape {tuple(image_shape)} does not describe images of {dim} values; give (C, H, W) with C in "
            f"{{1, 3}} and C*H*W == {dim}, or (H, W) for grey images"
        )
    return shape


def to_pixels(images: torch.Tensor, layout: tuple[int, int, int]) -> np.ndarray:
    """Flat images ``(n, C*H*W)`` (channel-first) as pictures: ``(n, H, W)`` grey or ``(n, H, W, 3)`` RGB, float32.

    RGB values are clipped to [0, 1], the range ``imshow`` draws (grey ones are mapped with ``vmin``/``vmax``).
    """
    c, h, w = layout
    pixels = images.detach().float().cpu().reshape(-1, c, h, w).numpy()
    if c == 1:
        return pixels[:, 0]
    return np.clip(pixels.transpose(0, 2, 3, 1), 0.0, 1.0)


def _canvas(pixels: np.ndarray, ncols: int) -> np.ndarray:
    """Tile pictures ``(n, H, W[, 3])`` into ``ncols`` columns, one white pixel between them."""
    n, h, w = pixels.shape[:3]
    nrows = max(1, math.ceil(n / ncols))
    canvas = np.ones((nrows * (h + 1) - 1, ncols * (w + 1) - 1, *pixels.shape[3:]), dtype=np.float32)
    for i, img in enumerate(pixels):
        r, c = divmod(i, ncols)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = img
    return canvas


def _show(ax, canvas: np.ndarray) -> None:
    if canvas.ndim == 2:
        ax.imshow(canvas, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(canvas, interpolation="nearest")


def image_grid(
    images: torch.Tensor, image_shape: Sequence[int] | None = None, ncols: int = 8, title: str = ""
) -> Figure:
    """Images ``(n, D)`` in [0, 1] as a grid with ``ncols`` columns, grey or RGB by ``image_shape`` (see
    :func:`image_layout`)."""
    c, h, w = image_layout(image_shape, images.shape[-1])
    nrows = max(1, math.ceil(images.shape[0] / ncols))
    fig = Figure(figsize=(ncols * _CELL * max(w / h, 1), nrows * _CELL), layout="constrained")
    ax = fig.add_subplot()
    _show(ax, _canvas(to_pixels(images, (c, h, w)), ncols))
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return fig


def image_rows(
    rows: Sequence[torch.Tensor],
    labels: Sequence[str],
    image_shape: Sequence[int] | None = None,
    title: str = "",
    column_labels: Sequence[str] = (),
) -> Figure:
    """One labelled row of images per entry of ``rows``, each drawn in its own axes (``fig.axes[k]`` holds row
    ``k``, its picture in ``fig.axes[k].images[0]``), at one common scale.

    :param rows: ``(n_k, D)`` images per row.
    :param labels: one label per row, written to its left.
    :param image_shape: see :func:`image_layout`.
    :param str title: the figure's title.
    :param column_labels: labels under the columns of the last row (e.g. the latent values of a traversal).
    """
    if len(rows) != len(labels):
        raise ValueError(f"image_rows got {len(rows)} rows but {len(labels)} labels; give one label per row")
    layout = image_layout(image_shape, rows[0].shape[-1])
    _, h, w = layout
    ncols = max(row.shape[0] for row in rows)
    fig = Figure(figsize=(1.6 + ncols * _CELL * max(w / h, 1), 0.5 + len(rows) * _CELL), layout="constrained")
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, row, label in zip(axes, rows, labels, strict=True):
        _show(ax, _canvas(to_pixels(row, layout), row.shape[0]))
        ax.set_xlim(-0.5, ncols * (w + 1) - 1.5)  # every row at the scale of the widest
        ax.set_xticks([])
        ax.set_yticks([])
        ax.spines[:].set_visible(False)
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
    if column_labels:
        axes[-1].set_xticks([c * (w + 1) + (w - 1) / 2 for c in range(len(column_labels))], list(column_labels))
        axes[-1].tick_params(length=0, labelsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


@torch.no_grad()
def reconstruction_grid(
    vae: VAE,
    x: torch.Tensor,
    image_shape: Sequence[int] | None = None,
    n: int = 8,
    model_input: torch.Tensor | None = None,
    input_label: str = "model input (binarised)",
    labels: torch.Tensor | None = None,
) -> Figure:
    """Originals, what the model saw, and reconstructions E[x | z = posterior mean], in labelled rows.

    :param vae: the model.
    :param x: the original images ``(B, D)`` (grey levels as loaded).
    :param image_shape: see :func:`image_layout`.
    :param int n: the first ``n`` images are drawn (default 8).
    :param model_input: what the model encodes, ``(B, D)`` (e.g. the run's binarisation of ``x``, from
        :func:`pyro_vae.data.binarize_eval`), drawn as the middle row; ``None`` when the model saw ``x`` itself
        (two rows).
    :param str input_label: the middle row's label.
    :param labels: ``(B,)`` labels of ``x``: a CVAE reconstructs with them (it needs them); M2 reconstructs at its
        classifier's class; the VAE ignores them (:mod:`pyro_vae.plotting.conditioning`).
    """
    device = next(vae.parameters()).device
    x = x[:n]
    seen = (x if model_input is None else model_input[:n]).to(device)
    y = image_labels(vae, seen, None if labels is None else labels[:n], "reconstruction_grid")
    recon = vae.reconstruct(seen) if y is None else vae.reconstruct(seen, y)
    rows, labels = [x, recon], ["original", "reconstruction (mean)"]
    if model_input is not None:
        rows.insert(1, seen)
        labels.insert(1, input_label)
    return image_rows(rows, labels, image_shape, title="reconstructions: E[x | z] at the posterior mean of z")
