"""Image and label validation: the one place where pyro_vae decides what counts as usable images.

:func:`validate_images` checks arrays as they are loaded and converts them to float32 ``(N, D)`` tensors in
``[0, 1]``; :func:`check_image_tensor` checks such a tensor when it arrives by another road (a
:class:`~pyro_vae.data.Dataset` built by hand), before one NaN pixel turns every weight into NaN in a single step.
Every problem is a :class:`~pyro_vae.errors.DataError` that says what was found and what to do.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np
import torch

from pyro_vae.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "CHANNELS",
    "LAYOUTS",
    "Images",
    "check_image_tensor",
    "images_and_shape",
    "labels",
    "read_layout",
    "validate_images",
]

#: Channel counts pyro_vae reads: grey and RGB.
CHANNELS = (1, 3)
#: Values of an .npz's optional ``layout`` entry, which settles a 4-d ``x`` whose shape reads both ways.
LAYOUTS = ("NCHW", "NHWC")
_FORMS = "(N, H, W), (N, C, H, W), (N, H, W, C) with C = 1 (grey) or 3 (RGB), or flat (N, D)"


class Images(NamedTuple):
    """Validated images.

    :ivar torch.Tensor x: float32 ``(N, D)`` in ``[0, 1]``, each row a ``(C, H, W)`` image flattened channel-first.
    :ivar image_shape: ``(C, H, W)`` (grey: ``(1, H, W)``), or ``None`` for flat input.
    """

    x: torch.Tensor
    image_shape: tuple[int, int, int] | None


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            # numpy has no bfloat16; float32 holds every bfloat16 value exactly.
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def read_layout(value: Any, what: str) -> str | None:
    """The ``layout`` entry of an .npz (``"NCHW"`` or ``"NHWC"``), or ``None`` when ``value`` is ``None``.

    :raises DataError: anything but one of :data:`LAYOUTS` as a string.
    """
    if value is None:
        return None
    arr = np.asarray(value)
    layout = str(arr.reshape(())) if arr.dtype.kind == "U" and arr.size == 1 else None
    if layout not in LAYOUTS:
        raise DataError(
            f"{what} is {arr!r} but must be the string 'NCHW' (channels first) or 'NHWC' (channels last); save it "
            "with numpy.savez(path, x=x, layout='NHWC')"
        )
    return layout


def _four_d_layout(shape: tuple[int, ...], what: str, layout: str | None) -> str:
    """``"NCHW"`` or ``"NHWC"`` for a 4-d array: the given ``layout``, or the one reading whose channel axis holds 1
    or 3 channels; one line when neither or both do."""
    first, last = shape[1] in CHANNELS, shape[-1] in CHANNELS
    if layout is not None:
        channels = shape[1] if layout == "NCHW" else shape[-1]
        if channels not in CHANNELS:
            raise DataError(
                f"{what} has shape {shape}, i.e. {channels} channels in layout {layout}, but images need 1 (grey) or "
                "3 (RGB) channels; check the layout"
            )
        return layout
    if first and last:
        n, a, b, c = shape
        raise DataError(
            f"{what} has shape {shape}, which reads both as (N, C, H, W) = {a} channel(s) of {b}×{c} and as "
            f"(N, H, W, C) = {a}×{b} images with {c} channel(s); say which with numpy.savez(path, x=x, "
            "layout='NCHW') or layout='NHWC'"
        )
    if first or last:
        return "NCHW" if first else "NHWC"
    fix = "drop the alpha channel with x[..., :3]" if shape[-1] == 4 else "convert them to greyscale or RGB"
    raise DataError(
        f"{what} has shape {shape}, with neither {shape[1]} (axis 1) nor {shape[-1]} (last axis) channels, but images "
        f"must be {_FORMS}; {fix}"
    )


def _check_shape(x: np.ndarray, what: str, layout: str | None) -> tuple[tuple[int, int, int] | None, bool]:
    """The per-image shape ``(C, H, W)`` to remember (``None`` for flat input) and whether the channels come last;
    refuse shapes that are not images."""
    shape = tuple(x.shape)
    if x.ndim not in (2, 3, 4):
        raise DataError(f"{what} has shape {shape} but images must be {_FORMS}; reshape it")
    if shape[0] == 0:
        raise DataError(f"{what} is empty (shape {shape}); it needs at least one image")
    if 0 in shape[1:]:
        raise DataError(f"{what} has shape {shape}, i.e. images without pixels; check how it was made")
    if layout is not None and x.ndim != 4:
        raise DataError(f"{what} has shape {shape} but a layout ({layout}) is given, which only 4-d images need")
    if x.ndim == 2:
        return None, False
    if x.ndim == 3:
        return (1, *shape[1:]), False
    if _four_d_layout(shape, what, layout) == "NCHW":
        return shape[1:], False
    return (shape[3], shape[1], shape[2]), True


def _non_finite_message(x: np.ndarray, what: str) -> str | None:
    finite = np.isfinite(x)
    if finite.all():
        return None
    n_nan = int(np.isnan(x).sum())
    n_inf = int(x.size - finite.sum()) - n_nan
    first = int(np.argmin(finite.reshape(len(x), -1).all(axis=1)))
    parts = [f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (n_inf, "infinite")) if n]
    return f"{what} contains {' and '.join(parts)} values (first in image {first}); remove or replace those images"


def _check_float_values(arr: np.ndarray, what: str) -> None:
    """Refuse float images with NaN or infinite values, or values outside [0, 1]."""
    message = _non_finite_message(arr, what)
    if message:
        raise DataError(message)
    low, high = float(arr.min()), float(arr.max())
    if low < 0.0:
        raise DataError(f"{what} has values down to {low} but float images must lie in [0, 1]; rescale them to [0, 1]")
    if high > 1.0:
        fix = "divide by 255" if high <= 255.0 else "rescale them to [0, 1]"
        raise DataError(f"{what} has values up to {high} but float images must lie in [0, 1]; {fix}")


def images_and_shape(x: Any, what: str, layout: str | None = None) -> Images:
    """:func:`validate_images`, and the per-image shape ``(C, H, W)`` to remember (``None`` for flat input).

    A 4-d array is channels-first ``(N, C, H, W)`` or channels-last ``(N, H, W, C)``, whichever reading has 1 or 3
    channels (``layout``, ``"NCHW"`` or ``"NHWC"``, settles a shape that reads both ways); channels-last images are
    transposed to channels-first before flattening, with one INFO line.

    :param x: the images.
    :param str what: how to name ``x`` in messages and the log.
    :param layout: ``None`` (detect), ``"NCHW"`` or ``"NHWC"``.
    """
    arr = _as_numpy(x)
    image_shape, channels_last = _check_shape(arr, what, layout)
    if channels_last:
        logger.info(
            "%s has shape %s: read as channels-last (N, H, W, C) images, stored as (C, H, W) = %s",
            what,
            tuple(arr.shape),
            image_shape,
        )
        arr = np.moveaxis(arr, -1, 1)  # (N, H, W, C) → (N, C, H, W); the reshapes below copy it contiguous
    n = arr.shape[0]
    kind = arr.dtype.kind
    if arr.dtype == np.uint8:
        out = arr.reshape(n, -1).astype(np.float32) / np.float32(255.0)
    elif kind == "b":
        out = arr.reshape(n, -1).astype(np.float32)
    elif kind == "f":
        _check_float_values(arr, what)
        # astype copies, so the tensor owns writable memory even when the input array was read-only.
        out = arr.reshape(n, -1).astype(np.float32)
    elif kind in "iu":
        low, high = int(arr.min()), int(arr.max())
        raise DataError(
            f"{what} has dtype {arr.dtype} (values {low}..{high}) but images must be uint8 0..255 or float in "
            "[0, 1]; cast it with x.astype(numpy.uint8) if the values are 0..255, or divide by 255"
        )
    else:
        raise DataError(f"{what} has dtype {arr.dtype} but images must be uint8 0..255 or float in [0, 1]")
    return Images(torch.from_numpy(np.ascontiguousarray(out)), image_shape)


def validate_images(x: np.ndarray | torch.Tensor, *, what: str) -> torch.Tensor:
    """Check images and convert them to the float32 ``(N, D)`` layout every model in pyro_vae takes.

    Accepted are ``uint8`` values 0..255 (divided by 255), ``bool`` values, and float values in ``[0, 1]``, shaped
    ``(N, H, W)``, ``(N, C, H, W)``, ``(N, H, W, C)`` (C = 1 or 3; see :func:`images_and_shape`) or ``(N, D)``.

    :param x: the images, a numpy array or torch tensor (on any device).
    :param str what: how to name ``x`` in error messages, e.g. ``"x"`` or a file name.
    :returns: a contiguous CPU float32 tensor of shape ``(N, D)`` with values in ``[0, 1]``, not sharing memory
        with ``x``; colour images are flattened channel-first, ``D = C·H·W``.
    :raises DataError: if ``x`` is empty, not shaped like images (or ambiguous in its channel axis), of another dtype
        (e.g. int64), contains NaN or
        infinite values, or has float values outside ``[0, 1]``.
    """
    return images_and_shape(x, what)[0]


def labels(y: Any, n: int, *, what: str, images: str) -> torch.Tensor:
    """Check integer labels ``(N,)`` that belong to ``n`` images named ``images``; return them as int64."""
    arr = _as_numpy(y)
    if arr.dtype.kind not in "iu":
        raise DataError(f"{what} has dtype {arr.dtype} but labels must be integers; cast it with y.astype(numpy.int64)")
    if arr.ndim != 1:
        raise DataError(f"{what} has shape {tuple(arr.shape)} but labels must be a vector (N,); flatten it")
    if len(arr) != n:
        raise DataError(
            f"{what} has {len(arr)} labels but {images} has {n} images; they must match one to one, "
            "check that they belong together"
        )
    return torch.from_numpy(arr.astype(np.int64))


def check_image_tensor(x: torch.Tensor, *, what: str) -> None:
    """Refuse a tensor that is not float images ``(N, D)``, ``N >= 1``, finite, with values in ``[0, 1]``.

    :param torch.Tensor x: the images, on any device.
    :param str what: how to name ``x`` in the message, e.g. ``"data.x_train"``.
    :raises DataError: naming what was found and what to do.
    """
    if x.ndim != 2 or x.shape[0] == 0 or not x.is_floating_point():
        raise DataError(
            f"{what} is a {x.dtype} tensor of shape {tuple(x.shape)} but images must be float (N, D), N >= 1; "
            "load data with pyro_vae.load_dataset, or pass it through pyro_vae.data.validate_images"
        )
    _check_float_values(_as_numpy(x), what)
