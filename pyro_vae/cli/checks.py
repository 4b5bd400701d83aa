"""The checks a command runs on its config before any data are loaded, so that bad input costs one line and no
wait: registry names and field bounds are checked by the flags (:mod:`pyro_vae.cli.flags`); what needs a built
object (a KL schedule's values, the device) or two fields at once (the likelihood against the binarisation, the
batch against ``--n-train``) is checked here. Heavy imports happen inside the functions.
"""

from __future__ import annotations

from pyro_vae.config import RunConfig
from pyro_vae.config.data_kinds import binarization_hint

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
    if device:
        from pyro_vae.distributed import resolve_device

        resolve_device(config.train.device)
    return hint
