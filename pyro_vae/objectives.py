r"""Training objectives: a registry of Pyro ELBOs, including a plate-aware importance-weighted bound.

The product never writes its own Gaussian ELBO: every objective is a :class:`pyro.infer.ELBO` that
:class:`pyro.infer.SVI` evaluates on the traces of ``vae.model`` and ``vae.guide``. An objective is named by a spec
``name[:k[:estimator]]`` (parsed by :func:`pyro_vae.config.parse_objective_spec`):

=====================  ==========================================================================================
spec                   estimator
=====================  ==========================================================================================
``trace``              :class:`~pyro.infer.Trace_ELBO`: Monte Carlo ELBO with reparameterised samples (the seed)
``meanfield``          :class:`~pyro.infer.TraceMeanField_ELBO`: analytic KL(q ‖ p) where Pyro has it
``trace:k``            k vectorised particles per data point (likewise ``meanfield:k``)
``iwae:k``             :class:`IWAE_ELBO`: the importance-weighted bound with k particles, log-sum-exp per data point
``iwae:k:stl``         the same bound with the sticking-the-landing gradient (Roeder et al. 2017)
``iwae:k:dreg``        the same bound with the doubly reparameterised gradient (Tucker et al. 2018)
=====================  ==========================================================================================

New objectives are added with :func:`register_objective`; the CLI's ``--objective`` choices are
:func:`objective_names`.

References

[1] Importance Weighted Autoencoders, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov (2016)

[2] Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational Inference, Geoffrey Roeder,
    Yuhuai Wu, David Duvenaud (2017)

[3] Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives, George Tucker, Dieterich Lawson, Shixiang
    Gu, Chris J. Maddison (2018)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from pyro.distributions.util import detach
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled
from pyro.util import check_if_enumerated, warn_if_nan

from pyro_vae.config import check_int, parse_objective_spec
from pyro_vae.errors import ConfigError, unknown_choice
from pyro_vae.importance import MAX_PLATE_NESTING, log_mean_exp, log_weights

__all__ = [
    "IWAE_ELBO",
    "MAX_PLATE_NESTING",
    "ObjectiveEntry",
    "make_objective",
    "objective_names",
    "register_objective",
]


def _detached_log_prob(site) -> torch.Tensor:
    """``log q(z)`` with the distribution's parameters detached: gradients reach the guide only through z."""
    return detach(site["fn"]).log_prob(site["value"])


def _param_leaves(trace) -> list[torch.Tensor]:
    """The unconstrained tensors of a trace's param sites (what :class:`~pyro.infer.SVI` steps), in trace order."""
    leaves: dict[int, torch.Tensor] = {}
    for site in trace.nodes.values():
        if site["type"] == "param":
            leaf = site["value"].unconstrained()
            if leaf.requires_grad:
                leaves.setdefault(id(leaf), leaf)
    return list(leaves.values())


class IWAE_ELBO(ELBO):
    r"""The importance-weighted bound of Burda et al. [1], with the log-sum-exp taken per data point, inside the
    data plate.

    With K particles :math:`z_{ki} = g_\phi(\epsilon_{ki}, x_i)` drawn from the guide in a vectorised particle plate
    and :math:`\log w_{ki} = \log p_\theta(x_i, z_{ki}) - \log q_\phi(z_{ki} \mid x_i)`,

    .. math::

        \mathcal{L}_K(x_i) = \log \frac{1}{K} \sum_{k=1}^K w_{ki}, \qquad
        \text{loss} = -\frac{N}{B} \sum_{i \in \text{batch}} \mathcal{L}_K(x_i),

    so the minibatch loss is an unbiased estimate of the full-data bound, like Pyro's other ELBOs. The N/B scale of
    the data plate multiplies each data point's bound; it is not inside the log-sum-exp, and neither are the other
    data points. (``RenyiELBO(alpha=0)`` takes its log-sum-exp over the plate-scaled log-weights, so under
    subsampling it is not (N/B) times the IW bound; Pyro #3104.) With K = 1 the bound is the ELBO. Any other scale on a
    latent site (a KL weight β from :mod:`pyro_vae.schedules`) multiplies that site's log-densities inside
    :math:`\log w`.

    Gradient estimators, with normalised weights :math:`\tilde w_{ki} = w_{ki} / \sum_{k'} w_{k'i}`:

    * ``reparam`` (default): the gradient of the bound itself,
      :math:`\sum_k \tilde w_k \nabla_{\theta,\phi} \log w_k`, through z and through q's parameters.
    * ``stl`` (Roeder et al. [2]): :math:`\sum_k \tilde w_k \nabla [\log p_\theta(x, z_k) - \log q_{\bot\phi}(z_k
      \mid x)]`, with q's parameters detached (:math:`\bot`), which drops the score-function term. Unbiased for
      K = 1; for K > 1 it is biased (Tucker et al. [3], §4), and vanishes with zero variance when q is the exact
      posterior.
    * ``dreg`` (Tucker et al. [3], eq. 7): the decoder (every param site of the model, θ) gets the ``reparam``
      gradient :math:`\sum_k \tilde w_k \nabla_\theta \log p_\theta(x, z_k)` (z does not depend on θ); the encoder
      (every param site of the guide, φ) gets the doubly reparameterised gradient

      .. math::

          \nabla_\phi \mathcal{L}_K = \mathbb{E}\Big[\sum_k \tilde w_k^2\,
          \frac{\partial \log w_k}{\partial z_k} \frac{\partial z_k}{\partial \phi}\Big],

      unbiased for every K, whose variance does not grow with K as the ``reparam`` encoder gradient's
      signal-to-noise ratio decays.

    The estimators are surrogates differentiated by autograd, with :math:`\operatorname{sg}` the stop-gradient and
    :math:`\log w^\bot` the log-weight with q's parameters detached:

    ===========  ===============================================================================================
    estimator    surrogate (to maximise)
    ===========  ===============================================================================================
    ``reparam``  :math:`\sum_i \operatorname{logsumexp}_k \log w_{ki}`
    ``stl``      :math:`\sum_i \operatorname{logsumexp}_k \log w^\bot_{ki}`
    ``dreg``     :math:`\sum_{ki} \operatorname{sg}(\tilde w_{ki}^2) \log w^\bot_{ki}` back-propagated into the guide's
                 parameters only, and :math:`\sum_{ki} \operatorname{sg}(\tilde w_{ki}) \log w^\bot_{ki}` into the
                 model's only
    ===========  ===============================================================================================

    ``dreg`` therefore needs disjoint model and guide parameters, and has no single differentiable loss
    (:meth:`differentiable_loss` refuses it; :meth:`loss_and_grads`, which :class:`~pyro.infer.SVI` calls, works).
    Every latent site of the guide must be reparameterised. ``stl`` and ``dreg`` detach the guide distribution's
    parameters with :func:`pyro.distributions.util.detach`; with several latent sites where one site's distribution
    depends on another's sample, that also cuts the dependence on the earlier sample, so they are meant for guides
    whose latent sites are conditionally independent given x (every family in :mod:`pyro_vae.guides`).

    :param int num_particles: K, drawn in a vectorised particle plate (default 5).
    :param str estimator: ``reparam``, ``stl`` or ``dreg``.
    :param int max_plate_nesting: plates in the model (1: the data plate).
    """

    estimators = ("reparam", "stl", "dreg")

    def __init__(self, num_particles: int = 5, estimator: str = "reparam", max_plate_nesting: int = MAX_PLATE_NESTING):
        check_int("num_particles", num_particles, low=1)
        if estimator not in self.estimators:
            raise unknown_choice("IWAE gradient estimator", estimator, self.estimators)
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting, vectorize_particles=True)
        self.estimator = estimator

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and not site["fn"].has_rsample:
                raise NotImplementedError(
                    f"IWAE_ELBO needs reparameterised latent sites, but guide site {name!r} "
                    f"({type(site['fn']).__name__}) has no rsample"
                )
        return model_trace, guide_trace

    def _traces(self, model, guide, args, kwargs):
        # One vectorised trace pair: Pyro's ELBO puts the K particles in a plate left of the data plate.
        return next(iter(self._get_traces(model, guide, args, kwargs)))

    def _log_weights(self, model_trace, guide_trace) -> tuple[torch.Tensor, float]:
        detached = None if self.estimator == "reparam" else _detached_log_prob
        terms = log_weights(model_trace, guide_trace, self.num_particles, guide_log_prob=detached)
        return terms.log_weight, terms.scale  # (K, B), N / B

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The negative bound, ``-(N/B) Σ_i L_K(x_i)``, as a float (no gradients)."""
        with torch.no_grad():
            model_trace, guide_trace = self._traces(model, guide, args, kwargs)
            terms = log_weights(model_trace, guide_trace, self.num_particles)
            loss = -(terms.scale * log_mean_exp(terms.log_weight, 0).sum()).item()
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The negative bound as a tensor whose gradient is the ``reparam`` or ``stl`` estimator.

        :raises NotImplementedError: for ``dreg``, whose encoder and decoder gradients come from two different
            surrogates; use :meth:`loss_and_grads`.
        """
        if self.estimator == "dreg":
            raise NotImplementedError(
                "the dreg estimator gives the encoder and the decoder different surrogates, so it has no single "
                "differentiable loss; use loss_and_grads (SVI does), or estimator='reparam' or 'stl'"
            )
        model_trace, guide_trace = self._traces(model, guide, args, kwargs)
        log_w, scale = self._log_weights(model_trace, guide_trace)
        loss = -scale * log_mean_exp(log_w, 0).sum()
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Estimate the loss and accumulate the chosen estimator's gradient into the parameters' ``.grad``.

        :returns: the negative bound, a float.
        """
        model_trace, guide_trace = self._traces(model, guide, args, kwargs)
        log_w, scale = self._log_weights(model_trace, guide_trace)  # (K, B)
        loss = -(scale * log_mean_exp(log_w.detach(), 0).sum()).item()
        warn_if_nan(loss, "loss")
        if not log_w.requires_grad:
            return loss
        if self.estimator != "dreg":
            (-scale * log_mean_exp(log_w, 0).sum()).backward(retain_graph=self.retain_graph)
            return loss
        guide_params, model_params = _param_leaves(guide_trace), _param_leaves(model_trace)
        shared = {id(p) for p in guide_params} & {id(p) for p in model_params}
        if shared:
            raise ValueError(
                f"the dreg estimator sends different gradients to the model's and the guide's parameters, but "
                f"{len(shared)} parameter(s) appear in both; use estimator='reparam' or 'stl'"
            )
        weights = torch.softmax(log_w.detach(), dim=0)  # (K, B): the normalised weights w~
        if guide_params:
            encoder_surrogate = -scale * (weights.square() * log_w).sum()
            torch.autograd.backward(encoder_surrogate, inputs=guide_params, retain_graph=True)
        if model_params:
            decoder_surrogate = -scale * (weights * log_w).sum()
            torch.autograd.backward(decoder_surrogate, inputs=model_params, retain_graph=self.retain_graph)
        return loss


class ObjectiveEntry(NamedTuple):
    """A registered objective.

    :ivar build: ``build(num_particles, estimator) -> ELBO``; ``estimator`` is ``None`` when the spec names none.
    :ivar estimators: the gradient estimators a spec ``name:k:estimator`` may name (empty: none).
    """

    build: Callable[[int, str | None], ELBO]
    estimators: tuple[str, ...] = ()


def _pyro_elbo(cls: type[ELBO]) -> Callable[[int, str | None], ELBO]:
    def build(num_particles: int, estimator: str | None) -> ELBO:
        return cls(
            num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=MAX_PLATE_NESTING
        )

    return build


_OBJECTIVES: dict[str, ObjectiveEntry] = {}


def register_objective(name: str, build: Callable[[int, str | None], ELBO], estimators: tuple[str, ...] = ()) -> None:
    """Add an objective to the registry.

    :param str name: the spec's base name (no ``:``).
    :param build: ``build(num_particles, estimator) -> ELBO``.
    :param estimators: names accepted as the spec's third field.
    """
    if not name or ":" in name:
        raise ValueError(f"objective names must be non-empty and contain no ':', got {name!r}")
    _OBJECTIVES[name] = ObjectiveEntry(build, tuple(estimators))


register_objective("trace", _pyro_elbo(Trace_ELBO))
register_objective("meanfield", _pyro_elbo(TraceMeanField_ELBO))
register_objective(
    "iwae", lambda k, estimator: IWAE_ELBO(k, estimator or "reparam", MAX_PLATE_NESTING), IWAE_ELBO.estimators
)


def objective_names() -> list[str]:
    """Base names accepted by :func:`make_objective` (the CLI's ``--objective`` choices)."""
    return sorted(_OBJECTIVES)


def make_objective(name: str = "trace", num_particles: int = 1, *, enumerate: bool = False) -> ELBO:
    """Build a Pyro ELBO from a spec.

    :param str name: ``name[:k[:estimator]]`` with ``name`` one of :func:`objective_names`, e.g. ``"trace"``,
        ``"iwae:5"`` or ``"iwae:5:dreg"``.
    :param int num_particles: samples of z per data point per step (vectorised when > 1); a k in the spec sets it
        instead, and the two may not disagree.
    :param bool enumerate: the guide enumerates a discrete site (M2's y): ``trace`` becomes
        :class:`~pyro.infer.TraceEnum_ELBO`, which sums it out exactly; the other objectives are refused.
    :raises ConfigError: for an unknown name or estimator, a malformed spec, or conflicting particle counts.
    """
    spec = parse_objective_spec(name)
    if enumerate:
        if spec.name != "trace":
            raise ConfigError(
                f"a model that enumerates a discrete site trains with objective 'trace' (TraceEnum_ELBO), not {name!r}"
            )
        k = spec.num_particles or num_particles
        # A step whose images are all labelled has nothing to enumerate: legitimate, so no warning about it.
        return TraceEnum_ELBO(
            num_particles=k, vectorize_particles=k > 1, max_plate_nesting=MAX_PLATE_NESTING,
            strict_enumeration_warning=False,
        )  # fmt: skip
    if spec.name not in _OBJECTIVES:
        raise unknown_choice("objective", spec.name, _OBJECTIVES)
    check_int("num_particles", num_particles, low=1)
    if spec.num_particles is not None and num_particles not in (1, spec.num_particles):
        raise ConfigError(
            f"objective {name!r} asks for {spec.num_particles} particles but num_particles is {num_particles}; "
            "give the number once"
        )
    entry = _OBJECTIVES[spec.name]
    if spec.estimator is not None and spec.estimator not in entry.estimators:
        if not entry.estimators:
            raise ConfigError(
                f"objective {spec.name!r} takes no gradient estimator, got {name!r}; estimators belong to iwae, "
                "e.g. 'iwae:5:dreg'"
            )
        raise unknown_choice(f"gradient estimator for {spec.name!r}", spec.estimator, entry.estimators)
    return entry.build(spec.num_particles or num_particles, spec.estimator)
