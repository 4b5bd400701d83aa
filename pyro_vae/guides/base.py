"""The guide-family contract.

A guide family turns the encoder's raw output into the variational distribution q(z | x). It is the only place
where the raw numbers get names and constraints (:meth:`GuideFamily.split`); the encoder's output width is
:attr:`GuideFamily.num_params`, so swapping the family never touches the model or the networks.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pyro.distributions import TorchDistribution
from torch import nn

from pyro_vae.config import check_int


class GuideFamily(nn.Module):
    """Base class of every amortised variational family.

    Subclasses set :attr:`name`, implement :attr:`num_params`, :meth:`split` and :meth:`forward`, and are added to
    the registry with :func:`pyro_vae.guides.register`. A family may own learnable global parameters (for instance
    a flow's networks): as an ``nn.Module`` inside the :class:`~pyro_vae.model.VAE` they reach the optimiser, the
    checkpoints and ``state_dict``.

    :param int latent_dim: dimension L of z.

    :cvar str name: registry name.
    :cvar spec_option: name of the keyword that a ``"name:K"`` spec sets (e.g. ``"rank"`` for ``low_rank:4``).
    """

    name: ClassVar[str]
    spec_option: ClassVar[str | None] = None

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = check_int("latent_dim", latent_dim, low=1)

    @property
    def num_params(self) -> int:
        """Width of the raw vector the encoder must emit per data point."""
        raise NotImplementedError

    def split(self, raw: torch.Tensor) -> Any:
        """Name and constrain the raw output ``(B, num_params)``; returns a named record of tensors."""
        raise NotImplementedError

    def forward(self, raw: torch.Tensor) -> TorchDistribution:
        """q(z | x) with ``batch_shape (B,)`` and ``event_shape (L,)``, reparameterised (``has_rsample``).

        :param raw: encoder output, ``(B, num_params)``.
        """
        raise NotImplementedError

    def _check_raw(self, raw: torch.Tensor) -> None:
        if raw.shape[-1] != self.num_params:
            raise ValueError(
                f"{self.name} expects raw encoder output of width {self.num_params} "
                f"(latent_dim={self.latent_dim}), got shape {tuple(raw.shape)}; build the encoder with "
                "family.num_params outputs"
            )

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, num_params={self.num_params}"
