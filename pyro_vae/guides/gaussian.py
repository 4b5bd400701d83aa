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

from pyro_vae.config import check_float, check_int
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
        if loc.shape == scale.shape:  # the families' case: no expand views (and no autograd nodes for them)
            batch_shape = loc.shape[:-1]
            self.loc, self._scale = loc, scale
        else:
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
        self.eps = _check_eps(eps)

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

    def forward(self, raw: torch.Tensor) -> dist.MultivariateNormal:
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

    def forward(self, raw: torch.Tensor) -> dist.TorchDistribution:
        loc, scale = self.split(raw)
        return dist.Normal(loc, scale).to_event(1)  # batch (B,), event (L,)


# ----------------------------------------------------------------------------------------------------------------
# Correlated Gaussians: full_rank and low_rank. Both keep the seed's layout for their first 2 L numbers (loc, then
# the raw scale through softplus + eps), so a family whose extra numbers are zero is exactly mvn_diag.
def _check_eps(eps) -> float:
    return float(check_float("eps (the softplus floor that keeps the scale positive)", eps, low=0, open_low=True))


class FullRankParams(NamedTuple):
    """Mean ``(B, L)`` and lower-triangular Cholesky factor of the covariance ``(B, L, L)``."""

    loc: torch.Tensor
    scale_tril: torch.Tensor


class FullRank(GuideFamily):
    r"""A full-covariance Gaussian, parameterised by its Cholesky factor.

    The encoder emits :math:`L + L(L+1)/2` numbers per data point::

        raw = [ loc (L) | raw_diag (L) | strictly-lower entries A (L(L-1)/2, row-major: (1,0), (2,0), (2,1), ...) ]
        s = softplus(raw_diag) + eps                                                    # (B, L)
        scale_tril = diag(s) @ (I + c · strictly_lower(A))                              # (B, L, L)
        q = MultivariateNormal(loc, scale_tril=scale_tril)

    so that :math:`\Sigma = L L^\top` with :math:`L_{ii} = s_i > 0` and :math:`L_{ij} = c\, s_i A_{ij}`. Every
    covariance matrix has exactly one such factor (:math:`A_{ij} = L_{ij} / (c L_{ii})`), and the family never forms
    a covariance to take its Cholesky decomposition (which costs :math:`O(L^3)` and fails when rounding makes the
    matrix indefinite). ``rsample`` is ``loc + scale_tril @ noise`` and ``log_prob`` one triangular solve. With A at
    zero this is ``mvn_diag``.

    Why the off-diagonal entries are in units of their row's scale (as ``low_rank``'s factor is): the triangular
    solve in ``log_prob`` amplifies rounding errors by the ratios :math:`|L_{ij}| / L_{ii}`, here :math:`c |A_{ij}|`,
    whatever the scales. With absolute entries (:math:`L_{ij} = c A_{ij}`), a dimension whose scale the encoder
    drives to the floor ``eps`` while its row keeps off-diagonal entries of order 0.1 makes those ratios 1e4 and
    more: in a full Fashion-MNIST run (L = 16, c = 1) condition numbers reached 1e22 after 900 steps and
    ``log_prob`` of the family's own samples became ``-inf``, which stopped training.

    Why :math:`c = 1/\sqrt{L}` by default: Adam moves every raw output of the encoder at about the same rate, and row
    i sums the noise of its i - 1 off-diagonal entries; with :math:`c = 1/\sqrt{L}` their contribution to a row's
    variance stays comparable to the diagonal's whatever L, the reason initialisations scale by
    :math:`1/\sqrt{\text{fan-in}}`. On the embedded Fashion-MNIST subset (L = 16, seed network, 5 epochs, one seed,
    same initial weights), absolute entries gave a test ELBO of -306.5 with c = 1, -289.2 with 0.5, -282.7 with
    0.25 = 1/√L, -283.8 with 0.1 and -287.5 with 0.01; this parametrisation -283.1 with 1/√L; ``mvn_diag`` -285.4.

    Numerical range: the contract tests check that raw values of ±50 and ±200 give a valid distribution whose own
    samples have a finite ``log_prob`` at small L. With every raw number at such a value, though, the off-diagonal
    ratios are 50 c or 200 c and the inverse of :math:`I + cA` has entries up to :math:`(1 + 200c)^{L-1}`: the
    float32 rounding of a sample then lies far off the distribution's thin directions, and at L = 16 ``log_prob``
    is astronomically negative (-1e17 to -1e35) or, at -200, ``-inf``. That is a property of the covariance such raw
    values denote, not of the arithmetic.

    :param int latent_dim: L.
    :param float eps: floor added to the softplus of the diagonal; must be > 0 (default 1e-5).
    :param off_diagonal_scale: c > 0 (default :math:`1/\sqrt{L}`).
    """

    name = "full_rank"

    def __init__(self, latent_dim: int, eps: float = 1e-5, off_diagonal_scale: float | None = None):
        super().__init__(latent_dim)
        self.eps = _check_eps(eps)
        c = latent_dim**-0.5 if off_diagonal_scale is None else off_diagonal_scale
        self.off_diagonal_scale = float(check_float("off_diagonal_scale", c, low=0, open_low=True))
        rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1)
        # positions of the strictly-lower entries in a row-major flattened (L, L) matrix
        self.register_buffer("_strict_lower", rows * latent_dim + cols, persistent=False)

    @property
    def num_params(self) -> int:
        L = self.latent_dim
        return L + L * (L + 1) // 2

    def split(self, raw: torch.Tensor) -> FullRankParams:
        self._check_raw(raw)
        L = self.latent_dim
        loc, raw_diag, off = raw[..., :L], raw[..., L : 2 * L], raw[..., 2 * L :]  # (B, L), (B, L), (B, L(L-1)/2)
        scale = F.softplus(raw_diag) + self.eps  # (B, L)
        flat = raw.new_zeros(raw.shape[:-1] + (L * L,)).index_copy(
            -1, self._strict_lower, self.off_diagonal_scale * off
        )
        unit = flat.unflatten(-1, (L, L)) + torch.eye(L, dtype=raw.dtype, device=raw.device)  # (B, L, L), unit diagonal
        return FullRankParams(loc, scale.unsqueeze(-1) * unit)  # row i scaled by s_i

    def forward(self, raw: torch.Tensor) -> dist.MultivariateNormal:
        loc, scale_tril = self.split(raw)
        return dist.MultivariateNormal(loc, scale_tril=scale_tril)  # batch (B,), event (L,)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, off_diagonal_scale={self.off_diagonal_scale:.4g}"


class LowRankParams(NamedTuple):
    """Mean ``(B, L)``, covariance factor ``(B, L, r)`` and diagonal variances ``(B, L)``:
    :math:`\\Sigma = W W^\\top + \\operatorname{diag}(d)`."""

    loc: torch.Tensor
    cov_factor: torch.Tensor
    cov_diag: torch.Tensor


class LowRank(GuideFamily):
    r"""A Gaussian whose covariance is diagonal plus rank r.

    The encoder emits :math:`2L + L r` numbers per data point::

        raw = [ loc (L) | raw_scale (L) | V (L·r, row-major L×r) ]
        s = softplus(raw_scale) + eps                                   # (B, L)
        q = LowRankMultivariateNormal(loc, cov_factor=s[..., None] * V, cov_diag=s**2)

    i.e. :math:`\Sigma = S (I + V V^\top) S` with :math:`S = \operatorname{diag}(s)`. This reaches every
    "diagonal plus rank r" covariance :math:`D + W W^\top` (take :math:`s = \sqrt{D}`, :math:`V = S^{-1} W`), but the
    factor is measured in units of each dimension's own scale. Why: ``LowRankMultivariateNormal`` scores a point
    through the Cholesky factor of the capacitance :math:`I + W^\top D^{-1} W`, which here is :math:`I + V^\top V`,
    independent of the scale floor. With an absolute factor, raw outputs of -200 (scale at the floor 1e-5, factor
    entries 200) give a capacitance near :math:`10^{15}` whose float32 Cholesky fails. With zero V this is
    ``mvn_diag``. Sampling costs :math:`O(L r)` per point and ``log_prob`` :math:`O(L r^2 + r^3)`.

    :param int latent_dim: L.
    :param rank: r, the number of factor columns, 1 ≤ r ≤ L. Default :math:`\max(1, \mathrm{round}(\sqrt{L}))`
        (4 for L = 16): it keeps the extra width :math:`L r` at about :math:`L^{3/2}`, between the diagonal
        family's 2L and the full-rank family's :math:`L^2/2`.
    :param float eps: floor added to the softplus of the scale; must be > 0 (default 1e-5).

    ``low_rank:4`` sets ``rank=4``.
    """

    name = "low_rank"
    spec_option = "rank"

    def __init__(self, latent_dim: int, rank: int | None = None, eps: float = 1e-5):
        super().__init__(latent_dim)
        if rank is None:
            rank = max(1, round(latent_dim**0.5))
        check_int(
            "low_rank's rank", rank, low=1, high=latent_dim, why="latent_dim; for a full covariance use full_rank"
        )
        self.rank = rank
        self.eps = _check_eps(eps)

    @property
    def num_params(self) -> int:
        return self.latent_dim * (2 + self.rank)

    def split(self, raw: torch.Tensor) -> LowRankParams:
        self._check_raw(raw)
        L = self.latent_dim
        loc, raw_scale, v = raw[..., :L], raw[..., L : 2 * L], raw[..., 2 * L :]  # (B, L), (B, L), (B, L*r)
        scale = F.softplus(raw_scale) + self.eps  # (B, L)
        cov_factor = scale.unsqueeze(-1) * v.unflatten(-1, (L, self.rank))  # (B, L, r)
        return LowRankParams(loc, cov_factor, scale.square())

    def forward(self, raw: torch.Tensor) -> dist.LowRankMultivariateNormal:
        loc, cov_factor, cov_diag = self.split(raw)
        return dist.LowRankMultivariateNormal(loc, cov_factor, cov_diag)  # batch (B,), event (L,)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, eps={self.eps}"
