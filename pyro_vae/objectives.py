"""Training objectives: a factory over Pyro's ELBO estimators.

The product never writes its own Gaussian ELBO: the objective is a :class:`pyro.infer.ELBO` that
:class:`pyro.infer.SVI` evaluates on the traces of ``vae.model`` and ``vae.guide``.

=============  =====================================================================================
name           estimator
=============  =====================================================================================
``trace``      :class:`~pyro.infer.Trace_ELBO`: Monte Carlo ELBO with reparameterised samples (the seed)
``meanfield``  :class:`~pyro.infer.TraceMeanField_ELBO`: analytic KL(q ‖ p) where Pyro has it
=============  =====================================================================================

``num_particles > 1`` draws that many samples of z per image, vectorised over a particle plate.
"""

from __future__ import annotations

from collections.abc import Callable

from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from pyro_vae.errors import ConfigError, unknown_choice

#: The model nests one plate ("data"); vectorised particles add one more dimension to its left.
MAX_PLATE_NESTING = 1

_OBJECTIVES: dict[str, Callable[..., ELBO]] = {
    "trace": Trace_ELBO,
    "meanfield": TraceMeanField_ELBO,
}


def objective_names() -> list[str]:
    """Names accepted by :func:`make_objective` (the CLI's ``--objective`` choices)."""
    return sorted(_OBJECTIVES)


def make_objective(name: str = "trace", num_particles: int = 1) -> ELBO:
    """Build a Pyro ELBO by name.

    :param str name: one of :func:`objective_names`.
    :param int num_particles: samples of z per data point per step; vectorised when > 1.
    """
    if name not in _OBJECTIVES:
        raise unknown_choice("objective", name, _OBJECTIVES)
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles <= 0:
        raise ConfigError(f"num_particles must be a positive integer, got {num_particles!r}")
    return _OBJECTIVES[name](
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=MAX_PLATE_NESTING,
    )
