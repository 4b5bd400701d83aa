"""Class names: what the integer labels of a data set mean, so that figures can say "Sneaker" instead of "7".

The built-in sources have fixed names (:data:`FASHION_MNIST_CLASSES`, :data:`MNIST_CLASSES`); an ``.npz`` file may
carry its own in a ``classes`` array, checked by :func:`class_names_from_array`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pyro_vae.errors import DataError

__all__ = ["FASHION_MNIST_CLASSES", "MNIST_CLASSES", "class_names_from_array"]

#: Fashion-MNIST's labels 0..9 (Xiao et al. 2017), as its README names them.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: MNIST's labels 0..9 are the digits themselves.
MNIST_CLASSES = tuple(str(digit) for digit in range(10))

_HINT = "save the names with numpy.savez(path, x=..., y=..., classes=numpy.array(['cat', 'dog', ...]))"


def class_names_from_array(
    classes: Any, labels: tuple[torch.Tensor | None, ...], what: str = "classes"
) -> tuple[str, ...]:
    """Check an array of class names against the labels it names, and return it as a tuple of ``str``.

    Name ``k`` belongs to label ``k``, so there must be one name for every label value that occurs.

    :param classes: a 1-d array of ``str`` (numpy ``U``) or ``bytes`` (numpy ``S``, read as UTF-8).
    :param labels: the label tensors ``(N,)`` of the splits (``None`` where a split has none).
    :param str what: the array's name in messages.
    :raises DataError: one line if the names are not 1-d strings, are not unique, or are fewer than the labels need.
    """
    classes = np.asarray(classes)
    if classes.ndim != 1 or classes.dtype.kind not in "US" or classes.size == 0:
        raise DataError(
            f"{what} holds an array of shape {classes.shape} and dtype {classes.dtype}, but class names must be a "
            f"non-empty 1-d array of strings; {_HINT}"
        )
    try:
        names = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in classes.tolist())
    except UnicodeDecodeError as err:
        raise DataError(f"{what} holds bytes that are not UTF-8 text ({err.reason}); {_HINT}") from None
    if len(set(names)) != len(names):
        raise DataError(f"{what} names a class twice ({list(names)}); give each label its own name")
    present = [y for y in labels if y is not None and y.numel()]
    if not present:
        raise DataError(f"the data have {what} but no labels y for them to name; add y (and y_test) or drop {what}")
    needed = 1 + max(int(y.max()) for y in present)
    if len(names) < needed:
        raise DataError(
            f"{what} has {len(names)} names but the labels go up to {needed - 1}; give one name per label "
            f"0..{needed - 1}"
        )
    return names
