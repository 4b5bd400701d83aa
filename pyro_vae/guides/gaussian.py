"""Gaussian guide families.

``mvn_diag`` is the seed family::

    loc, raw_scale = raw[..., :L], raw[..., L:]
    scale = softplus(raw_scale) + eps          # (B, L); eps keeps the scale positive where softplus underflows
    q = MultivariateNormal(loc, scale_tril=diag_embed(scale))

``softplus(-200)`` is exactly 0 in float32, which would make ``scale_tril`` singular and ``log_prob`` infinite; the
``eps`` floor (1e-5 by default) prevents it. Sampling is reparameterised: ``z = loc + scale_tril @ noise`` with
``noise ~ N(0, I)``, so gradients reach ``loc`` and the scale.
"""

from __future__ import annotations

from typing import NamedTuple

import pyro.distributions as dist
import torch
import torch.nn.functional as F

from pyro_vae.errors import ConfigError
from pyro_vae.guides.base import GuideFamily


class DiagonalParams(NamedTuple):
    """Mean and per-dimension standard deviation, each ``(B, L)``."""

    loc: torch.Tensor
    scale: torch.Tensor


class _DiagonalFamily(GuideFamily):
    """Shared split of the raw output into ``loc`` (first half) and ``softplus(second half) + eps``.

    :param int latent_dim: L.
    :param float eps: floor added to the softplus; must be > 0 (default 1e-5).
    """

    def __init__(self, latent_dim: int, eps: float = 1e-5):
        super().__init__(latent_dim)
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ConfigError(f"eps must be > 0 so the scale stays positive when softplus underflows, got {eps!r}")
        self.eps = float(eps)

    @property
    def num_params(self) -> int:
        return 2 * self.latent_dim

    def split(self, raw: torch.Tensor) -> DiagonalParams:
        self._check_raw(raw)
        loc, raw_scale = raw.split(self.latent_dim, dim=-1)  # (B, L), (B, L)
        return DiagonalParams(loc, F.softplus(raw_scale) + self.eps)


class MVNDiag(_DiagonalFamily):
    """The seed family: a ``MultivariateNormal`` whose ``scale_tril`` is ``diag(softplus(raw[L:]) + eps)``.

    :param int latent_dim: L; the encoder emits ``2 L`` numbers.
    :param float eps: scale floor (default 1e-5).
    """

    name = "mvn_diag"

    def forward(self, raw: torch.Tensor, context: torch.Tensor | None = None) -> dist.MultivariateNormal:
        loc, scale = self.split(raw)
        return dist.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale))  # batch (B,), event (L,)


class DiagNormal(_DiagonalFamily):
    """``Normal(loc, softplus(raw[L:]) + eps).to_event(1)``: the same distribution as ``mvn_diag``, without the
    L×L ``scale_tril`` (cheaper for large L).

    :param int latent_dim: L; the encoder emits ``2 L`` numbers.
    :param float eps: scale floor (default 1e-5).
    """

    name = "diag_normal"

    def forward(self, raw: torch.Tensor, context: torch.Tensor | None = None) -> dist.TorchDistribution:
        loc, scale = self.split(raw)
        return dist.Normal(loc, scale).to_event(1)  # batch (B,), event (L,)
