r"""Amortised Sylvester normalising flows (van den Berg et al. 2018), on a Gaussian base.

One Sylvester step maps :math:`z \in \mathbb{R}^L` to

.. math::

    z' = z + Q R\, h(\tilde R Q^\top z + b), \qquad h = \tanh,

with :math:`Q \in \mathbb{R}^{L \times M}` of orthonormal columns, :math:`R, \tilde R` upper triangular
:math:`M \times M` and :math:`b \in \mathbb{R}^M`. By Sylvester's determinant identity its Jacobian determinant is
:math:`\det(I_M + \operatorname{diag}(h'(\tilde R Q^\top z + b)) \tilde R R)`, the determinant of a triangular
matrix:

.. math::

    \log \lvert\det \partial z' / \partial z\rvert = \sum_{m=1}^{M} \log\bigl(1 + h'(a_m)\, R_{mm} \tilde R_{mm}\bigr),
    \qquad a = \tilde R Q^\top z + b .

The step is invertible when :math:`R_{mm} \tilde R_{mm} > -1 / \lVert h' \rVert_\infty = -1`; both diagonals go
through :math:`0.999 \tanh(\cdot)`, so the product stays above :math:`-0.998` and every log-term above
:math:`\log 0.002` (plain ``tanh`` saturates to ±1 in float32, where opposite signs would give ``log 0``).

**Amortised**: every parameter of every step is a function of x. The encoder emits them per data point, after the
base family's numbers::

    raw = [ base numbers | step 1 | … | step K ]
    step = [ Q numbers | R strictly-upper (M(M−1)/2) | R̃ strictly-upper (M(M−1)/2) | R diag (M) | R̃ diag (M) | b (M) ]

The family has no global parameters. How Q is made from its numbers is the variant:

=========================  ===========================  =====================================================
family                     Q                            Q numbers per step
=========================  ===========================  =====================================================
``sylvester`` (O-SNF)      Gram–Schmidt (QR) of an L×M  L·M (M = ``num_ortho_vecs``, default L − 1)
                           matrix
``sylvester_householder``  product of H reflections     H·L (H = ``num_householder``, default L // 2 + 1)
``sylvester_triangular``   identity / reversal,         0 (M = L)
                           alternating over steps
=========================  ===========================  =====================================================

The paper orthogonalises Q with an iterative (Björck) scheme stopped at a tolerance; here Q is the orthonormal factor
of a QR decomposition with the signs fixed so that R has a positive diagonal, i.e. Gram–Schmidt of the raw columns:
orthonormal to rounding error (which the log-determinant formula needs), a smooth function of a matrix of full
column rank (LAPACK's own signs flip where a pivot crosses zero), and several times cheaper than the polar factor
that Björck's iteration converges to. M is at most L − 1: with M = L the last column of Q would be fixed, up to
its sign, by the others, and the L raw numbers behind it would get no gradient.

A Sylvester step has no closed-form inverse: the family scores its own samples (Pyro caches each step's input),
which is all that the ELBO and importance sampling need.

Reference: R. van den Berg, L. Hasenclever, J. M. Tomczak, M. Welling. Sylvester Normalizing Flows for Variational
Inference. UAI 2018.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pyro.distributions as dist
import torch
from torch.distributions import Transform, constraints

from pyro_vae.config import check_int
from pyro_vae.guides.base import GuideFamily
from pyro_vae.guides.flows import FlowFamily

#: Bound on the diagonals of R and R̃ (see the module docstring).
DIAGONAL_BOUND = 0.999


class AmortizedSylvester(Transform):
    r"""One Sylvester step :math:`z' = z + Q R \tanh(\tilde R Q^\top z + b)` whose parameters carry a batch
    dimension (one set per data point), on Pyro's :class:`~torch.distributions.transforms.Transform` API.

    Shapes: ``q`` ``(B, L, M)`` with orthonormal columns, or ``None`` for a permutation (``reverse`` chooses the
    identity or the reversal of the coordinates); ``r``, ``r_tilde`` ``(B, M, M)`` upper triangular with
    :math:`R_{mm} \tilde R_{mm} > -1`; ``bias`` ``(B, M)``. Inputs ``z`` are ``(..., B, L)``: leading sample
    dimensions broadcast.

    :param q: orthonormal columns, or ``None``.
    :param r: R.
    :param r_tilde: R̃.
    :param bias: b.
    :param bool reverse: with ``q=None``, use the reversal permutation as Q (else the identity).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(
        self,
        q: torch.Tensor | None,
        r: torch.Tensor,
        r_tilde: torch.Tensor,
        bias: torch.Tensor,
        reverse: bool = False,
    ):
        super().__init__(cache_size=1)
        self.q, self.r, self.r_tilde, self.bias, self.reverse = q, r, r_tilde, bias, reverse

    def _qt(self, z: torch.Tensor) -> torch.Tensor:
        if self.q is None:
            return z.flip(-1) if self.reverse else z
        return (z.unsqueeze(-2) @ self.q).squeeze(-2)  # Qᵀz: (..., B, M)

    def _q(self, v: torch.Tensor) -> torch.Tensor:
        if self.q is None:
            return v.flip(-1) if self.reverse else v
        return (v.unsqueeze(-2) @ self.q.mT).squeeze(-2)  # Qv: (..., B, L)

    def _preactivation(self, z: torch.Tensor) -> torch.Tensor:
        return (self._qt(z).unsqueeze(-2) @ self.r_tilde.mT).squeeze(-2) + self.bias  # R̃Qᵀz + b: (..., B, M)

    def _call(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self._preactivation(z))  # (..., B, M)
        return z + self._q((h.unsqueeze(-2) @ self.r.mT).squeeze(-2))  # z + Q R h: (..., B, L)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "a Sylvester flow step has no closed-form inverse: only samples drawn from the distribution (whose "
            "inputs are cached) can be scored"
        )

    def log_abs_det_jacobian(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h_prime = 1 - torch.tanh(self._preactivation(z)).square()  # (..., B, M)
        diagonal = self.r.diagonal(dim1=-2, dim2=-1) * self.r_tilde.diagonal(dim1=-2, dim2=-1)  # (B, M)
        return torch.log1p(h_prime * diagonal).sum(-1)  # (..., B)


class SylvesterParams(NamedTuple):
    """Per-data-point parameters of K Sylvester steps.

    :ivar base: the base family's named parameters.
    :ivar q: ``(B, K, L, M)`` orthonormal columns, or ``None`` for the triangular variant.
    :ivar r: ``(B, K, M, M)`` upper triangular.
    :ivar r_tilde: ``(B, K, M, M)`` upper triangular.
    :ivar bias: ``(B, K, M)``.
    """

    base: Any
    q: torch.Tensor | None
    r: torch.Tensor
    r_tilde: torch.Tensor
    bias: torch.Tensor


class SylvesterFamily(FlowFamily):
    """Base class of the three Sylvester variants: K amortised :class:`AmortizedSylvester` steps on a Gaussian base.
    Subclasses set :attr:`num_q_params` and :meth:`make_q`. See the module docstring.

    :param int latent_dim: L.
    :param num_flows: K (default 4).
    :param base: the base family (default ``"mvn_diag"``).
    """

    default_num_flows = 4

    def __init__(self, latent_dim: int, num_flows: int | None = None, base: str | GuideFamily = "mvn_diag"):
        super().__init__(latent_dim, num_flows, base)
        m = self.num_ortho_vecs
        self.register_buffer("_upper", torch.triu_indices(m, m, offset=1), persistent=False)  # (2, M(M−1)/2)

    #: M, the width of Q.
    @property
    def num_ortho_vecs(self) -> int:
        return self.latent_dim

    @property
    def num_q_params(self) -> int:
        """Raw numbers that make one step's Q."""
        raise NotImplementedError

    def make_q(self, raw_q: torch.Tensor) -> torch.Tensor | None:
        """Q ``(B, K, L, M)`` from its numbers ``(B, K, num_q_params)``; ``None`` for a fixed permutation."""
        raise NotImplementedError

    @property
    def _step_params(self) -> int:
        m = self.num_ortho_vecs
        return self.num_q_params + m * (m - 1) + 3 * m

    @property
    def num_params(self) -> int:
        return self.base.num_params + self.num_flows * self._step_params

    def _triangular(self, strict: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
        m = self.num_ortho_vecs
        matrix = strict.new_zeros(strict.shape[:-1] + (m, m))  # (B, K, M, M)
        matrix[..., self._upper[0], self._upper[1]] = strict
        return matrix + torch.diag_embed(DIAGONAL_BOUND * torch.tanh(diagonal))

    def split(self, raw: torch.Tensor) -> SylvesterParams:
        self._check_raw(raw)
        m = self.num_ortho_vecs
        base_raw, steps = raw.split([self.base.num_params, self.num_flows * self._step_params], dim=-1)
        steps = steps.unflatten(-1, (self.num_flows, self._step_params))  # (B, K, step)
        n_strict = m * (m - 1) // 2
        raw_q, r_strict, rt_strict, r_diag, rt_diag, bias = steps.split(
            [self.num_q_params, n_strict, n_strict, m, m, m], dim=-1
        )
        return SylvesterParams(
            base=self.base.split(base_raw),
            q=self.make_q(raw_q),
            r=self._triangular(r_strict, r_diag),
            r_tilde=self._triangular(rt_strict, rt_diag),
            bias=bias,
        )

    def forward(self, raw: torch.Tensor) -> dist.TransformedDistribution:
        params = self.split(raw)
        q0 = self.base(raw[..., : self.base.num_params])  # batch (B,), event (L,)
        steps = [
            AmortizedSylvester(
                None if params.q is None else params.q[:, k],
                params.r[:, k],
                params.r_tilde[:, k],
                params.bias[:, k],
                reverse=k % 2 == 1,
            )
            for k in range(self.num_flows)
        ]
        return dist.TransformedDistribution(q0, steps)  # batch (B,), event (L,)


class OrthogonalSylvester(SylvesterFamily):
    """O-SNF: each step's Q is the orthonormal factor of the QR decomposition of an L×M matrix of raw numbers.
    ``sylvester:K`` sets K (default 4).

    :param int latent_dim: L.
    :param num_flows: K.
    :param num_ortho_vecs: M, 1 ≤ M ≤ L − 1 (default L − 1, and 1 when L = 1): each step is a rank-M update;
        K steps with different Q cover all L directions.
    :param base: the base family (default ``"mvn_diag"``).
    """

    name = "sylvester"

    def __init__(
        self,
        latent_dim: int,
        num_flows: int | None = None,
        num_ortho_vecs: int | None = None,
        base: str | GuideFamily = "mvn_diag",
    ):
        largest = max(check_int("latent_dim", latent_dim, low=1) - 1, 1)
        why = "latent_dim - 1: a square Q's last column is fixed by the others; for a square Q use "
        why += "sylvester_householder"
        self._m = check_int(
            "num_ortho_vecs", largest if num_ortho_vecs is None else num_ortho_vecs, low=1, high=largest, why=why
        )
        super().__init__(latent_dim, num_flows, base)

    @property
    def num_ortho_vecs(self) -> int:
        return self._m

    @property
    def num_q_params(self) -> int:
        return self.latent_dim * self._m

    def make_q(self, raw_q: torch.Tensor) -> torch.Tensor:
        q, r = torch.linalg.qr(raw_q.unflatten(-1, (self.latent_dim, self._m)))  # (B, K, L, M), (B, K, M, M)
        # diag(R) > 0 makes the factorisation unique and Q continuous in the raw numbers; sign(0) → +1
        signs = torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)  # (B, K, M)
        return q * signs.unsqueeze(-2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_ortho_vecs={self._m}"


class HouseholderSylvester(SylvesterFamily):
    """H-SNF: each step's Q (L×L) is a product of H Householder reflections
    :math:`\\prod_j (I - 2 v_j v_j^\\top / \\lVert v_j \\rVert^2)` of raw vectors v. ``sylvester_householder:K``
    sets K (default 4).

    :param int latent_dim: L.
    :param num_flows: K.
    :param num_householder: H (default L // 2 + 1, as Pyro's ``householder`` helper).
    :param base: the base family (default ``"mvn_diag"``).
    """

    name = "sylvester_householder"

    def __init__(
        self,
        latent_dim: int,
        num_flows: int | None = None,
        num_householder: int | None = None,
        base: str | GuideFamily = "mvn_diag",
    ):
        default = check_int("latent_dim", latent_dim, low=1) // 2 + 1
        self.num_householder = check_int(
            "num_householder", default if num_householder is None else num_householder, low=1
        )
        super().__init__(latent_dim, num_flows, base)

    @property
    def num_q_params(self) -> int:
        return self.num_householder * self.latent_dim

    def make_q(self, raw_q: torch.Tensor) -> torch.Tensor:
        v = raw_q.unflatten(-1, (self.num_householder, self.latent_dim))  # (B, K, H, L)
        v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        q = torch.eye(self.latent_dim, dtype=raw_q.dtype, device=raw_q.device).expand(raw_q.shape[:-1] + (-1, -1))
        for j in range(self.num_householder):
            vj = v[..., j, :]  # (B, K, L)
            q = q - 2 * (q @ vj.unsqueeze(-1)) @ vj.unsqueeze(-2)  # Q H_j, with H_j = I − 2 v vᵀ
        return q  # (B, K, L, L)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_householder={self.num_householder}"


class TriangularSylvester(SylvesterFamily):
    """T-SNF: Q alternates between the identity (odd steps) and the reversal of the coordinates (even steps), so
    R and R̃ act on the coordinates directly and successive steps see them in opposite orders.
    ``sylvester_triangular:K`` sets K (default 4).

    :param int latent_dim: L.
    :param num_flows: K.
    :param base: the base family (default ``"mvn_diag"``).
    """

    name = "sylvester_triangular"

    @property
    def num_q_params(self) -> int:
        return 0

    def make_q(self, raw_q: torch.Tensor) -> None:
        return None
