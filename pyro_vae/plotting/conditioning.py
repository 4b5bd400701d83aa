"""Which labels a figure conditions on, for the models that read them (:mod:`pyro_vae.labelled`).

A figure draws q(z | x) and p(x | z) for the VAE. The models with labels condition both on y:

* the **CVAE** encodes q(z | x, y) with the image's own label: the figures pass the test labels, and a figure
  without them is refused in one line;
* **M2** has a classifier q(y | x): without a label it encodes at the most probable class
  (:meth:`~pyro_vae.labelled.SSVAE.default_labels`), which is what ``encode(x)`` does, and decodes at that class.

The VAE ignores labels (they only colour its points).
"""

from __future__ import annotations

import torch

from pyro_vae.errors import ConfigError
from pyro_vae.labelled import class_count
from pyro_vae.model import VAE

__all__ = ["decode", "encode", "encoder_labels", "image_labels", "reads_labels"]


def reads_labels(vae: VAE) -> bool:
    """Whether ``vae`` is a model with labels (a CVAE or M2)."""
    return class_count(vae) is not None


def encoder_labels(vae: VAE, labels: torch.Tensor | None, what: str = "this figure") -> torch.Tensor | None:
    """The labels ``encode`` must be given: the images' own for the CVAE (refused in one line without them),
    ``None`` for M2 (its classifier's class) and the VAE."""
    if getattr(vae, "kind", "vae") != "cvae":
        return None
    if labels is None:
        raise ConfigError(f"the CVAE encodes q(z | x, y), and {what} has no labels for its images; pass labels=")
    return labels


def image_labels(vae: VAE, x: torch.Tensor, labels: torch.Tensor | None, what: str = "this figure"):
    """The class each image of ``x`` ``(B, D)`` is encoded and decoded at: ``None`` for the VAE; the given labels
    for the CVAE; the most probable class under q(y | x) for M2 (its given labels are only for colours)."""
    if not reads_labels(vae):
        return None
    given = encoder_labels(vae, labels, what)
    if given is None:
        return vae.default_labels(x)
    given = given.to(x.device)
    vae.check_labels(given, x.shape[0], what="labels")
    return given


def encode(vae: VAE, x: torch.Tensor, y: torch.Tensor | None):
    """q(z | x), or q(z | x, y) when ``y`` is given."""
    return vae.encode(x) if y is None else vae.encode(x, y)


def decode(vae: VAE, z: torch.Tensor, y: torch.Tensor | None):
    """p(x | z), or p(x | z, y) when ``y`` is given."""
    return vae.decode(z) if y is None else vae.decode(z, y)
