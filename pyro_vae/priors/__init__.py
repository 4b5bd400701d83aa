"""Priors p(z): a registry shaped like the guide families'.

``make_prior("standard", latent_dim=16)`` builds a prior by name; a ``"name:K"`` spec sets the prior's size option.
A prior is an :class:`torch.nn.Module`: its parameters are the model's parameters, so the optimiser, checkpoints and
resume see them.

==============  ===================================================================================================
spec            p(z)
==============  ===================================================================================================
``standard``    N(0, I), the default (:class:`StandardPrior`; closed-form KL against Gaussian guides)
``mog:K``       a learned mixture of K diagonal Gaussians (:class:`MixturePrior`, K = 10 by default)
``vamp:K``      the VampPrior, the mixture of the encoder's q(z | u_k) at K learned pseudo-inputs (:class:`VampPrior`,
                K = 50 by default)
``flow:K``      K masked affine autoregressive steps on N(0, I) (:class:`FlowPrior`, K = 4 by default)
==============  ===================================================================================================

Only ``standard`` has a closed-form KL, so the learned priors train with ``trace`` or ``iwae`` objectives (the rule
lives in :class:`pyro_vae.config.RunConfig`). New priors register with :func:`register`::

    @register
    class MyPrior(Prior):
        name = "my_prior"
        def forward(self, batch_size, like):
            ...  # a distribution with batch_shape (batch_size,) and event_shape (L,)
"""

from pyro_vae.priors.base import (
    INIT_SEED,
    Prior,
    StandardNormal,
    StandardPrior,
    make_prior,
    prior_names,
    private_rng,
    register,
    seed_from,
)
from pyro_vae.priors.flow import FlowPrior
from pyro_vae.priors.mixture import MixturePrior
from pyro_vae.priors.vamp import UniformMixture, VampPrior

__all__ = [
    "INIT_SEED",
    "FlowPrior",
    "MixturePrior",
    "Prior",
    "StandardNormal",
    "StandardPrior",
    "UniformMixture",
    "VampPrior",
    "make_prior",
    "prior_names",
    "private_rng",
    "register",
    "seed_from",
]
