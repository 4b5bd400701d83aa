"""Observation models p(x | z): from the decoder's raw output to a Pyro distribution over a whole image.

Each likelihood says how many raw numbers it needs per pixel (:attr:`Likelihood.params_per_dim`), turns the
decoder's output into a distribution with ``event_shape (D,)`` (``.to_event(1)``), and gives the mean image used for
reconstructions and samples. Register a new one with :func:`register`; the CLI's ``--likelihood`` choices are
:func:`likelihood_names`.
"""

from __future__ import annotations

from typing import ClassVar

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions.utils import broadcast_all

from pyro_vae._compat import sum_rightmost
from pyro_vae.config.specs import parse_component_spec
from pyro_vae.errors import ConfigError, unknown_choice

_REGISTRY: dict[str, type[Likelihood]] = {}


def register(cls: type[Likelihood]) -> type[Likelihood]:
    """Class decorator that adds a likelihood to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def likelihood_names() -> list[str]:
    """Names of the registered likelihoods, sorted."""
    return sorted(_REGISTRY)


def make_likelihood(spec: str) -> Likelihood:
    """Build a registered likelihood from its spec, ``name`` or ``name:option`` (the option is read by the
    likelihood's :meth:`Likelihood.from_option`); unknown names get the list of choices."""
    parsed = parse_component_spec(spec, "likelihood")
    if parsed.name not in _REGISTRY:
        raise unknown_choice("likelihood", parsed.name, _REGISTRY)
    cls = _REGISTRY[parsed.name]
    return cls() if parsed.option is None else cls.from_option(parsed.option)


class Likelihood(nn.Module):
    """Base class: maps decoder output ``(..., D * params_per_dim)`` to p(x | z) with ``event_shape (D,)``.

    :cvar str name: registry name.
    :cvar int params_per_dim: raw decoder outputs per data dimension.
    :cvar bool requires_binary: whether observations must be exactly 0 or 1.
    """

    name: ClassVar[str]
    params_per_dim: ClassVar[int] = 1
    requires_binary: ClassVar[bool] = False

    @classmethod
    def from_option(cls, option: str) -> Likelihood:
        """The likelihood that the spec ``name:option`` describes; by default a likelihood takes no option."""
        raise ConfigError(f"likelihood {cls.name!r} takes no ':option', got '{cls.name}:{option}'; use {cls.name!r}")

    def output_dim(self, input_dim: int) -> int:
        """Decoder output width for data of dimension ``input_dim``."""
        return input_dim * self.params_per_dim

    def forward(self, raw: torch.Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def mean(self, raw: torch.Tensor) -> torch.Tensor:
        """Expected image E[x | z], ``(..., D)``, for reconstructions and sample grids."""
        raise NotImplementedError


class BernoulliImage(dist.Independent):
    """``Bernoulli(logits=...).to_event(n)`` that negates the log-density after summing over the event, not before.

    Bernoulli's ``log_prob`` is ``−BCE(logits, x)`` per pixel, and ``Independent`` then sums over the pixels; this
    class sums the binary cross-entropies first and negates the ``(B,)`` total. Negation is exact, so the result is
    the same bit for bit, without a negation of the whole ``(B, D)`` array forward and backward (measured in
    ``benchmarks/train_speed.py``: it grows with B·D). Build it as ``BernoulliImage(dist.Bernoulli(logits=l), 1)``.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        base = self.base_dist
        if not isinstance(base, torch.distributions.Bernoulli):
            raise TypeError(f"BernoulliImage needs a Bernoulli base distribution, got {type(base).__name__}")
        if base._validate_args:
            base._validate_sample(value)
        logits, value = broadcast_all(base.logits, value)
        bce = F.binary_cross_entropy_with_logits(logits, value, reduction="none")
        return sum_rightmost(bce, self.reinterpreted_batch_ndims).neg()


@register
class BernoulliLikelihood(Likelihood):
    """``Bernoulli(logits=decoder(z)).to_event(1)``: the standard likelihood for binarised images.

    Its support is {0, 1}; grey-level data must be binarised first (``--binarize dynamic``, the default).
    """

    name = "bernoulli"
    requires_binary = True

    def forward(self, raw: torch.Tensor) -> dist.TorchDistribution:
        return BernoulliImage(dist.Bernoulli(logits=raw), 1)  # Bernoulli(logits=raw).to_event(1)

    def mean(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(raw)


@register
class ContinuousBernoulliLikelihood(Likelihood):
    """``ContinuousBernoulli(logits=decoder(z)).to_event(1)`` for grey levels in [0, 1] (Loaiza-Ganem and
    Cunningham, 2019). Use it with ``--binarize none``; its mean differs from ``sigmoid(logits)``."""

    name = "continuous_bernoulli"

    def forward(self, raw: torch.Tensor) -> dist.TorchDistribution:
        return dist.ContinuousBernoulli(logits=raw).to_event(1)

    def mean(self, raw: torch.Tensor) -> torch.Tensor:
        return dist.ContinuousBernoulli(logits=raw).mean
