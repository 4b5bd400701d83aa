r"""KL schedules: the weight of the KL term over training, applied to the latent site of the model and the guide
together.

A schedule multiplies the log-densities of the latent site ``"z"`` in **both** programs by a weight β, leaving the
observed site alone, so that every Pyro ELBO estimates

.. math::

    \mathbb{E}_q[\log p(x \mid z)] + \beta\, \mathbb{E}_q[\log p(z) - \log q(z \mid x)]
    = \text{reconstruction} - \beta\, \mathrm{KL}(q \,\|\, p).

With ``iwae`` the weight multiplies :math:`\log p(z) - \log q(z \mid x)` inside every importance weight, before the
log-sum-exp. Scaling only the prior's site would leave :math:`-\mathbb{E}_q[\log q]` at weight 1 and estimate
something else; that is why :func:`kl_scaled` wraps the model and the guide with the same schedule. The weight is put
on the site's ``scale``, as :func:`pyro.poutine.scale` does, by :class:`KLScaleMessenger`, which touches only the
named sites and, unlike ``poutine.scale``, accepts β = 0.

================================  ==========================================================================
spec                              schedule
================================  ==========================================================================
``constant:β``                    :class:`Constant`: β at every step (β-VAE, Higgins et al. 2017)
``linear:S[:β0]``                 :class:`LinearWarmup`: β rises linearly from β0 (default 0) to 1 over S steps
``cyclical:P[:R]``                :class:`Cyclical`: Fu et al. (2019); every P steps, β rises from 0 to 1 during the
                                  first fraction R (default 0.5) of the cycle and stays at 1 for the rest
``free_bits:λ``                   :class:`FreeBits`: Kingma et al. (2016); the KL of a dimension whose minibatch
                                  average is below λ nats is not penalised
================================  ==========================================================================

Each schedule is a small stateful object: :meth:`KLSchedule.step` advances it after every optimiser step,
:attr:`KLSchedule.value` is the weight to log, and :meth:`KLSchedule.state_dict` / :meth:`KLSchedule.load_state_dict`
let a checkpoint carry it. New schedules subclass :class:`KLSchedule` and are added with :func:`register`.

A schedule whose whole effect is its number β (:attr:`KLSchedule.scalar_weight`: all but ``free_bits``) also runs in
the compiled step (:mod:`pyro_vae.compile`), which traces its graph under :meth:`KLSchedule.weight_input` so that β
is an input of the graph, written before every step, rather than a constant frozen at the step it was traced.

References

[1] beta-VAE: Learning Basic Visual Concepts with a Constrained Variational Framework, I. Higgins et al. (2017)

[2] Cyclical Annealing Schedule: A Simple Approach to Mitigating KL Vanishing, H. Fu et al. (2019)

[3] Improved Variational Inference with Inverse Autoregressive Flow, D. P. Kingma et al. (2016), appendix C.8
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import pyro.distributions as dist
import torch
from pyro.distributions.util import detach
from pyro.poutine.messenger import Messenger
from torch.distributions import kl_divergence

from pyro_vae.config import check_float, parse_schedule_spec
from pyro_vae.errors import ConfigError, unknown_choice

__all__ = [
    "Constant",
    "Cyclical",
    "FreeBits",
    "KLScaleMessenger",
    "KLSchedule",
    "LinearWarmup",
    "kl_scaled",
    "make_schedule",
    "register",
    "schedule_names",
]

_REGISTRY: dict[str, type[KLSchedule]] = {}
_EMPTY = torch.Size()


def register(cls: type[KLSchedule]) -> type[KLSchedule]:
    """Class decorator that adds a :class:`KLSchedule` subclass to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def schedule_names() -> list[str]:
    """Registered schedule names, sorted (the CLI's ``--kl-schedule`` choices)."""
    return sorted(_REGISTRY)


class KLSchedule:
    """Base class: a KL weight that changes with the number of optimiser steps taken.

    Subclasses set :attr:`name` and :attr:`arg_names` (the spec's numbers, in order; those after
    :attr:`required_args` are optional) and implement :meth:`beta`.

    :cvar str name: registry name.
    :cvar tuple arg_names: constructor arguments that a spec ``name:a:b`` fills, in order.
    :cvar int required_args: how many of them the spec must give.
    """

    name: ClassVar[str]
    arg_names: ClassVar[tuple[str, ...]] = ()
    required_args: ClassVar[int] = 0

    def __init__(self):
        self.steps = 0
        self._weight_input: torch.Tensor | None = None

    def beta(self) -> float:
        """β at the current step."""
        raise NotImplementedError

    def unfinished_warning(self, total_steps: int) -> str | None:
        """One line when this schedule would leave the run on a down-weighted KL term after ``total_steps`` steps
        (a warm-up longer than the run), else ``None``. Schedules whose weight below 1 is the point (``constant``,
        ``cyclical``) return ``None``."""
        return None

    @property
    def scalar_weight(self) -> bool:
        """Whether the schedule's whole effect is the number :meth:`beta` on the latent site's scale (it does not
        override :meth:`process`), so that a compiled step can take β as an input of its graph
        (:meth:`weight_input`). ``False`` for :class:`FreeBits`, whose weights depend on the minibatch."""
        return type(self).process is KLSchedule.process

    @contextlib.contextmanager
    def weight_input(self, weight: torch.Tensor) -> Iterator[None]:
        """Inside this context :meth:`process` weights the latent site by ``weight``, a 0-dim tensor, instead of by
        the number :meth:`beta`. The compiled step (:mod:`pyro_vae.compile`) traces its graph here with ``weight`` as
        one of the graph's inputs and writes :meth:`beta` into it before every step, so one graph serves every β
        (β = 0 included: the scale is multiplied, never validated).

        :param torch.Tensor weight: a 0-dim floating tensor.
        :raises ValueError: for a schedule without a scalar weight (:attr:`scalar_weight` is ``False``).
        """
        if not self.scalar_weight:
            raise ValueError(f"the {self.name} KL schedule has no scalar weight to take as an input")
        self._weight_input = weight
        try:
            yield
        finally:
            self._weight_input = None

    @property
    def value(self) -> float:
        """The KL weight applied at the current step (what training logs)."""
        return self.beta()

    def step(self) -> None:
        """Advance by one optimiser step."""
        self.steps += 1

    def options(self) -> dict[str, float]:
        """The constructor's arguments, as the spec gave them."""
        return {name: getattr(self, name) for name in self.arg_names}

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint: the name, the options and the step count."""
        return {"name": self.name, "options": self.options(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step count from :meth:`state_dict`.

        :raises ConfigError: if the checkpoint holds another schedule or other options than this one.
        """
        theirs = (state.get("name"), state.get("options"))
        if theirs != (self.name, self.options()):
            raise ConfigError(
                f"the checkpoint's KL schedule is {theirs[0]!r} with {theirs[1]} but this run's is {self.name!r} with "
                f"{self.options()}; resume with the schedule the run was started with"
            )
        self.steps = int(state["steps"])

    def process(self, msg: dict, role: str) -> None:
        """Weight the latent site in ``msg`` (called for the model's and the guide's site alike).

        :param msg: the Pyro message of the latent sample site.
        :param str role: ``"model"`` or ``"guide"``.
        """
        if self._weight_input is not None:  # a traced graph's input: always multiply, whatever its value now
            msg["scale"] = self._weight_input * msg["scale"]
            return
        beta = self.beta()
        if beta != 1.0:
            msg["scale"] = beta * msg["scale"]

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{type(self).__name__}({options}; steps={self.steps})"


@register
class Constant(KLSchedule):
    """β at every step; β = 1 is the ELBO, β > 1 the β-VAE, β = 0 drops the KL term.

    :param float weight: β >= 0 (default 1).
    """

    name = "constant"
    arg_names = ("weight",)
    required_args = 1

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(check_float("the constant KL schedule's weight", weight, low=0.0))

    def beta(self) -> float:
        return self.weight


@register
class LinearWarmup(KLSchedule):
    r""":math:`\beta_t = \beta_0 + (1 - \beta_0) \min(1, t / S)` after t steps.

    :param float warmup_steps: S > 0.
    :param float start: β0 in [0, 1] (default 0).
    """

    name = "linear"
    arg_names = ("warmup_steps", "start")
    required_args = 1

    def __init__(self, warmup_steps: float, start: float = 0.0):
        super().__init__()
        self.warmup_steps = float(
            check_float("the linear KL schedule's warm-up length", warmup_steps, low=0.0, open_low=True)
        )
        self.start = float(check_float("the linear KL schedule's start", start, low=0.0, high=1.0))

    def beta(self) -> float:
        return self.start + (1.0 - self.start) * min(1.0, self.steps / self.warmup_steps)

    def unfinished_warning(self, total_steps: int) -> str | None:
        if self.warmup_steps <= total_steps:
            return None
        return (
            f"the KL warm-up linear:{self.warmup_steps:g} reaches weight 1 after {self.warmup_steps:g} steps but this "
            f"run takes {total_steps}, so it ends on a down-weighted KL term; raise --epochs, or pass a shorter "
            f"--kl-schedule linear:N (N <= {total_steps}) or --kl-schedule none"
        )


@register
class Cyclical(KLSchedule):
    r"""Fu et al. (2019): with :math:`\tau = (t \bmod P) / P`, :math:`\beta_t = \min(1, \tau / R)`.

    :param float period: P > 0 steps per cycle.
    :param float ratio: R in (0, 1], the fraction of a cycle spent rising (default 0.5).
    """

    name = "cyclical"
    arg_names = ("period", "ratio")
    required_args = 1

    def __init__(self, period: float, ratio: float = 0.5):
        super().__init__()
        self.period = float(check_float("the cyclical KL schedule's period", period, low=0.0, open_low=True))
        self.ratio = float(check_float("the cyclical KL schedule's ratio", ratio, low=0.0, high=1.0, open_low=True))

    def beta(self) -> float:
        tau = (self.steps % self.period) / self.period
        return min(1.0, tau / self.ratio)


def _normal_marginals(fn) -> dist.Normal:
    # Free bits needs the KL of each dimension, which exists only when the distribution factorises over them.
    if isinstance(fn, dist.Independent) and fn.reinterpreted_batch_ndims == 1 and isinstance(fn.base_dist, dist.Normal):
        return fn.base_dist
    if isinstance(fn, dist.MultivariateNormal):
        tril = fn.scale_tril
        diagonal = tril.diagonal(dim1=-2, dim2=-1)
        if torch.equal(tril, torch.diag_embed(diagonal)):
            return dist.Normal(fn.loc, diagonal)
    raise ConfigError(
        f"the free_bits KL schedule needs a latent distribution that factorises over dimensions with Normal "
        f"marginals (guides mvn_diag, diag_normal; a standard normal prior), got {type(fn).__name__}; use another "
        "guide family or another KL schedule"
    )


class _DimensionWeighted(dist.TorchDistribution):
    r"""``fn`` with its log-density reweighted per dimension: :math:`\sum_d w_d \log f_d(z_d)`, where :math:`f_d`
    are the Normal marginals of the factorised ``fn``; sampling is ``fn``'s. The weights are read when the
    log-density is computed, so the guide's site (traced before the model's) gets the weights the model's site set.
    """

    arg_constraints: ClassVar[dict] = {}

    def __init__(self, base: dist.TorchDistribution, schedule: FreeBits):
        self.base = base
        self.schedule = schedule
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    @property
    def has_rsample(self) -> bool:
        return self.base.has_rsample

    def expand(self, batch_shape, _instance=None):
        return _DimensionWeighted(self.base.expand(batch_shape), self.schedule)

    def sample(self, sample_shape=_EMPTY):
        return self.base.sample(sample_shape)

    def rsample(self, sample_shape=_EMPTY):
        return self.base.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        weights = self.schedule.weights  # (L,)
        if weights is None:
            raise RuntimeError("free_bits has no weights yet: the model's latent site must be traced with the guide's")
        return (weights * _normal_marginals(self.base).log_prob(value)).sum(-1)

    def __deepcopy__(self, memo):
        # pyro.distributions.util.detach deep-copies distributions (STL, DReG); the schedule is shared state.
        return _DimensionWeighted(detach(self.base), self.schedule)


@register
class FreeBits(KLSchedule):
    r"""Free bits per dimension (Kingma et al. 2016, appendix C.8): the objective

    .. math::

        \mathbb{E}_q[\log p(x \mid z)] - \sum_d \max\big(\lambda, \overline{\mathrm{KL}}_d\big), \qquad
        \overline{\mathrm{KL}}_d = \frac{1}{B} \sum_i \mathrm{KL}(q(z_d \mid x_i) \,\|\, p(z_d)),

    whose gradient ignores the KL of every dimension whose minibatch average :math:`\overline{\mathrm{KL}}_d` is
    below the budget λ. It is applied as a per-dimension weight :math:`w_d = 1[\overline{\mathrm{KL}}_d \ge \lambda]`
    on the latent site's log-densities in the model and the guide (the factorised densities are
    :math:`\sum_d w_d \log f_d(z_d)`); :math:`\overline{\mathrm{KL}}_d` is computed in closed form from the Normal
    marginals at every step, before the weights are applied. The loss then omits the constant λ of each free
    dimension, so it is a surrogate, not the ELBO; evaluate models with :mod:`pyro_vae.evaluation`.

    Needs a latent site that factorises over dimensions with Normal marginals, in both programs (``mvn_diag``,
    ``diag_normal`` and the standard normal prior); anything else is refused with a :class:`ConfigError`.
    :attr:`value` is the fraction of dimensions penalised at the last step.

    :param float budget: λ >= 0, nats per dimension.
    """

    name = "free_bits"
    arg_names = ("budget",)
    required_args = 1

    def __init__(self, budget: float):
        super().__init__()
        self.budget = float(check_float("the free_bits KL schedule's budget", budget, low=0.0))
        self.weights: torch.Tensor | None = None
        self._guide_marginals: dist.Normal | None = None

    def beta(self) -> float:
        return 1.0 if self.weights is None else float(self.weights.mean())

    def process(self, msg: dict, role: str) -> None:
        fn = msg["fn"]
        marginals = _normal_marginals(fn)
        if role == "guide":
            # The guide runs first: keep q's marginals until the model's site brings the prior's.
            self._guide_marginals = marginals
        else:
            if self._guide_marginals is None:
                raise RuntimeError("free_bits saw the model's latent site before the guide's; run the guide first")
            with torch.no_grad():
                q = dist.Normal(self._guide_marginals.loc.detach(), self._guide_marginals.scale.detach())
                p = dist.Normal(marginals.loc.detach(), marginals.scale.detach())
                kl = kl_divergence(q, p)  # (..., B, L)
                mean_kl = kl.reshape(-1, kl.shape[-1]).mean(0)  # (L,)
                self.weights = (mean_kl >= self.budget).to(kl.dtype)
            self._guide_marginals = None
        msg["fn"] = _DimensionWeighted(fn, self)


class KLScaleMessenger(Messenger):
    """A poutine handler that hands the named latent sites of one program to a :class:`KLSchedule`.

    Observed sites and all other sites pass untouched.

    :param KLSchedule schedule: the schedule.
    :param str role: ``"model"`` or ``"guide"``.
    :param sites: names of the latent sites to weight (default ``("z",)``).
    """

    def __init__(self, schedule: KLSchedule, role: str, sites=("z",)):
        super().__init__()
        if role not in ("model", "guide"):
            raise ValueError(f"role must be 'model' or 'guide', got {role!r}")
        self.schedule = schedule
        self.role = role
        self.sites = frozenset(sites)

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and msg["name"] in self.sites and not msg["is_observed"]:
            self.schedule.process(msg, self.role)


def kl_scaled(model, guide, schedule: KLSchedule, sites=("z",)):
    """Wrap a model and its guide so that ``schedule`` weights their latent sites together.

    :param model: the Pyro model, e.g. ``vae.model``.
    :param guide: its guide, e.g. ``vae.guide``.
    :param KLSchedule schedule: the schedule (step it after every optimiser step).
    :param sites: the latent sites to weight (default ``("z",)``).
    :returns: ``(model, guide)`` to hand to :class:`~pyro.infer.SVI`.
    """
    return KLScaleMessenger(schedule, "model", sites)(model), KLScaleMessenger(schedule, "guide", sites)(guide)


def make_schedule(spec: str | None) -> KLSchedule | None:
    """Build a KL schedule from a spec such as ``"linear:10000"``; ``None`` gives ``None`` (the plain ELBO).

    :param spec: ``name[:number[:number]]`` with ``name`` one of :func:`schedule_names` (see the module docstring).
    :raises ConfigError: for an unknown name, a wrong number of arguments, or an argument out of range.
    """
    if spec is None:
        return None
    name, args = parse_schedule_spec(spec)
    if name not in _REGISTRY:
        raise unknown_choice("KL schedule", name, _REGISTRY)
    cls = _REGISTRY[name]
    if not cls.required_args <= len(args) <= len(cls.arg_names):
        expected = ":".join([name, *cls.arg_names[: cls.required_args]])
        optional = "".join(f"[:{a}]" for a in cls.arg_names[cls.required_args :])
        raise ConfigError(f"KL schedule {spec!r} has {len(args)} number(s); write {expected}{optional}")
    return cls(*args)
