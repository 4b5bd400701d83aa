"""Image and label validation: the one place where pyro_vae decides what counts as usable images.

:func:`validate_images` checks arrays as they are loaded and converts them to float32 ``(N, D)`` tensors in
``[0, 1]``; :func:`check_image_tensor` checks such a tensor when it arrives by another road (a
:class:`~pyro_vae.data.Dataset` built by hand), before one NaN pixel turns every weight into NaN in a single step.
Every problem is a :class:`~pyro_vae.errors.DataError` that says what was found and what to do.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pyro_vae.errors import DataError

__all__ = ["check_image_tensor", "images_and_shape", "labels", "validate_images"]

#: Channel counts that, in the last axis of a 4-d array, mark images stored channels-last ``(N, H, W, C)``.
_CHANNELS_LAST = (1, 3, 4)


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            # numpy has no bfloat16; float32 holds every bfloat16 value exactly.
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _check_shape(x: np.ndarray, what: str) -> tuple[int, ...] | None:
    """Return the per-image shape to remember, or refuse shapes that are not images."""
    shape = tuple(x.shape)
    expected = "(N, H, W), (N, 1, H, W) or flat (N, D)"
    if x.ndim not in (2, 3, 4):
        raise DataError(f"{what} has shape {shape} but images must be {expected}; reshape it")
    if x.ndim == 4 and shape[1] != 1 and shape[-1] in _CHANNELS_LAST and shape[-1] < min(shape[1:3]):
        # (N, 28, 28, 1) is one grey channel stored last, not 28 channels.
        fix = "drop the channel axis with x[..., 0]" if shape[-1] == 1 else "convert them to greyscale (N, H, W)"
        raise DataError(
            f"{what} has shape {shape}, i.e. channels-last (N, H, W, C) images with {shape[-1]} channel(s), but "
            f"images must be {expected}; {fix}"
        )
    if x.ndim == 4 and shape[1] != 1:
        raise DataError(
            f"{what} has shape {shape}, i.e. {shape[1]} channels, but images must be {expected}; "
            "convert them to greyscale or flatten them to (N, D)"
        )
    if shape[0] == 0:
        raise DataError(f"{what} is empty (shape {shape}); it needs at least one image")
    if 0 in shape[1:]:
        raise DataError(f"{what} has shape {shape}, i.e. images without pixels; check how it was made")
    if x.ndim == 2:
        return None
    return shape[-2:]


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


def images_and_shape(x: Any, what: str) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """:func:`validate_images`, and the per-image shape ``(H, W)`` to remember (``None`` for flat input)."""
    arr = _as_numpy(x)
    image_shape = _check_shape(arr, what)
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
    return torch.from_numpy(np.ascontiguousarray(out)), image_shape


def validate_images(x: np.ndarray | torch.Tensor, *, what: str) -> torch.Tensor:
    """Check images and convert them to the float32 ``(N, D)`` layout every model in pyro_vae takes.

    Accepted are ``uint8`` values 0..255 (divided by 255), ``bool`` values, and float values in ``[0, 1]``, shaped
    ``(N, H, W)``, ``(N, 1, H, W)`` or ``(N, D)``.

    :param x: the images, a numpy array or torch tensor (on any device).
    :param str what: how to name ``x`` in error messages, e.g. ``"x"`` or a file name.
    :returns: a contiguous CPU float32 tensor of shape ``(N, D)`` with values in ``[0, 1]``, not sharing memory
        with ``x``.
    :raises DataError: if ``x`` is empty, not shaped like images, of another dtype (e.g. int64), contains NaN or
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
