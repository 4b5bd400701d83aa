r"""The discretised logistic likelihood for 8-bit images (Kingma et al. 2016; Salimans et al. 2017, PixelCNN++).

A pixel :math:`x = k / 255`, :math:`k \in \{0, \dots, 255\}`, has the probability that a logistic variable
:math:`y \sim \mathrm{Logistic}(\mu, s)` rounds to it, with the two edge bins open to ±∞:

.. math::

    P(k) = \begin{cases}
        \sigma(a_k) & k = 0 \\
        \sigma(a_k) - \sigma(b_k) & 0 < k < 255 \\
        1 - \sigma(b_k) = \sigma(-b_k) & k = 255
    \end{cases}, \qquad a_k = \frac{x + h - \mu}{s},\ b_k = \frac{x - h - \mu}{s},\ h = \frac{1}{2 \cdot 255},

so the 256 probabilities sum to 1. This is the single logistic per pixel, not the mixture of PixelCNN++.

Numerics: ``σ(a) − σ(b)`` cancels catastrophically in the tails (both near 0 or both near 1), where PixelCNN++
falls back to the midpoint density times the bin width. Here the difference is factorised exactly in log space,

.. math:: \log(\sigma(a) - \sigma(b)) = \log\sigma(a) + \log\sigma(-b) + \log\big(1 - e^{-(a - b)}\big),

(from :math:`\sigma(a) - \sigma(b) = \sigma(a)\,\sigma(-b)\,(1 - e^{b - a})`), with :math:`a - b = 1 / (255 s) > 0`,
every term finite and computed by stable primitives (``logsigmoid``; ``log(-expm1(-d))`` or ``log1p(-exp(-d))``
as Mächler 2012 advises). No approximation is needed at any (μ, s), and the gradients stay finite.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints

from pyro_vae.likelihoods.base import Likelihood, register, split_params

#: Pixel levels of 8-bit data.
NUM_BINS = 256
#: Floor of the logistic scale s (data in [0, 1], grid step 1/255 ≈ 0.0039): about PixelCNN++'s floor e⁻⁷ on its
#: [−1, 1] scale; at s = 1e-4 the central bin already holds all but 1e-17 of the mass.
MIN_SCALE = 1e-4
_LOG_HALF = math.log(0.5)
# Values within this distance (in units of the grid step) of a grid point count as on the grid: float32 k/255 is
# off by at most about 255 · 2⁻²⁴ ≈ 1.5e-5 steps.
_GRID_TOLERANCE = 1e-3


class _Grid(constraints.Constraint):
    """The values k / (n − 1), k = 0..n−1."""

    is_discrete = True
    event_dim = 0

    def __init__(self, num_bins: int):
        self.num_bins = num_bins
        super().__init__()

    def check(self, value: torch.Tensor) -> torch.Tensor:
        steps = value * (self.num_bins - 1)
        return (value >= 0) & (value <= 1) & ((steps - steps.round()).abs() <= _GRID_TOLERANCE)


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(−d))`` for d > 0, accurate for small and large d (Mächler 2012); both branches see clamped
    inputs so the one not taken has a finite gradient."""
    small = d.clamp(max=math.log(2.0))
    large = d.clamp(min=math.log(2.0))
    return torch.where(d < math.log(2.0), torch.log(-torch.expm1(-small)), torch.log1p(-torch.exp(-large)))


class DiscretizedLogistic(dist.TorchDistribution):
    """The per-value discretised logistic over the grid k / 255 with open edge bins (see the module docstring).

    :param loc: μ, any shape.
    :param scale: s > 0, broadcastable with ``loc``.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = _Grid(NUM_BINS)
    has_rsample = False

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogistic, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc, new.scale = self.loc.expand(batch_shape), self.scale.expand(batch_shape)
        super(DiscretizedLogistic, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        last = NUM_BINS - 1
        k = (value * last).round()  # bin index; snapping to the grid removes float32 noise of k/255
        half = 0.5 / last
        upper = (k / last + half - self.loc) / self.scale  # a_k
        lower = (k / last - half - self.loc) / self.scale  # b_k
        width = (1.0 / last) / self.scale  # a_k − b_k > 0
        zero = upper.new_zeros(())
        return (
            torch.where(k < last, F.logsigmoid(upper), zero)
            + torch.where(k > 0, F.logsigmoid(-lower), zero)
            + torch.where((k > 0) & (k < last), _log1mexp(width), zero)
        )

    def sample(self, sample_shape=()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            tiny = torch.finfo(self.loc.dtype).tiny
            u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device).clamp(tiny, 1.0 - 1e-7)
            y = self.loc + self.scale * (u.log() - (-u).log1p())  # Logistic(μ, s) by inverse CDF
            return (y * (NUM_BINS - 1)).round().clamp(0, NUM_BINS - 1) / (NUM_BINS - 1)

    @property
    def mean(self) -> torch.Tensor:
        r""":math:`\mathbb{E}[x] = \frac{1}{255} \sum_{k=0}^{254} P(x > k/255)
        = \frac{1}{255} \sum_{k=0}^{254} \sigma\big((\mu - e_k) / s\big)`, :math:`e_k = (k + ½) / 255`, summed in
        blocks of edges to bound memory."""
        last = NUM_BINS - 1
        edges = (torch.arange(last, dtype=self.loc.dtype, device=self.loc.device) + 0.5) / last  # (255,)
        total = torch.zeros_like(self.loc)
        for block in edges.split(32):
            total = total + torch.sigmoid((self.loc.unsqueeze(-1) - block) / self.scale.unsqueeze(-1)).sum(-1)
        return total / last


@register
class DiscretizedLogisticLikelihood(Likelihood):
    r"""``DiscretizedLogistic(μ, s).to_event(1)`` for 8-bit images: two decoder outputs per pixel, param-major
    (all D locations, then all D raw scales); :math:`\mu` is the raw output and
    :math:`s = \mathrm{softplus}(r_s) + s_{\min}` (:data:`MIN_SCALE`). Data must lie on the grid k/255
    (``support = "8bit"``); use it with ``--binarize none``.
    """

    name = "discretized_logistic"
    params_per_dim = 2
    support = "8bit"
    discrete = True

    def params(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ, s)``, each ``(..., D)``, from ``raw (..., 2D)``."""
        loc, raw_scale = split_params(raw, 2)
        return loc, F.softplus(raw_scale) + MIN_SCALE

    def forward(self, raw: torch.Tensor) -> dist.TorchDistribution:
        return DiscretizedLogistic(*self.params(raw)).to_event(1)  # batch raw.shape[:-1], event (D,)

    def mean(self, raw: torch.Tensor) -> torch.Tensor:
        return DiscretizedLogistic(*self.params(raw)).mean
