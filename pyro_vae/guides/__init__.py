"""Registry of guide families.

``make_family("mvn_diag", latent_dim=16)`` builds a family by name. A ``"name:K"`` spec sets the family's main
size option (for example ``low_rank:4``, ``iaf:2``). New families register with :func:`register`::

    @register
    class MyFamily(GuideFamily):
        name = "my_family"
        ...
"""

from __future__ import annotations

import inspect

from pyro_vae.errors import ConfigError, unknown_choice
from pyro_vae.guides.base import GuideFamily
from pyro_vae.guides.flows import (
    IAF,
    NAF,
    ConditionalFlowFamily,
    FlowFamily,
    HouseholderFlow,
    PlanarFlow,
    RadialFlow,
    SplineFlow,
)
from pyro_vae.guides.gaussian import DiagNormal, FullRank, LowRank, MVNDiag
from pyro_vae.guides.sylvester import HouseholderSylvester, OrthogonalSylvester, SylvesterFamily, TriangularSylvester

__all__ = [
    "GuideFamily",
    "MVNDiag",
    "DiagNormal",
    "FullRank",
    "LowRank",
    "FlowFamily",
    "ConditionalFlowFamily",
    "IAF",
    "PlanarFlow",
    "RadialFlow",
    "HouseholderFlow",
    "SplineFlow",
    "NAF",
    "SylvesterFamily",
    "OrthogonalSylvester",
    "HouseholderSylvester",
    "TriangularSylvester",
    "register",
    "make_family",
    "family_names",
    "parse_spec",
]

_REGISTRY: dict[str, type[GuideFamily]] = {}


def register(cls: type[GuideFamily]) -> type[GuideFamily]:
    """Class decorator that registers a :class:`GuideFamily` subclass under ``cls.name``."""
    if ":" in cls.name:
        raise ValueError(f"guide family names may not contain ':', got {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def family_names() -> list[str]:
    """Registered family names, sorted (the CLI's ``--guide`` choices)."""
    return sorted(_REGISTRY)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split ``"low_rank:4"`` into ``("low_rank", "4")``; a spec without ``:`` gives ``(spec, None)``."""
    name, sep, arg = str(spec).partition(":")
    return name, (arg if sep else None)


def make_family(name: str, latent_dim: int, **options) -> GuideFamily:
    """Build a registered guide family.

    :param str name: a registered name, optionally with ``:K`` for the family's size option.
    :param int latent_dim: L.
    :param options: keyword options of the family's constructor.
    :returns: the family, an ``nn.Module`` with ``num_params``.
    """
    base, arg = parse_spec(name)
    if base not in _REGISTRY:
        raise unknown_choice("guide family", base, _REGISTRY)
    cls = _REGISTRY[base]
    if arg is not None:
        if cls.spec_option is None:
            raise ConfigError(f"guide family {base!r} takes no ':K' option, got {name!r}; use plain {base!r}")
        try:
            value = int(arg)
        except ValueError:
            raise ConfigError(f"in guide spec {name!r}, {arg!r} is not an integer; write e.g. {base}:4") from None
        if value <= 0:
            raise ConfigError(f"in guide spec {name!r}, {cls.spec_option} must be a positive integer, got {value}")
        options[cls.spec_option] = value
    try:
        inspect.signature(cls).bind(latent_dim, **options)
    except TypeError as err:
        raise ConfigError(f"bad options {sorted(options)} for guide family {base!r}: {err}") from None
    return cls(latent_dim, **options)


for _family in (
    MVNDiag,
    DiagNormal,
    FullRank,
    LowRank,
    IAF,
    PlanarFlow,
    RadialFlow,
    HouseholderFlow,
    SplineFlow,
    NAF,
    OrthogonalSylvester,
    HouseholderSylvester,
    TriangularSylvester,
):
    register(_family)
