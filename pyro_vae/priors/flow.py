r"""``flow:K``: a normalising flow of K masked autoregressive steps on N(0, I) (MAF; Papamakarios et al. 2017),
built from Pyro's transforms as in Pyro's normalising-flow tutorials:

.. math::

    z = g_K^{-1} \circ \dots \circ g_1^{-1}(\varepsilon), \quad \varepsilon \sim \mathcal{N}(0, I), \qquad
    \log p(z) = \log \mathcal{N}(u;\, 0, I) + \sum_{k=1}^K \log \left| \det \frac{\partial g_k}{\partial u_{k}}
    \right|, \quad u_K = z,\; u_{k-1} = g_k(u_k),\; u = u_0,

with each :math:`g_k` a :class:`~pyro.distributions.transforms.AffineAutoregressive` step
:math:`g(u)_i = \mu_i(u_{<i}) + \sigma_i(u_{<i})\, u_i` (its own random variable order).

**Which direction is cheap.** An affine autoregressive step computes g(u) in one pass of its masked network, and
g⁻¹ in L sequential passes. The prior is evaluated at the guide's z on every training step, so the distribution is
built from the *inverses* ``g_k.inv``: ``log_prob`` runs each g_k forwards (one pass per step), and only ``sample``
(figures, ``pyro-vae sample``) pays the L sequential passes. This is Pyro's IAF used the other way round, i.e. a MAF.

The steps are an :class:`torch.nn.ModuleList` child of the prior, so their weights (and the variable orders, which
are buffers) are the model's parameters and go into checkpoints.
"""

from __future__ import annotations

import warnings

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import affine_autoregressive
from torch import nn

from pyro_vae.config import check_int
from pyro_vae.priors.base import INIT_SEED, Prior, StandardNormal, private_rng, register, seed_from

__all__ = ["FlowPrior"]


@register
class FlowPrior(Prior):
    """p(z) as K affine autoregressive steps on N(0, I), scored in one network pass per step.

    :param int latent_dim: L.
    :param int num_flows: K (``flow:K``). Default 4: enough to bend a Gaussian visibly, at K network
        passes per evaluation.
    :param hidden_dims: hidden widths of each step's masked network (default Pyro's ``[3 L + 1]``).
    """

    name = "flow"
    spec_option = "num_flows"

    def __init__(self, latent_dim: int, num_flows: int = 4, hidden_dims: list[int] | None = None):
        super().__init__(latent_dim)
        self.num_flows = check_int("num_flows", num_flows, low=1)
        self.hidden_dims = None if hidden_dims is None else list(hidden_dims)
        self.steps = self._build(INIT_SEED)

    def _build(self, seed: int) -> nn.ModuleList:
        """K fresh steps with weights and variable orders drawn from ``seed`` (the global RNG is untouched)."""
        with private_rng(seed), warnings.catch_warnings():
            # With L = 1 each step is a learned affine map, which is what a one-dimensional flow should be; Pyro
            # warns that an affine transformation would do.
            warnings.filterwarnings("ignore", message=".*input_dim = 1", category=UserWarning)
            return nn.ModuleList(
                affine_autoregressive(self.latent_dim, self.hidden_dims) for _ in range(self.num_flows)
            )

    def initialise(self, x: torch.Tensor, generator: torch.Generator) -> None:
        """Re-draw the steps' weights and orders from ``generator`` (the data are not used)."""
        self.steps.load_state_dict(self._build(seed_from(generator)).state_dict())

    def forward(self, batch_size: int, like: torch.Tensor) -> dist.TorchDistribution:
        base = StandardNormal(like).expand([batch_size, self.latent_dim]).to_event(1)  # batch (B,), event (L,)
        return dist.TransformedDistribution(base, [step.inv for step in self.steps])

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, num_flows={self.num_flows}"
