r"""``vamp:K``: the VampPrior of Tomczak & Welling (2018), the mixture of the encoder's posteriors at K learned
pseudo-inputs :math:`u_1, \dots, u_K` (each D values, the prior's own parameters):

.. math::

    p_\lambda(z) = \frac{1}{K} \sum_{k=1}^K q_\phi(z \mid u_k), \qquad
    \log p_\lambda(z) = \operatorname{logsumexp}_k \log q_\phi(z \mid u_k) - \log K.

The prior shares the encoder φ with the guide, so the ELBO's KL term pulls the aggregate posterior and the prior
together from both sides. Only ``q.log_prob`` is used: the guide family may be a flow without a closed-form mean,
as long as it scores any z (:data:`SCORES_ANY_Z`: the Gaussians, and the flows that invert, ``iaf`` in L
sequential passes). Planar, radial, NAF and Sylvester flows score only their own samples, and are refused with
one line at the first evaluation.

The pseudo-inputs are unconstrained: the paper clips them to [0, 1] for binary images, but the data this toolkit
takes include real-valued ones. :meth:`VampPrior.initialise` sets them to K distinct random training images.

Reference: J. M. Tomczak, M. Welling. VAE with a VampPrior. AISTATS 2018.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn

from pyro_vae.config import check_int
from pyro_vae.errors import ConfigError
from pyro_vae.priors.base import INIT_SEED, Prior, register

__all__ = ["SCORES_ANY_Z", "UniformMixture", "VampPrior"]

#: The guide families whose q(z | x) has a log-density at any z, which the VampPrior needs (a test checks the list
#: against every registered family).
SCORES_ANY_Z = ("diag_normal", "full_rank", "householder", "iaf", "low_rank", "mvn_diag", "spline")


class UniformMixture(dist.TorchDistribution):
    r"""The equal-weight mixture :math:`\frac{1}{K} \sum_k q_k(z)` of a distribution ``components`` with batch shape
    ``(K,)``, expanded to ``batch_shape``; event shape that of the components.

    ``log_prob(z)`` for z of shape ``(..., *batch_shape, L)`` (e.g. ``(B, L)``, or ``(P, B, L)`` with vectorised
    particles) evaluates every component at every z, with z expanded to ``(..., B, K, L)`` against the components'
    batch ``(K,)``, giving ``(..., B, K)``, and takes the log-sum-exp over the last axis. ``sample`` picks a component
    uniformly per draw and returns that component's draw (``rsample`` likewise, where the components have one): all
    K components are drawn and one is kept, which costs K draws per sample and works for any family.

    :param components: q with batch shape ``(K,)`` and event shape ``(L,)``.
    :param batch_shape: the mixture's batch shape, e.g. ``(B,)``.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, components: dist.TorchDistribution, batch_shape=(), validate_args: bool | None = None):
        if len(components.batch_shape) != 1 or len(components.event_shape) != 1:
            raise ValueError(
                f"components must have batch shape (K,) and event shape (L,), got {tuple(components.batch_shape)} "
                f"and {tuple(components.event_shape)}"
            )
        self.components = components
        self.num_components = components.batch_shape[0]
        super().__init__(torch.Size(batch_shape), components.event_shape, validate_args=validate_args)

    @property
    def has_rsample(self) -> bool:
        return self.components.has_rsample

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(UniformMixture, _instance)
        new.components, new.num_components = self.components, self.num_components
        super(UniformMixture, new).__init__(torch.Size(batch_shape), self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        # Expanded, not only broadcast: conditional flows expand their context (K, C) to the value's batch shape.
        every = value.unsqueeze(-2).expand(*value.shape[:-1], self.num_components, value.shape[-1])  # (..., B, K, L)
        log_q = self.components.log_prob(every)  # (..., B, K)
        log_p = torch.logsumexp(log_q, dim=-1) - math.log(self.num_components)  # (..., B)
        return log_p.expand(torch.broadcast_shapes(log_p.shape, self.batch_shape))

    def _draw(self, sample_shape: torch.Size, reparameterised: bool) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape  # (*S, B)
        every = self.components.rsample(shape) if reparameterised else self.components.sample(shape)  # (*S, B, K, L)
        pick = torch.randint(self.num_components, shape, device=every.device)  # (*S, B)
        index = pick[..., None, None].expand(*shape, 1, every.shape[-1])  # (*S, B, 1, L)
        return every.gather(-2, index).squeeze(-2)  # (*S, B, L)

    def sample(self, sample_shape=()) -> torch.Tensor:
        with torch.no_grad():
            return self._draw(sample_shape, reparameterised=False)

    def rsample(self, sample_shape=()) -> torch.Tensor:
        if not self.has_rsample:
            raise NotImplementedError("the components have no rsample")
        return self._draw(sample_shape, reparameterised=True)


def _check_scores_any_z(components: dist.TorchDistribution, like: torch.Tensor) -> None:
    """Refuse, in one line, a guide family whose q(z | x) scores only its own samples. It is checked here, in the
    model's body, because inside Pyro's log-density pass the error would come back wrapped in a ValueError."""
    probe = like.new_zeros(components.batch_shape + components.event_shape)  # (K, L): a z no component drew
    try:
        with torch.no_grad():
            components.log_prob(probe)
    except (NotImplementedError, KeyError) as err:  # Pyro's planar and radial steps raise KeyError
        raise ConfigError(
            f"the VampPrior needs q(z | x) at any z, but this guide family scores only its own samples; use one of "
            f"{', '.join(SCORES_ANY_Z)}"
        ) from err


@register
class VampPrior(Prior):
    """The VampPrior: :class:`UniformMixture` of ``encode(u_k)`` over K learned pseudo-inputs ``u``, ``(K, D)``.

    The VAE that owns the prior gives it its ``encode`` and D through :meth:`attach` (the pseudo-inputs are created
    there, uniform in [0, 1) from a private generator until :meth:`initialise` replaces them with training images).

    :param int latent_dim: L.
    :param int num_components: K, the number of pseudo-inputs (``vamp:K``). Default 50: every evaluation of
        the prior encodes all K pseudo-inputs and scores every z under all K, so the cost per step grows with K.
    """

    name = "vamp"
    spec_option = "num_components"

    def __init__(self, latent_dim: int, num_components: int = 50):
        super().__init__(latent_dim)
        self.num_components = check_int("num_components", num_components, low=1)
        self.pseudo_inputs: nn.Parameter | None = None  # (K, D), created by attach
        self._encode: Callable[[torch.Tensor], dist.TorchDistribution] | None = None
        self._scores_any_z = False  # checked once, at the first evaluation, by _check_scores_any_z

    def attach(self, encode: Callable[[torch.Tensor], dist.TorchDistribution], input_dim: int) -> None:
        self._encode = encode  # the owner's bound method: not a submodule, so its parameters stay the encoder's
        generator = torch.Generator().manual_seed(INIT_SEED)
        self.pseudo_inputs = nn.Parameter(torch.rand(self.num_components, input_dim, generator=generator))

    def initialise(self, x: torch.Tensor, generator: torch.Generator) -> None:
        """Set the pseudo-inputs to K distinct training images chosen by ``generator``.

        :param x: the training images ``(N, D)``.
        :raises ConfigError: when K > N, or when the images do not have D values.
        """
        u = self._attached()
        n, width = x.shape[0], x.shape[-1]
        if width != u.shape[1]:
            raise ConfigError(
                f"the VampPrior's pseudo-inputs have {u.shape[1]} values each but the training images have {width}; "
                "initialise it with the data the VAE was built for"
            )
        if self.num_components > n:
            raise ConfigError(
                f"vamp:{self.num_components} starts its {self.num_components} pseudo-inputs at distinct training "
                f"images but there are only {n}; use vamp:{n} or fewer, or more training images"
            )
        chosen = torch.randperm(n, generator=generator, device=generator.device)[: self.num_components]
        with torch.no_grad():
            u.copy_(x[chosen.to(x.device)].reshape(u.shape))

    def forward(self, batch_size: int, like: torch.Tensor) -> UniformMixture:
        u = self._attached()
        components = self._encode(u)  # q(z | u_k): batch (K,), event (L,)
        if not self._scores_any_z:
            _check_scores_any_z(components, u)
            self._scores_any_z = True
        return UniformMixture(components, [batch_size])  # batch (B,), event (L,)

    def _attached(self) -> nn.Parameter:
        if self.pseudo_inputs is None or self._encode is None:
            raise RuntimeError(
                "this VampPrior has no encoder yet: build it inside a VAE (VAE(..., prior='vamp:50')), which attaches "
                "its encoder"
            )
        return self.pseudo_inputs

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "pseudo_inputs")
        if saved is not None and self.pseudo_inputs is not None and saved.shape != self.pseudo_inputs.shape:
            raise ConfigError(
                f"the saved pseudo-inputs have shape {tuple(saved.shape)} but this VampPrior has "
                f"{tuple(self.pseudo_inputs.shape)} (vamp:{self.num_components} on {self.pseudo_inputs.shape[1]} "
                "values per image); load weights saved from the same prior and data shape"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, num_components={self.num_components}"
