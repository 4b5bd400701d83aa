r"""Normalising-flow guide families conditioned on x, stacked on a Gaussian base.

A flow family reads its raw encoder output as the base family's numbers followed by a context vector::

    raw = [ base numbers (base.num_params) | context h (context_dim) ]       # (B, num_params)
    z_0 ~ base(raw[:, :base.num_params])                                    # mvn_diag by default
    z_K = f_K(… f_1(z_0; h) …; h)                                           # K conditional transforms
    log q(z_K | x) = log q_0(z_0 | x) − Σ_k log |det ∂f_k / ∂z_{k−1}|

The transforms are Pyro's ``Conditional*`` transforms, assembled by
:class:`~pyro.distributions.ConditionalTransformedDistribution` and conditioned on ``h``. Their hyper-networks are
global: they are submodules of the family, which is a submodule of the :class:`~pyro_vae.model.VAE`, so the VAE
announces them as ``param`` sites of the guide and the optimiser, ``state_dict`` and checkpoints see them (with the
random autoregressive orderings, which are buffers).

**Why the context is part of the raw output** (and not the encoder's last hidden layer). This is the IAF paper's
design (Kingma et al. 2016, §4: the encoder emits :math:`\mu, \sigma` and an extra output :math:`h` that every flow
step reads). It keeps :attr:`~pyro_vae.guides.GuideFamily.num_params` the only contract between the encoder and
the family: the family does not need to know the encoder's hidden width, works unchanged with any encoder (an
MLP, a convolutional one, a user's own), and its contract tests see the whole input. It costs nothing in
expressiveness: the context is a learned linear read-out of the last hidden layer, and the hyper-networks' first
layer is linear, so with ``context_dim`` at least the hidden width the composition can represent what reading the
hidden layer directly could.

Densities: ``log_prob`` is exact for the family's own samples (Pyro caches each transform's input). The affine,
spline and Householder transforms can also invert an arbitrary z (the autoregressive ones in L sequential passes);
planar, radial and the neural autoregressive flow cannot, so those families score only their own samples, which
is all that the ELBO and importance sampling need.

References:

- D. P. Kingma, T. Salimans, R. Jozefowicz, X. Chen, I. Sutskever, M. Welling. Improving Variational Inference
  with Inverse Autoregressive Flow. NeurIPS 2016.
- D. J. Rezende, S. Mohamed. Variational Inference with Normalizing Flows. ICML 2015 (planar, radial).
- J. M. Tomczak, M. Welling. Improving Variational Auto-Encoders using Householder Flow. arXiv:1611.09630.
- C. Durkan, A. Bekasov, I. Murray, G. Papamakarios. Neural Spline Flows. NeurIPS 2019.
- C.-W. Huang, D. Krueger, A. Lacoste, A. Courville. Neural Autoregressive Flows. ICML 2018.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn

from pyro_vae.config import check_int
from pyro_vae.errors import ConfigError
from pyro_vae.guides.base import GuideFamily


class FlowFamily(GuideFamily):
    """Common part of every flow family: a Gaussian base family that reads the first ``base.num_params`` raw
    numbers, and a number of flow steps K (the ``:K`` of the spec).

    :param int latent_dim: L.
    :param num_flows: K, the number of flow steps (default :attr:`default_num_flows`).
    :param base: the base family, a registered non-flow family name or spec (default ``"mvn_diag"``; e.g.
        ``"full_rank"`` or ``"low_rank:2"``) or a ready :class:`~pyro_vae.guides.GuideFamily`.
    """

    spec_option = "num_flows"
    #: K when the spec gives none.
    default_num_flows: ClassVar[int] = 2

    def __init__(self, latent_dim: int, num_flows: int | None = None, base: str | GuideFamily = "mvn_diag"):
        super().__init__(latent_dim)
        if num_flows is None:
            num_flows = self.default_num_flows
        self.num_flows = check_int(f"num_flows (the K of {self.name}:K)", num_flows, low=1)
        self.base = self._make_base(base, latent_dim)

    @staticmethod
    def _make_base(base: str | GuideFamily, latent_dim: int) -> GuideFamily:
        from pyro_vae.guides import make_family  # the registry imports this module

        family = make_family(base, latent_dim) if isinstance(base, str) else base
        if not isinstance(family, GuideFamily) or isinstance(family, FlowFamily):
            raise ConfigError(
                f"a flow's base must be a Gaussian family such as 'mvn_diag', 'diag_normal', 'full_rank' or "
                f"'low_rank', got {base!r}"
            )
        if family.latent_dim != latent_dim:
            raise ConfigError(f"the base family has latent_dim={family.latent_dim} but the flow has {latent_dim}")
        return family

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_flows={self.num_flows}"


class FlowParams(NamedTuple):
    """The base family's named parameters and the context ``(B, context_dim)`` the transforms condition on."""

    base: Any
    context: torch.Tensor


class ConditionalFlowFamily(FlowFamily):
    """A stack of K Pyro conditional transforms on a Gaussian base, conditioned on a context read from the raw output.

    Subclasses implement :meth:`make_transforms`. See the module docstring for the layout and the choice of context.

    :param int latent_dim: L.
    :param num_flows: K (default :attr:`default_num_flows`).
    :param base: the base family (default ``"mvn_diag"``).
    :param context_dim: width of the context h. Default :math:`\\max(16, 2L)`: as wide as the base's own numbers,
        and at least 16 so that a small latent space still gets a context rich enough to shape the flow.
    :param hidden_dims: hidden widths of each transform's hyper-network (default: the width Pyro's helper function
        for the transform chooses, noted on each family).
    """

    def __init__(
        self,
        latent_dim: int,
        num_flows: int | None = None,
        base: str | GuideFamily = "mvn_diag",
        context_dim: int | None = None,
        hidden_dims: Sequence[int] | None = None,
    ):
        super().__init__(latent_dim, num_flows, base)
        if context_dim is None:
            context_dim = max(16, 2 * latent_dim)
        self.context_dim = check_int("context_dim (the width of the flow's context)", context_dim, low=1)
        if hidden_dims is not None:
            hidden_dims = [check_int("every hidden width", h, low=1) for h in hidden_dims]
        self.hidden_dims = hidden_dims
        self.transforms = nn.ModuleList(self.make_transforms())

    def make_transforms(self) -> list[dist.conditional.ConditionalTransformModule]:
        """The K conditional transforms, in the order they act on z_0."""
        raise NotImplementedError

    @property
    def num_params(self) -> int:
        return self.base.num_params + self.context_dim

    def split(self, raw: torch.Tensor) -> FlowParams:
        self._check_raw(raw)
        base_raw, context = raw.split([self.base.num_params, self.context_dim], dim=-1)
        return FlowParams(self.base.split(base_raw), context)  # context: (B, context_dim)

    def forward(self, raw: torch.Tensor) -> dist.TransformedDistribution:
        self._check_raw(raw)
        base_raw, h = raw.split([self.base.num_params, self.context_dim], dim=-1)  # (B, nb), (B, context_dim)
        q0 = self.base(base_raw)  # batch (B,), event (L,)
        flow = dist.ConditionalTransformedDistribution(q0, list(self.transforms))
        return flow.condition(h)  # batch (B,), event (L,)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, context_dim={self.context_dim}"


class IAF(ConditionalFlowFamily):
    """Inverse autoregressive flow: K :class:`~pyro.distributions.transforms.ConditionalAffineAutoregressive` steps,
    :math:`z \\mapsto \\mu_t(z, h) + \\sigma_t(z, h) \\odot z` with a MADE network whose input ordering is drawn at
    random for each step (so successive steps mix different orders). Hyper-network default: one hidden layer of
    10 L (Pyro's helper). ``iaf:K`` sets K (default 2). Kingma et al. 2016.
    """

    name = "iaf"

    def make_transforms(self):
        L, C = self.latent_dim, self.context_dim
        return [T.conditional_affine_autoregressive(L, C, self.hidden_dims) for _ in range(self.num_flows)]


class PlanarFlow(ConditionalFlowFamily):
    """K :class:`~pyro.distributions.transforms.ConditionalPlanar` steps,
    :math:`z \\mapsto z + \\hat u \\tanh(w^\\top z + b)` with :math:`(u, w, b)` from a dense network of h (two
    hidden layers of 10 L); :math:`w^\\top \\hat u > -1` keeps each step invertible. Scores only its own samples.
    ``planar:K`` sets K (default 4). Rezende & Mohamed 2015.
    """

    name = "planar"
    default_num_flows = 4

    def make_transforms(self):
        L, C = self.latent_dim, self.context_dim
        return [T.conditional_planar(L, C, self.hidden_dims) for _ in range(self.num_flows)]


class RadialFlow(ConditionalFlowFamily):
    """K :class:`~pyro.distributions.transforms.ConditionalRadial` steps,
    :math:`z \\mapsto z + \\beta\\, (z - z_0) / (\\alpha + \\lVert z - z_0 \\rVert)` with :math:`\\beta \\ge -\\alpha`
    for invertibility; parameters from a dense network of h (two hidden layers of 10 L). Scores only its own
    samples. ``radial:K`` sets K (default 4). Rezende & Mohamed 2015.
    """

    name = "radial"
    default_num_flows = 4

    def make_transforms(self):
        L, C = self.latent_dim, self.context_dim
        return [T.conditional_radial(L, C, self.hidden_dims) for _ in range(self.num_flows)]


class HouseholderFlow(ConditionalFlowFamily):
    """K Householder reflections :math:`z \\mapsto (I - 2 v v^\\top / \\lVert v \\rVert^2) z`, one
    :class:`~pyro.distributions.transforms.ConditionalHouseholder` whose dense network (two hidden layers of 10 L)
    maps h to all K vectors v. Volume-preserving (log-determinant 0): on a diagonal Gaussian base it gives a
    Gaussian with a rotated, hence full, covariance. ``householder:K`` sets K (default 2); K > L over-parametrises.
    Tomczak & Welling 2016.
    """

    name = "householder"

    def make_transforms(self):
        L, C = self.latent_dim, self.context_dim
        return [T.conditional_householder(L, C, self.hidden_dims, count_transforms=self.num_flows)]


class SplineFlow(ConditionalFlowFamily):
    """K :class:`~pyro.distributions.transforms.ConditionalSplineAutoregressive` steps: monotone rational-quadratic
    splines with 8 bins on [-3, 3] (identity outside), whose knots come from a MADE network of (z, h) (two hidden
    layers of 10 L), so each step couples the dimensions. The autoregressive variant is used rather than the
    element-wise :class:`~pyro.distributions.transforms.ConditionalSpline`, which would leave the dimensions of z
    independent given x. ``spline:K`` sets K (default 2). Durkan et al. 2019.
    """

    name = "spline"

    def make_transforms(self):
        L, C = self.latent_dim, self.context_dim
        return [T.conditional_spline_autoregressive(L, C, self.hidden_dims) for _ in range(self.num_flows)]


class NAF(ConditionalFlowFamily):
    """Neural autoregressive flow: K :class:`~pyro.distributions.transforms.ConditionalNeuralAutoregressive` steps,
    each a monotone sigmoidal network of width 16 per dimension whose weights come from a MADE network of (z, h)
    (one hidden layer of 3 L + 1). Scores only its own samples. ``naf:K`` sets K (default 2). Huang et al. 2018.
    """

    name = "naf"

    def make_transforms(self):
        L, C = self.latent_dim, self.context_dim
        return [T.conditional_neural_autoregressive(L, C, self.hidden_dims) for _ in range(self.num_flows)]
