r"""The Gaussian likelihood ``Normal(decoder(z), σ).to_event(1)``, with σ fixed, learned or fitted per image.

===================  ==============================================================================================
spec                 σ
===================  ==============================================================================================
``gaussian``         fixed at :data:`DEFAULT_SCALE` = 0.1
``gaussian:0.05``    fixed at the number given
``gaussian:learned`` one learned σ per pixel, a ``(D,)`` parameter ``log_scale`` of the likelihood
``gaussian:shared``  one learned σ for all D pixels (probabilistic PCA, :mod:`pyro_vae.linear_gaussian`)
``gaussian:optimal`` the σ-VAE's closed-form σ* (Rybkin et al. 2021), fitted to each image, no parameter
===================  ==============================================================================================

The location is the decoder output itself (one raw number per pixel), so the likelihood serves real-valued data as
well as pixels in [0, 1]. Learned scales are :math:`\sigma = \sigma_{\min} + e^{\text{log\_scale}}`; the floor
:data:`MIN_SCALE` keeps the density bounded where a pixel never varies (the black border of Fashion-MNIST: with
:math:`\sigma \to 0` its log-density grows without bound).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn

from pyro_vae.config import check_float
from pyro_vae.errors import ConfigError, unknown_choice
from pyro_vae.likelihoods.base import Likelihood, register

#: Default fixed σ for pixels in [0, 1]. σ = 1 (the "MSE loss" convention) is wider than the whole data range, so
#: the reconstruction term weighs 1/σ² = 1 against the KL and the posterior collapses; σ = 0.1 is of the order of
#: the per-pixel error of a reconstruction that keeps a garment's shape, the regime the σ-VAE's fitted σ* reaches.
DEFAULT_SCALE = 0.1
#: Floor of a learned or fitted σ: the standard deviation 1 / (255 √12) ≈ 0.00113 of the uniform quantisation noise
#: of 8-bit data scaled to [0, 1]. A narrower Gaussian would be resolving detail the data do not have.
MIN_SCALE = 1.0 / (255.0 * math.sqrt(12.0))
#: What each ``mode`` means (the spec option word, or a number for ``fixed``).
MODES = ("fixed", "learned", "shared", "optimal")
_LOG_2PI = math.log(2.0 * math.pi)


class OptimalScaleNormal(dist.TorchDistribution):
    r"""A Gaussian over an image, ``event_shape (D,)``, whose shared σ is fitted to the observation it scores.

    For an observation x, :math:`\sigma^{*2}(x) = \max\big(\tfrac{1}{D}\sum_d (x_d - \mu_d)^2,\ \sigma_{\min}^2\big)`
    maximises :math:`\log \mathcal{N}(x; \mu, \sigma^2 I)`, and

    .. math:: \log p(x \mid z) = -\tfrac{1}{2}\Big(\sum_d (x_d - \mu_d)^2 / \sigma^{*2} + D \log(2\pi\sigma^{*2})\Big)

    which is :math:`-\tfrac{D}{2}(\log(2\pi\,\mathrm{MSE}) + 1)` above the floor. σ* is per image (and per particle),
    so an image's value does not depend on the rest of its batch nor on how evaluation chunks the data; Rybkin et
    al.'s code averages the MSE over the batch too. As σ* depends on x this is a profile likelihood, not a density in
    x (``normalized = False``), and it cannot be sampled.

    :param loc: μ, ``(..., D)``.
    :param float min_scale: σ_min.
    """

    arg_constraints = {"loc": constraints.real}
    support = constraints.independent(constraints.real, 1)

    def __init__(self, loc: torch.Tensor, min_scale: float = MIN_SCALE, validate_args=None):
        self.loc = loc
        self.min_scale = min_scale
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(OptimalScaleNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.min_scale = self.min_scale
        super(OptimalScaleNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    def scale(self, value: torch.Tensor) -> torch.Tensor:
        """σ*(x) for the observation ``value``, ``(...,)``."""
        return (value - self.loc).square().mean(-1).clamp(min=self.min_scale**2).sqrt()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        square = (value - self.loc).square()  # (..., D)
        variance = square.mean(-1).clamp(min=self.min_scale**2)  # (...,), σ*²
        return -0.5 * (square.sum(-1) / variance + square.shape[-1] * (_LOG_2PI + variance.log()))

    def sample(self, sample_shape=()):
        raise NotImplementedError(
            "gaussian:optimal fits σ to the image it scores, so it has no draws; sample means, or use gaussian:learned"
        )


@register
class GaussianLikelihood(Likelihood):
    """``Normal(decoder(z), σ).to_event(1)``, σ fixed, learned per pixel, learned and shared, or fitted (σ-VAE).

    See the module docstring for the specs and :data:`DEFAULT_SCALE` / :data:`MIN_SCALE` for the defaults' reasons.

    :param float scale: σ for ``fixed``, the initial σ for ``learned`` and ``shared`` (default 0.1); must exceed
        ``min_scale``. Ignored for ``optimal``.
    :param str mode: one of :data:`MODES`, default ``"fixed"``.
    :param float min_scale: σ_min of the learned or fitted σ (default :data:`MIN_SCALE`; 0 allowed).
    :param input_dim: D, to create the per-pixel scales at once; otherwise :meth:`bind` creates them.
    """

    name = "gaussian"

    def __init__(
        self,
        scale: float = DEFAULT_SCALE,
        mode: str = "fixed",
        *,
        min_scale: float = MIN_SCALE,
        input_dim: int | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"unknown gaussian mode {mode!r}; choose one of: {', '.join(MODES)}")
        check_float("the gaussian's σ_min", min_scale, low=0.0)
        if mode == "fixed":
            check_float("the gaussian's σ", scale, low=0.0, open_low=True)
        elif mode != "optimal":
            check_float(
                f"the gaussian's initial σ (above σ_min = {min_scale:.3g})", scale, low=min_scale, open_low=True
            )
        self.mode, self.init_scale, self.min_scale = mode, float(scale), float(min_scale)
        if mode == "shared":
            self.log_scale = nn.Parameter(torch.tensor(math.log(scale - min_scale)))
        if input_dim is not None:
            self.bind(input_dim)

    @classmethod
    def from_option(cls, option: str) -> GaussianLikelihood:
        """``learned``, ``shared`` or ``optimal`` choose the mode; a number is a fixed σ."""
        if option in ("learned", "shared", "optimal"):
            return cls(mode=option)
        try:
            scale = float(option)
        except ValueError:
            words = unknown_choice("option of likelihood 'gaussian'", option, MODES[1:])
            raise ConfigError(f"{words}; or give a fixed σ > 0, e.g. 'gaussian:0.1'") from None
        check_float(f"in likelihood 'gaussian:{option}', σ", scale, low=0.0, open_low=True)
        return cls(scale=scale)

    @property
    def spec(self) -> str:
        if self.mode == "fixed":
            return self.name if self.init_scale == DEFAULT_SCALE else f"{self.name}:{self.init_scale:g}"
        return f"{self.name}:{self.mode}"

    @property
    def normalized(self) -> bool:
        return self.mode != "optimal"

    def bind(self, input_dim: int) -> None:
        if self.mode != "learned":
            return
        if hasattr(self, "log_scale"):
            if self.log_scale.shape != (input_dim,):
                raise ConfigError(
                    f"this gaussian:learned likelihood has {self.log_scale.numel()} scales but the data have "
                    f"{input_dim} dimensions; build a new likelihood for these data"
                )
            return
        self.log_scale = nn.Parameter(torch.full((input_dim,), math.log(self.init_scale - self.min_scale)))

    @property
    def scale(self) -> torch.Tensor:
        """σ: a 0-dimensional tensor (``fixed``, ``shared``) or ``(D,)`` (``learned``)."""
        if self.mode == "optimal":
            raise ConfigError(
                "gaussian:optimal has no σ of its own: σ* is fitted to each image; see OptimalScaleNormal"
            )
        if self.mode == "fixed":
            return torch.tensor(self.init_scale)
        return self.log_scale.exp() + self.min_scale

    def forward(self, raw: torch.Tensor) -> dist.TorchDistribution:
        if self.mode == "optimal":
            return OptimalScaleNormal(raw, self.min_scale)  # batch raw.shape[:-1], event (D,)
        if self.mode == "fixed":
            scale = raw.new_full(raw.shape, self.init_scale)  # (..., D)
        else:
            # A contiguous scale: torch's log of a stride-0 (expanded) tensor is much slower than of a dense one.
            scale = self.scale.expand(raw.shape).contiguous()  # (..., D)
        return dist.Normal(raw, scale).to_event(1)  # batch raw.shape[:-1], event (D,)

    def mean(self, raw: torch.Tensor) -> torch.Tensor:
        return raw
