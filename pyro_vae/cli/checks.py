"""The checks a command runs on its config before any data are loaded, so that bad input costs one line and no
wait: registry names and field bounds are checked by the flags (:mod:`pyro_vae.cli.flags`); what needs a built
object (a KL schedule's values, the device) or two fields at once (the likelihood against the binarisation, the
batch or ``--labelled`` against ``--n-train``, ``--labelled`` against ``--num-classes``) is checked here; the rest
of the label checks need the data (:func:`pyro_vae.data.num_classes`, :func:`pyro_vae.data.select_labelled`).
Heavy imports happen inside the functions.
"""

from __future__ import annotations

from pyro_vae.config import RunConfig
from pyro_vae.config.data_kinds import binarization_hint
from pyro_vae.errors import ConfigError

__all__ = ["check_before_load"]


def check_before_load(config: RunConfig, *, device: bool = True) -> str | None:
    """Every check of ``config`` that needs no data, raising :class:`ConfigError` (one line) on the first failure.
    Returns the hint on a legal but unlikely combination (:func:`binarization_hint`), for the command to log once.

    :param config: the run config as built from the flags.
    :param bool device: check that the device exists (default); under torchrun each process's session resolves its
        own device, so the command passes ``False`` there.
    """
    from pyro_vae.data import check_batch_size
    from pyro_vae.priors import make_prior
    from pyro_vae.schedules import make_schedule

    make_schedule(config.train.kl_schedule)  # its values (linear:0, ...) are refused here, before any data load
    make_prior(config.model.prior, config.model.latent_dim)  # likewise the prior's K (mog:0, vamp:x, standard:3)
    hint = binarization_hint(config.model.likelihood, config.data.binarize)
    if config.data.n_train is not None:
        # --n-train caps the training set: a batch above the cap is refused now (a smaller file still is, on load)
        check_batch_size(config.data.n_train, config.train.batch_size)
    _check_labelled(config)
    if device:
        from pyro_vae.distributed import resolve_device

        resolve_device(config.train.device)
    return hint


def _check_labelled(config: RunConfig) -> None:
    """``--labelled N`` against what the flags already say: at most ``--n-train`` images, at least ``--num-classes``
    (the same words as :func:`pyro_vae.data.select_labelled`, which checks it against the data)."""
    labelled, n_train, classes = config.data.labelled, config.data.n_train, config.model.num_classes
    if labelled is None:
        return
    if n_train is not None and labelled > n_train:
        raise ConfigError(
            f"--labelled {labelled} exceeds the {n_train} training images; use --labelled {n_train} or less"
        )
    if classes is not None and labelled < classes:
        raise ConfigError(
            f"--labelled {labelled} is below the {classes} classes, but --labelled N must be at least the number of "
            f"classes C so every class has a label; use --labelled {classes} or more"
        )
