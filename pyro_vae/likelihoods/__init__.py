"""Observation models p(x | z): from the decoder's raw output to a Pyro distribution over a whole image.

Each likelihood says how many raw numbers it needs per pixel (:attr:`Likelihood.params_per_dim`; the decoder output
is param-major, :func:`split_params`), turns the decoder's output into a distribution with ``event_shape (D,)``, gives
the mean image used for reconstructions and samples, and declares the data it admits (:attr:`Likelihood.support`,
see :mod:`pyro_vae.config.data_kinds`). Register a new one with :func:`register`; the CLI's ``--likelihood`` choices
are :func:`likelihood_names`, and a spec ``name:option`` is read by the class's :meth:`Likelihood.from_option`.

=================================  ==========  =========  ==========================================================
spec                               raw / pixel  data       p(x | z)
=================================  ==========  =========  ==========================================================
``bernoulli``                      1           binary     Bernoulli(logits)
``continuous_bernoulli``           1           [0, 1]     ContinuousBernoulli(logits) (Loaiza-Ganem & Cunningham 2019)
``gaussian[:σ|learned|shared|optimal]``  1     real       Normal(μ, σ), σ fixed (0.1), learned, or the σ-VAE's σ*
``beta[:ε]``                       2           [0, 1]     Beta(α, β) on x clamped to [ε, 1 − ε]
``discretized_logistic``           2           8-bit      256-bin discretised logistic (Salimans et al. 2017)
=================================  ==========  =========  ==========================================================
"""

from pyro_vae.likelihoods.base import (
    Likelihood,
    likelihood_class,
    likelihood_names,
    make_likelihood,
    register,
    split_params,
)
from pyro_vae.likelihoods.bernoulli import BernoulliImage, BernoulliLikelihood, ContinuousBernoulliLikelihood
from pyro_vae.likelihoods.beta import BetaLikelihood, ClampedBeta
from pyro_vae.likelihoods.discretized import DiscretizedLogistic, DiscretizedLogisticLikelihood
from pyro_vae.likelihoods.gaussian import GaussianLikelihood, OptimalScaleNormal

__all__ = [
    "BernoulliImage",
    "BernoulliLikelihood",
    "BetaLikelihood",
    "ClampedBeta",
    "ContinuousBernoulliLikelihood",
    "DiscretizedLogistic",
    "DiscretizedLogisticLikelihood",
    "GaussianLikelihood",
    "Likelihood",
    "OptimalScaleNormal",
    "likelihood_class",
    "likelihood_names",
    "make_likelihood",
    "register",
    "split_params",
]
