"""The prior seam: the :class:`Prior` base class, the registry (:func:`register`, :func:`make_prior`,
:func:`prior_names`) and the default N(0, I) with its :class:`StandardNormal` fast path."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import ClassVar

import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from pyro_vae.config.specs import parse_component_spec, spec_int
from pyro_vae.errors import ConfigError, unknown_choice

__all__ = [
    "INIT_SEED",
    "Prior",
    "StandardNormal",
    "StandardPrior",
    "make_prior",
    "prior_names",
    "private_rng",
    "register",
    "seed_from",
]

_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))  # the very constant torch's Normal.log_prob subtracts
_REGISTRY: dict[str, type[Prior]] = {}
#: Seed of the private generator that learned priors draw their initial parameters from at construction. The global
#: RNG is left alone, so the networks a VAE builds after its prior get the same initial weights whatever the prior
#: (``compare --vary prior=...`` shares them); :meth:`Prior.initialise` re-draws from the run's seed before training.
INIT_SEED = 0


def register(cls: type[Prior]) -> type[Prior]:
    """Class decorator that registers a :class:`Prior` subclass under ``cls.name``."""
    if ":" in cls.name:
        raise ValueError(f"prior names may not contain ':', got {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def prior_names() -> list[str]:
    """Registered prior names, sorted (the CLI's ``--prior`` choices)."""
    return sorted(_REGISTRY)


class Prior(nn.Module):
    """Base class of a prior p(z) over ``L`` latent dimensions.

    :cvar str name: registry name.
    :cvar spec_option: the constructor keyword that ``name:K`` sets (``None``: the prior takes no ``:K``).
    :cvar bool standard_normal: whether p(z) is N(0, I), for which Pyro has closed-form KL divergences (the
        ``meanfield`` objective needs one).
    :param int latent_dim: L.
    """

    name: ClassVar[str]
    spec_option: ClassVar[str | None] = None
    standard_normal: ClassVar[bool] = False

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def forward(self, batch_size: int, like: torch.Tensor) -> dist.TorchDistribution:
        """p(z) for a minibatch: batch_shape ``(batch_size,)``, event_shape ``(L,)``, with ``like``'s dtype and
        device."""
        raise NotImplementedError

    def attach(self, encode: Callable[[torch.Tensor], dist.TorchDistribution], input_dim: int) -> None:
        """Called once by the VAE that owns this prior with its ``encode`` (x ↦ q(z | x)) and D. Priors built from the
        encoder (the VampPrior) keep ``encode``; the others ignore it."""

    def initialise(self, x: torch.Tensor, generator: torch.Generator) -> None:
        """Start the prior's parameters for a new run: :func:`~pyro_vae.train.fit` calls it once per new run (not on
        resume, where the checkpoint holds them) with the training images ``(N, D)`` and a CPU generator seeded from
        the run's seed. The VampPrior takes its pseudo-inputs from the images; the other learned priors re-draw their
        initial parameters from ``generator``; the standard prior has none. It is called again by a second ``fit``
        of the same VAE without ``resume``, which therefore starts the prior afresh."""

    def sample_codes(self, n: int, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` codes z ~ p(z), ``(n, L)``, without gradients. With a ``generator`` the draw depends only on it: the
        global RNG is forked, seeded from ``generator``, and restored."""
        with torch.no_grad():
            if generator is None:
                return self(n, like).sample()
            devices = [like.device] if like.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed_from(generator))
                return self(n, like).sample()


def seed_from(generator: torch.Generator) -> int:
    """One seed in ``[0, 2**62)`` drawn from ``generator`` (which advances)."""
    return int(torch.randint(2**62, (1,), generator=generator, device=generator.device))


@contextlib.contextmanager
def private_rng(seed: int) -> Iterator[None]:
    """Run the block on the CPU random stream seeded with ``seed``, and give the global stream back untouched: for
    initial parameters built on the CPU (a :class:`Prior` is built before the VAE moves to its device)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class StandardNormal(dist.Normal):
    """N(0, 1) whose ``log_prob`` is written out as ``−z²/2 − log √(2π)``.

    It is a :class:`~pyro.distributions.Normal` with ``loc=0`` and ``scale=1`` (``isinstance``, ``expand``,
    sampling and every registered KL work unchanged) and gives ``Normal(0, 1).log_prob`` bit for bit: with a zero
    mean and a unit scale the general formula's subtraction, division by 2·σ² and ``− log σ`` are exact. The prior's
    log-density is on every training step, and the general formula costs about twice the autograd nodes.

    :param like: a tensor whose dtype and device the distribution takes.
    """

    def __init__(self, like: torch.Tensor, validate_args: bool | None = None):
        super().__init__(like.new_zeros(()), like.new_ones(()), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return super().expand(batch_shape, self.__new__(type(self)) if _instance is None else _instance)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_p = value.square().mul(-0.5).sub(_LOG_SQRT_2PI)
        if value.shape != self._batch_shape:  # a value that does not cover the batch broadcasts against it
            log_p = log_p.expand(torch.broadcast_shapes(value.shape, self._batch_shape))
        return log_p


@register
class StandardPrior(Prior):
    """p(z) = N(0, I), the default: no parameters, closed-form KL against Gaussian guides, and the
    :class:`StandardNormal` fast path."""

    name = "standard"
    standard_normal = True

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        self._cache: dict[tuple, dist.TorchDistribution] = {}

    def forward(self, batch_size: int, like: torch.Tensor) -> dist.TorchDistribution:
        # Cached per batch size, device, dtype and validation setting (distributions are immutable and this one has
        # no parameters). A distribution keeps the validation setting it was built under: a prior built during the
        # validated first step and reused afterwards would go on validating, and a NaN latent would then raise
        # Pyro's ValueError instead of reaching the non-finite guard as a NaN loss.
        key = (batch_size, like.device, like.dtype, is_validation_enabled())
        prior = self._cache.get(key)
        if prior is None:
            prior = self._cache[key] = StandardNormal(like).expand([batch_size, self.latent_dim]).to_event(1)
        return prior

    def sample_codes(self, n: int, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, generator=generator, device=like.device, dtype=like.dtype)


def make_prior(spec: str, latent_dim: int, **options) -> Prior:
    """Build a registered prior.

    :param str spec: a registered name, optionally with ``:K`` for the prior's size option (``mog:10``).
    :param int latent_dim: L.
    :param options: keyword options of the prior's constructor.
    :raises ConfigError: an unknown name (with the closest match), a ``:K`` the prior does not take, K < 1.
    """
    parsed = parse_component_spec(spec, "prior")
    if parsed.name not in _REGISTRY:
        raise unknown_choice("prior", parsed.name, _REGISTRY)
    cls = _REGISTRY[parsed.name]
    if parsed.option is not None:
        if cls.spec_option is None:
            raise ConfigError(f"prior {parsed.name!r} takes no ':K' option, got {spec!r}; use plain {parsed.name!r}")
        options[cls.spec_option] = spec_int(parsed, "prior", cls.spec_option)
    return cls(latent_dim, **options)
