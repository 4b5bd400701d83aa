r"""The Beta likelihood for grey levels in [0, 1]: two decoder outputs per pixel, the concentrations α and β.

Beta's density is defined on the open interval (0, 1) and is 0 or infinite at the ends, where 8-bit data have many
pixels (the black border of Fashion-MNIST). Observations are therefore clamped to [ε, 1 − ε] before they are scored;
ε is the likelihood's :attr:`~pyro_vae.likelihoods.Likelihood.clamp` and is recorded in every evaluation protocol,
since it changes the numbers.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints

from pyro_vae.config import check_float
from pyro_vae.errors import ConfigError
from pyro_vae.likelihoods.base import Likelihood, register, split_params

#: Default clamp ε. Below half the 8-bit grid step (1/510) it moves only the values 0 and 1, and it stays inside
#: their dequantisation bins [0, 1/256) and [255/256, 1], so the bits/dim of a Beta on 8-bit data keep their meaning.
DEFAULT_EPS = 1e-3
#: Floor of α and β: softplus alone reaches 0 only in the limit, where lgamma overflows.
MIN_CONCENTRATION = 1e-3


class ClampedBeta(dist.Beta):
    """``Beta(α, β)`` that scores ``clamp(x, ε, 1 − ε)``: its support is the closed interval [0, 1].

    :param float eps: ε in (0, 0.5).
    """

    support = constraints.unit_interval

    def __init__(self, concentration1, concentration0, eps: float = DEFAULT_EPS, validate_args=None):
        self.eps = eps
        super().__init__(concentration1, concentration0, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ClampedBeta, _instance)
        new.eps = self.eps
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return super().log_prob(value.clamp(self.eps, 1.0 - self.eps))


@register
class BetaLikelihood(Likelihood):
    r"""``Beta(α, β).to_event(1)`` on observations clamped to [ε, 1 − ε], for grey levels in [0, 1].

    The decoder gives two raw numbers per pixel, param-major (all D for α, then all D for β);
    :math:`\alpha = \mathrm{softplus}(r_\alpha) + c_{\min}`, :math:`\beta = \mathrm{softplus}(r_\beta) + c_{\min}`
    with :math:`c_{\min}` = :data:`MIN_CONCENTRATION`. The mean image is :math:`\alpha / (\alpha + \beta)`.

    :param float eps: the clamp ε in (0, 0.5), default :data:`DEFAULT_EPS`; spec ``beta:0.01``.
    """

    name = "beta"
    params_per_dim = 2

    def __init__(self, eps: float = DEFAULT_EPS):
        super().__init__()
        check_float("the beta likelihood's clamp ε", eps, low=0.0, high=0.5, open_low=True, open_high=True)
        self.clamp = float(eps)

    @classmethod
    def from_option(cls, option: str) -> BetaLikelihood:
        """``beta:ε``: the clamp ε."""
        try:
            eps = float(option)
        except ValueError:
            raise ConfigError(
                f"likelihood 'beta:{option}': the option is the clamp ε in (0, 0.5), e.g. 'beta:0.001'"
            ) from None
        check_float(
            f"in likelihood 'beta:{option}', the clamp ε", eps, low=0.0, high=0.5, open_low=True, open_high=True
        )
        return cls(eps)

    @property
    def spec(self) -> str:
        return self.name if self.clamp == DEFAULT_EPS else f"{self.name}:{self.clamp:g}"

    def concentrations(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(α, β)``, each ``(..., D)``, from ``raw (..., 2D)``."""
        raw_a, raw_b = split_params(raw, 2)
        return F.softplus(raw_a) + MIN_CONCENTRATION, F.softplus(raw_b) + MIN_CONCENTRATION

    def forward(self, raw: torch.Tensor) -> dist.TorchDistribution:
        alpha, beta = self.concentrations(raw)
        return ClampedBeta(alpha, beta, self.clamp).to_event(1)  # batch raw.shape[:-1], event (D,)

    def mean(self, raw: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.concentrations(raw)
        return alpha / (alpha + beta)
