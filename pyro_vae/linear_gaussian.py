r"""A VAE whose likelihood is known exactly: probabilistic PCA (Tipping and Bishop, 1999).

::

    model(x):  z ~ N(0, I_L)                        # (B, L)
               x ~ N(W z + b, σ² I_D)               # observed, (B, D)
    guide(x):  z ~ family(A x + c)                  # a linear encoder feeding any registered guide family

The marginal likelihood and the posterior are Gaussian in closed form:

.. math::

    p(x) = \mathcal{N}(x;\ b,\ W W^\top + \sigma^2 I_D), \qquad
    p(z \mid x) = \mathcal{N}\big(z;\ \Lambda^{-1} W^\top (x - b) / \sigma^2,\ \Lambda^{-1}\big), \quad
    \Lambda = I_L + W^\top W / \sigma^2 .

:class:`LinearGaussianVAE` is a :class:`~pyro_vae.model.VAE` whose networks are linear, so it runs unchanged
through the same guide families, objectives, schedules and evaluator, and every number they produce can be checked
against :meth:`~LinearGaussianVAE.log_marginal` and :meth:`~LinearGaussianVAE.posterior`. With the exact posterior
as the guide (:meth:`~LinearGaussianVAE.exact_guide`) every importance weight equals :math:`p(x)`, so the ELBO and
every IW bound equal :math:`\log p(x)` with zero variance.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.guides import GuideFamily
from pyro_vae.likelihoods import GaussianLikelihood
from pyro_vae.model import VAE

__all__ = ["GaussianLikelihood", "LinearEncoder", "LinearGaussianVAE"]


class LinearEncoder(nn.Module):
    """``x (B, D) → raw (B, num_params)`` by one affine map; :meth:`features` is ``x`` itself (width D).

    :param int input_dim: D.
    :param int num_params: the guide family's raw width.
    """

    def __init__(self, input_dim: int, num_params: int):
        super().__init__()
        self.input_dim = input_dim
        self.hidden_dim = input_dim
        self.head = nn.Linear(input_dim, num_params)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)  # (B, num_params)


class LinearGaussianVAE(VAE):
    r"""Probabilistic PCA as a VAE: ``z ~ N(0, I)``, ``x = W z + b + σ ε``, with an amortised linear encoder.

    The decoder is ``nn.Linear(L, D)`` (weight :math:`W`, ``(D, L)``, and bias :math:`b`), the likelihood a
    :class:`~pyro_vae.likelihoods.GaussianLikelihood` with one learned σ (``gaussian:shared``, no floor), and the
    encoder a :class:`LinearEncoder` feeding the guide family.
    :meth:`model` and :meth:`guide` are the :class:`~pyro_vae.model.VAE`'s own programs.

    :param int input_dim: D.
    :param int latent_dim: L.
    :param guide: a guide family name (default ``"mvn_diag"``) or a :class:`~pyro_vae.guides.GuideFamily`.
    :param dict guide_options: options for the family.
    :param float noise_scale: initial σ (default 1).
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int = 2,
        guide: str | GuideFamily = "mvn_diag",
        guide_options: dict | None = None,
        noise_scale: float = 1.0,
    ):
        # The VAE's constructor builds MLPs of one hidden unit, which are replaced at once by the linear networks;
        # going through it keeps the VAE's checks, family set-up and Pyro programs in one place.
        super().__init__(
            input_dim,
            latent_dim,
            hidden_dims=(1,),
            guide=guide,
            guide_options=guide_options,
            likelihood=GaussianLikelihood(noise_scale, mode="shared", min_scale=0.0),
        )
        self.encoder = LinearEncoder(input_dim, self.family.num_params)
        self.decoder = nn.Linear(latent_dim, input_dim)

    @property
    def weight(self) -> torch.Tensor:
        """W, ``(D, L)``."""
        return self.decoder.weight

    @property
    def bias(self) -> torch.Tensor:
        """b, ``(D,)``."""
        return self.decoder.bias

    @property
    def noise_scale(self) -> torch.Tensor:
        """σ, a 0-dimensional tensor."""
        return self.likelihood.scale

    def marginal(self) -> dist.LowRankMultivariateNormal:
        r""":math:`p(x) = \mathcal{N}(b, W W^\top + \sigma^2 I)`, batch ``()``, event ``(D,)``."""
        variance = self.noise_scale.square().expand(self.input_dim)  # (D,)
        return dist.LowRankMultivariateNormal(self.bias, self.weight, variance)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        r"""Exact :math:`\log p(x)` per data point, ``(B,)``, for ``x`` of shape ``(B, D)``."""
        return self.marginal().log_prob(x)

    def posterior_precision(self) -> torch.Tensor:
        r""":math:`\Lambda = I + W^\top W / \sigma^2`, ``(L, L)``: the precision of :math:`p(z \mid x)` for every x."""
        w = self.weight
        eye = torch.eye(self.latent_dim, dtype=w.dtype, device=w.device)
        return eye + w.T @ w / self.noise_scale.square()

    def posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        r"""Exact :math:`p(z \mid x) = \mathcal{N}(\Lambda^{-1} W^\top (x - b) / \sigma^2, \Lambda^{-1})`.

        :param x: ``(B, D)``.
        :returns: a ``MultivariateNormal`` with batch ``(B,)`` and event ``(L,)``.
        """
        precision = self.posterior_precision()  # (L, L)
        chol = torch.linalg.cholesky(precision)
        rhs = (x - self.bias) @ self.weight / self.noise_scale.square()  # (B, L)
        loc = torch.cholesky_solve(rhs.T, chol).T  # (B, L)
        return dist.MultivariateNormal(loc, precision_matrix=precision.expand(x.shape[0], -1, -1))

    def exact_guide(self, x: torch.Tensor, num_data: int | None = None, index: torch.Tensor | None = None) -> None:
        """A guide that samples the exact posterior :meth:`posterior`; takes the same arguments as :meth:`model`.

        It announces no parameters of its own (it reads the model's W, b and σ), so it is a reference for tests and
        tutorials rather than something to train.
        """
        with self.data_plate(x, num_data, index):
            pyro.sample("z", self.posterior(x))

    @torch.no_grad()
    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws of x from the model, ``(n, D)``: ``x = W z + b + σ ε`` with z, ε standard normal."""
        w = self.weight
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=w.dtype, device=w.device)
        eps = torch.randn(n, self.input_dim, generator=generator, dtype=w.dtype, device=w.device)
        return z @ w.T + self.bias + self.noise_scale * eps
