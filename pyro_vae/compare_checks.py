"""The checks :func:`pyro_vae.compare.compare` runs before anything is trained or written, so that a refused
comparison costs one line and leaves no file: the option varied and its values, every value's run config, the seeds
and NLL sizes, the data against every config (labels included, for ``--model cvae|m2``), and the output directory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from pyro_vae.config import SECTIONS, SEED_MAX, RunConfig, check_int
from pyro_vae.data import Dataset, check_batch_size, check_likelihood_data
from pyro_vae.data.labels import num_classes, select_labelled
from pyro_vae.errors import ConfigError, unknown_choice
from pyro_vae.guides import make_family
from pyro_vae.likelihoods import make_likelihood
from pyro_vae.objectives import make_objective

__all__ = [
    "COMPARE_FILES",
    "KIND_NOT_VARIED",
    "VARY_FIELDS",
    "check_counts",
    "check_data",
    "check_out_dir",
    "check_values",
    "run_configs",
    "vary_fields",
    "with_classes",
]

#: The files a comparison writes into its output directory (besides ``runs/``, one run directory per run).
COMPARE_FILES = ("config.json", "compare.md", "compare.csv", "runs.csv")
#: The options a comparison may vary, one at a time, where the config has them (:func:`vary_fields`): data, seed
#: and budget stay shared, so only model choices and the objective are here.
VARY_FIELDS = ("guide", "prior", "likelihood", "network", "objective")
#: Why ``--vary model=`` (the field ``kind``) is refused.
KIND_NOT_VARIED = (
    "--vary model= is not offered: a CVAE's bounds are on log p(x | y) and a VAE's or M2's on log p(x), and "
    "--labelled applies to cvae/m2 only; compare within one model, e.g. --model m2 --labelled 100 --vary guide=..."
)


def vary_fields() -> dict[str, str]:
    """The options a comparison can vary in this version of the config: field name → section (``"model"`` or
    ``"train"``), in the order of :data:`VARY_FIELDS`."""
    present = {name: section for section in ("model", "train") for name in _field_names(section)}
    return {name: present[name] for name in VARY_FIELDS if name in present}


def _field_names(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTIONS[section])]


def check_values(values: Sequence[str], field: str) -> list[str]:
    fields = vary_fields()
    if field in ("kind", "model"):
        raise ConfigError(KIND_NOT_VARIED)
    if field not in fields:
        raise unknown_choice("option to vary", field, fields)
    values = [str(v).strip() for v in values]
    if not values or any(not v for v in values):
        raise ConfigError(f"give at least one {field}, separated by commas, got {values!r}")
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise ConfigError(f"the values of {field} must be distinct, {duplicates} appear more than once")
    return values


def run_configs(values: Sequence[str], field: str, config: RunConfig) -> dict[str, RunConfig]:
    """Each value's run config; every one is checked as a run would check it (field bounds and specs, the
    likelihood against the binarisation, and the registries by building what they name), before any data load."""
    configs = {value: config.replace(**{vary_fields()[field]: {field: value}}) for value in values}
    with torch.random.fork_rng(devices=[]):  # building a flow draws its initial weights: leave the caller's RNG be
        for run_config in configs.values():
            model, train = run_config.model, run_config.train
            make_family(model.guide, model.latent_dim, **model.guide_options)  # unknown names and bad specs fail here
            make_likelihood(model.likelihood)
            make_objective(train.objective, train.num_particles)
    return configs


def check_counts(seeds, nll_k, nll_images) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise ConfigError("seeds must be a non-empty list of integers >= 0, got []")
    for seed in seeds:
        check_int("every seed", seed, low=0, high=SEED_MAX, why="numpy seeds are 32-bit")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct, got {seeds!r}")
    check_int("nll_k (particles per image)", nll_k, low=1, allow_none=True)
    check_int("nll_images (None: all test images)", nll_images, low=1, allow_none=True)
    return seeds


def check_data(data: Dataset, configs: Sequence[RunConfig]) -> None:
    """What every run's :func:`~pyro_vae.train.fit` would refuse, refused once before anything is written (for a
    model with labels also ``--labelled N``: :func:`~pyro_vae.data.select_labelled`)."""
    for config in configs:
        check_batch_size(data.x_train.shape[0], config.train.batch_size)
        check_likelihood_data(data, config.data.binarize, make_likelihood(config.model.likelihood))
        if config.model.kind != "vae" and config.data.labelled is not None:
            select_labelled(data.y_train, config.data.labelled, config.model.num_classes, config.train.seed)


def with_classes(config: RunConfig, data: Dataset) -> RunConfig:
    """A model with labels gets the data's number of classes in its config (one line for data without labels, or
    for a ``num_classes`` that disagrees), so that every run records it and builds the same model."""
    if config.model.kind == "vae":
        return config
    classes = num_classes(data, what=f"--model {config.model.kind}'s data")
    if config.model.num_classes not in (None, classes):
        raise ConfigError(f"--num-classes {config.model.num_classes} but the data have {classes} classes; drop it")
    return config.replace(model={"num_classes": classes})


def check_out_dir(out: Path, run_dirs: Sequence[Path | None], overwrite: bool) -> None:
    """Refuse an output directory that is a file, or that holds an earlier comparison's results (unless
    ``overwrite``), before any run starts; so a comparison never stops half-way on a run directory in use."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"the comparison's output {out} exists and is not a directory; choose another out_dir")
    if overwrite:
        return
    held = [out / name for name in COMPARE_FILES[1:] if (out / name).exists()]
    held += [run_dir for run_dir in run_dirs if run_dir is not None and run_dir.exists()]
    if held:
        raise ConfigError(
            f"{out} already holds a comparison ({held[0]} exists); pass overwrite=True (--overwrite) to replace it, "
            "or choose another out_dir"
        )
