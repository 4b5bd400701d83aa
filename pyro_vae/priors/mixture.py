r"""``mog:K``: a learned mixture of K diagonal Gaussians,

.. math::

    p(z) = \sum_{k=1}^K \pi_k \, \mathcal{N}(z;\, \mu_k, \operatorname{diag} \sigma_k^2), \qquad
    \pi = \operatorname{softmax}(\text{logits}), \quad \sigma_k = \operatorname{softplus}(\rho_k) + \epsilon,

as TFP's and Pythae's mixture priors. Built with :class:`pyro.distributions.MixtureSameFamily`, whose ``log_prob``
is the log-sum-exp over components; it has no closed-form KL against any guide, so it trains with ``trace`` or
``iwae`` objectives (Monte Carlo KL), not ``meanfield``.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pyro_vae.config import check_int
from pyro_vae.priors.base import INIT_SEED, Prior, register

__all__ = ["MixturePrior"]

#: Floor on every component scale: softplus(ρ) underflows to 0 in float32 for ρ below about -100.
SCALE_EPS = 1e-5
_UNIT_SCALE = math.log(math.expm1(1.0 - SCALE_EPS))  # ρ with softplus(ρ) + ε = 1


@register
class MixturePrior(Prior):
    r"""A mixture of K diagonal Gaussians with learned means, scales and weights.

    Initialisation: means :math:`\mu_k \sim \mathcal{N}(0, I)` (spread over the region a standard normal prior
    covers, so the components start apart), unit scales and equal weights. At construction the means come from a
    private generator seeded with :data:`~pyro_vae.priors.base.INIT_SEED` (the global RNG is untouched);
    :meth:`initialise` re-draws them from the run's generator.

    :param int latent_dim: L.
    :param int num_components: K (``mog:K``). Default 10: one per class of the ten-class image sets this toolkit
        ships, a starting point rather than a tuned value.

    Parameters: ``loc`` ``(K, L)``, ``raw_scale`` ``(K, L)`` (ρ above), ``logits`` ``(K,)``.
    """

    name = "mog"
    spec_option = "num_components"

    def __init__(self, latent_dim: int, num_components: int = 10):
        super().__init__(latent_dim)
        self.num_components = check_int("num_components", num_components, low=1)
        K, L = self.num_components, latent_dim
        self.loc = nn.Parameter(torch.randn(K, L, generator=torch.Generator().manual_seed(INIT_SEED)))  # (K, L)
        self.raw_scale = nn.Parameter(torch.full((K, L), _UNIT_SCALE))  # (K, L)
        self.logits = nn.Parameter(torch.zeros(K))  # (K,)

    @property
    def scale(self) -> torch.Tensor:
        """Component scales σ, ``(K, L)``."""
        return F.softplus(self.raw_scale) + SCALE_EPS

    def initialise(self, x: torch.Tensor, generator: torch.Generator) -> None:
        """Re-draw the means from ``generator`` (so that runs with different seeds start from different mixtures);
        the data are not used."""
        fresh = torch.randn(self.loc.shape, generator=generator, device=generator.device)
        with torch.no_grad():
            self.loc.copy_(fresh)

    def forward(self, batch_size: int, like: torch.Tensor) -> dist.TorchDistribution:
        components = dist.Normal(self.loc, self.scale).to_event(1)  # batch (K,), event (L,)
        mixture = dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)
        return mixture.expand([batch_size])  # batch (B,), event (L,)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, num_components={self.num_components}"
