"""The likelihood seam: the :class:`Likelihood` base class and its registry."""

from __future__ import annotations

from typing import ClassVar

import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.config.data_kinds import DATA_KINDS
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


def likelihood_class(name: str) -> type[Likelihood]:
    """The registered class called ``name``; unknown names get the list of choices."""
    if name not in _REGISTRY:
        raise unknown_choice("likelihood", name, _REGISTRY)
    return _REGISTRY[name]


def make_likelihood(spec: str) -> Likelihood:
    """Build a registered likelihood from its spec, ``name`` or ``name:option`` (the option is read by the
    likelihood's :meth:`Likelihood.from_option`); unknown names get the list of choices.

    :param str spec: e.g. ``"bernoulli"``, ``"gaussian:0.05"``, ``"gaussian:learned"``, ``"beta"``.
    """
    parsed = parse_component_spec(spec, "likelihood")
    cls = likelihood_class(parsed.name)
    return cls() if parsed.option is None else cls.from_option(parsed.option)


def split_params(raw: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """The ``n`` raw parameters of a param-major decoder output: ``raw (..., n * D)`` holds all D values of the first
    raw parameter, then all D of the second, and so on; returns ``n`` views ``(..., D)``."""
    return raw.chunk(n, dim=-1)


class Likelihood(nn.Module):
    """Base class: maps decoder output ``(..., D * params_per_dim)`` to p(x | z) with ``event_shape (D,)``.

    The decoder output is param-major (see :func:`split_params`). A subclass sets the class attributes below,
    implements :meth:`forward` and :meth:`mean`, reads a spec option in :meth:`from_option`, and creates parameters
    that depend on D in :meth:`bind`.

    :cvar str name: registry name.
    :cvar int params_per_dim: raw decoder outputs per data dimension.
    :cvar str support: the widest data kind admitted (:data:`pyro_vae.config.data_kinds.DATA_KINDS`: ``"binary"``,
        ``"8bit"`` or ``"unit"``); :func:`pyro_vae.data.check_likelihood_data` and the config check read it.
    :cvar bool requires_binary: whether observations must be exactly 0 or 1; set from ``support == "binary"``.
    :cvar bool discrete: whether p(x | z) is a probability mass function (bits/dim are then −log2 p(x) / D) rather
        than a density.
    :ivar bool normalized: whether log p(x | z) is a normalised log-density or log-mass in x (``False`` for a
        likelihood that fits itself to the observation, such as ``gaussian:optimal``); evaluation reports no bits/dim
        for an unnormalised one.
    :ivar clamp: the ε by which observations are clamped to [ε, 1 − ε] (``beta``), else ``None``; recorded in the
        evaluation protocol.
    """

    name: ClassVar[str]
    params_per_dim: ClassVar[int] = 1
    support: ClassVar[str] = "unit"
    requires_binary: ClassVar[bool] = False
    discrete: ClassVar[bool] = False
    normalized: bool = True
    clamp: float | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.support not in DATA_KINDS:
            raise TypeError(f"{cls.__name__}.support must be one of {DATA_KINDS}, got {cls.support!r}")
        cls.requires_binary = cls.support == "binary"  # one fact, two spellings: cli hints read requires_binary

    @classmethod
    def from_option(cls, option: str) -> Likelihood:
        """The likelihood that the spec ``name:option`` describes; by default a likelihood takes no option."""
        raise ConfigError(f"likelihood {cls.name!r} takes no ':option', got '{cls.name}:{option}'; use {cls.name!r}")

    @property
    def spec(self) -> str:
        """The spec that rebuilds this likelihood with :func:`make_likelihood` (``name`` or ``name:option``)."""
        return self.name

    def bind(self, input_dim: int) -> None:
        """Create the parameters that depend on the data dimension D (none by default); called by
        :meth:`output_dim`, which the model calls once while it builds its decoder."""

    def output_dim(self, input_dim: int) -> int:
        """Decoder output width for data of dimension ``input_dim``: ``params_per_dim * input_dim``. Binds the
        likelihood to D (:meth:`bind`)."""
        self.bind(input_dim)
        return input_dim * self.params_per_dim

    def forward(self, raw: torch.Tensor) -> dist.TorchDistribution:
        """p(x | z) from the decoder output ``raw (..., params_per_dim * D)``: batch ``raw.shape[:-1]``, event
        ``(D,)``."""
        raise NotImplementedError

    def mean(self, raw: torch.Tensor) -> torch.Tensor:
        """Expected image E[x | z], ``(..., D)``, for reconstructions and sample grids."""
        raise NotImplementedError
