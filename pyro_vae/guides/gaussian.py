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

import math
from typing import NamedTuple

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch.distributions import Distribution
from torch.distributions.utils import _standard_normal, lazy_property

from pyro_vae.errors import ConfigError
from pyro_vae.guides.base import GuideFamily


class DiagonalMultivariateNormal(dist.MultivariateNormal):
    """A :class:`~pyro.distributions.MultivariateNormal` whose ``scale_tril`` is ``diag(scale)``, computed without
    the L×L matrix.

    It is a ``MultivariateNormal`` (``isinstance`` holds, ``scale_tril``, ``covariance_matrix`` and torch's
    MVN–MVN KL work, building the matrix lazily) and gives the results of the general class: with a diagonal
    ``scale_tril`` the triangular solve in ``log_prob`` reduces to ``diff / scale`` and the batched matrix-vector
    product in ``rsample`` to ``scale * noise``, which is what this class computes directly::

        rsample:  z = loc + scale ⊙ ε,                 ε ~ N(0, I)            (the same ε stream as the parent)
        log_prob: −½ (L log 2π + Σ ((z − loc) / scale)²) − Σ log scale

    It saves the ``diag_embed``, the batched matmul and the triangular solve on every training step (measured in
    ``benchmarks/train_speed.py``).

    :param loc: mean, ``(..., L)``.
    :param scale: standard deviations, ``(..., L)``, positive.
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args: bool | None = None):
        if loc.dim() < 1:
            raise ValueError("loc must be at least one-dimensional")
        batch_shape = torch.broadcast_shapes(loc.shape[:-1], scale.shape[:-1])
        self.loc = loc.expand(batch_shape + loc.shape[-1:])
        self._scale = scale.expand(batch_shape + loc.shape[-1:])
        # Skip MultivariateNormal.__init__, which needs the matrix. Distribution.__init__ validates loc, but skips
        # the lazy scale_tril, so the diagonal is checked here (a diagonal matrix is a lower Cholesky factor iff
        # its diagonal is positive).
        Distribution.__init__(self, batch_shape, loc.shape[-1:], validate_args=validate_args)
        if self._validate_args and not bool((self._scale > 0).all()):
            raise ValueError(
                f"Expected parameter scale_tril of {type(self).__name__} to be a lower Cholesky factor, but its "
                f"diagonal has non-positive values: {self._scale[~(self._scale > 0)][:5].tolist()}"
            )

    @lazy_property
    def _unbroadcasted_scale_tril(self) -> torch.Tensor:
        return torch.diag_embed(self._scale)  # (..., L, L)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiagonalMultivariateNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new._scale = self._scale.expand(batch_shape + self.event_shape)
        Distribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def variance(self) -> torch.Tensor:
        return self._scale.square()

    def rsample(self, sample_shape: torch.Size | tuple = ()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        eps = _standard_normal(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self._scale * eps

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        mahalanobis = ((value - self.loc) / self._scale).square().sum(-1)
        half_log_det = self._scale.log().sum(-1)
        return -0.5 * (self._event_shape[0] * math.log(2 * math.pi) + mahalanobis) - half_log_det

    def entropy(self) -> torch.Tensor:
        half_log_det = self._scale.log().sum(-1)
        return 0.5 * self._event_shape[0] * (1.0 + math.log(2 * math.pi)) + half_log_det


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
        # MultivariateNormal(loc, scale_tril=diag_embed(scale)), without materialising the matrix.
        return DiagonalMultivariateNormal(loc, scale)  # batch (B,), event (L,)


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
