"""pyro_vae: variational autoencoders written as Pyro programs, with swappable amortised guide families.

The public API is re-exported here lazily (PEP 562), so that ``import pyro_vae`` and ``pyro-vae --help`` stay fast;
torch and Pyro load on first use of a name. ``plotting`` and ``cli`` are not re-exported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "DataConfig": "pyro_vae.config",
    "ModelConfig": "pyro_vae.config",
    "TrainConfig": "pyro_vae.config",
    "RunConfig": "pyro_vae.config",
    "PyroVAEError": "pyro_vae.errors",
    "ConfigError": "pyro_vae.errors",
    "DataError": "pyro_vae.errors",
    "CheckpointError": "pyro_vae.errors",
    "NonFiniteLossError": "pyro_vae.errors",
    "Dataset": "pyro_vae.data",
    "load_dataset": "pyro_vae.data",
    "GuideFamily": "pyro_vae.guides",
    "make_family": "pyro_vae.guides",
    "family_names": "pyro_vae.guides",
    "register_family": "pyro_vae.guides",
    "make_likelihood": "pyro_vae.likelihoods",
    "likelihood_names": "pyro_vae.likelihoods",
    "Likelihood": "pyro_vae.likelihoods",
    "Prior": "pyro_vae.priors",
    "make_prior": "pyro_vae.priors",
    "prior_names": "pyro_vae.priors",
    "register_prior": "pyro_vae.priors",
    "make_networks": "pyro_vae.networks",
    "network_names": "pyro_vae.networks",
    "register_network": "pyro_vae.networks",
    "VAE": "pyro_vae.model",
    "AmortizedGuide": "pyro_vae.autoguide",
    "LinearGaussianVAE": "pyro_vae.linear_gaussian",
    "make_objective": "pyro_vae.objectives",
    "SingleOptimizer": "pyro_vae.optim",
    "adamw": "pyro_vae.optim",
    "evaluate_elbo": "pyro_vae.evaluation",
    "evaluate": "pyro_vae.evaluation",
    "EvalResult": "pyro_vae.evaluation",
    "inference_gaps": "pyro_vae.gaps",
    "make_schedule": "pyro_vae.schedules",
    "fit": "pyro_vae.train",
    "FitResult": "pyro_vae.train",
    "save_checkpoint": "pyro_vae.checkpoint",
    "load_checkpoint": "pyro_vae.checkpoint",
    "TrainingState": "pyro_vae.checkpoint",
    "RunDir": "pyro_vae.run_dir",
    "Run": "pyro_vae.run_dir",
    "load_run": "pyro_vae.run_dir",
}
_ALIASES = {"register_family": "register", "register_prior": "register"}

__all__ = [
    "register_network",
    "network_names",
    "make_networks",
    "register_prior",
    "prior_names",
    "make_prior",
    "likelihood_names",
    "Prior",
    "Likelihood",
    "AmortizedGuide",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "DataError",
    "Dataset",
    "EvalResult",
    "FitResult",
    "GuideFamily",
    "LinearGaussianVAE",
    "ModelConfig",
    "NonFiniteLossError",
    "PyroVAEError",
    "Run",
    "RunConfig",
    "RunDir",
    "SingleOptimizer",
    "TrainConfig",
    "TrainingState",
    "VAE",
    "adamw",
    "evaluate",
    "evaluate_elbo",
    "family_names",
    "fit",
    "inference_gaps",
    "load_checkpoint",
    "load_dataset",
    "load_run",
    "make_family",
    "make_likelihood",
    "make_objective",
    "make_schedule",
    "register_family",
    "save_checkpoint",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pyro_vae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - static analysers see the real names
    from pyro_vae.autoguide import AmortizedGuide
    from pyro_vae.checkpoint import TrainingState, load_checkpoint, save_checkpoint
    from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from pyro_vae.data import Dataset, load_dataset
    from pyro_vae.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, PyroVAEError
    from pyro_vae.evaluation import EvalResult, evaluate, evaluate_elbo
    from pyro_vae.gaps import inference_gaps
    from pyro_vae.guides import GuideFamily, family_names, make_family
    from pyro_vae.guides import register as register_family
    from pyro_vae.likelihoods import Likelihood, likelihood_names, make_likelihood
    from pyro_vae.linear_gaussian import LinearGaussianVAE
    from pyro_vae.model import VAE
    from pyro_vae.networks import make_networks, network_names, register_network
    from pyro_vae.objectives import make_objective
    from pyro_vae.optim import SingleOptimizer, adamw
    from pyro_vae.priors import Prior, make_prior, prior_names
    from pyro_vae.priors import register as register_prior
    from pyro_vae.run_dir import Run, RunDir, load_run
    from pyro_vae.schedules import make_schedule
    from pyro_vae.train import FitResult, fit
