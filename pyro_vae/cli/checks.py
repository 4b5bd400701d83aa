"""The checks a command runs on its config before any data are loaded, so that bad input costs one line and no
wait: registry names and field bounds are checked by the flags (:mod:`pyro_vae.cli.flags`); what needs a built
object (a KL schedule's values, the device) or two fields at once (the likelihood against the binarisation, the
batch against ``--n-train``) is checked here. Heavy imports happen inside the functions.
"""

from __future__ import annotations

from pyro_vae.config import RunConfig
from pyro_vae.errors import ConfigError

__all__ = ["binarization_hint", "check_before_load"]


def binarization_hint(likelihood: str, binarize: str) -> str | None:
    """The one rule between a likelihood and a binarisation, keyed on the likelihood's ``requires_binary`` (so a
    newly registered likelihood follows it without a name here).

    * a likelihood that needs 0/1 data with ``binarize="none"``: refused (grey levels would be out of its support);
    * a likelihood for grey levels (``requires_binary`` false) with a binarisation that makes the data 0/1: legal
      (binary data lie in its support), but almost always a slip; the returned hint names the flag to pass.

    :returns: the hint, one line, or ``None`` when the two agree.
    :raises ConfigError: for a binary likelihood on data kept grey.
    """
    from pyro_vae.likelihoods import make_likelihood

    requires_binary = make_likelihood(likelihood).requires_binary
    if requires_binary and binarize == "none":
        raise ConfigError(
            f"the {likelihood} likelihood needs binary data but binarize is 'none'; pass --binarize "
            "dynamic|static|threshold, or a likelihood for grey levels (e.g. --likelihood continuous_bernoulli)"
        )
    if not requires_binary and binarize != "none":
        return (
            f"the {likelihood} likelihood models grey levels, but --binarize {binarize} turns the data into 0/1 "
            "before it sees them; pass --binarize none to model the grey levels"
        )
    return None


def check_before_load(config: RunConfig, *, device: bool = True) -> str | None:
    """Every check of ``config`` that needs no data, raising :class:`ConfigError` (one line) on the first failure.
    Returns the hint on a legal but unlikely combination (:func:`binarization_hint`), for the command to log once.

    :param config: the run config as built from the flags.
    :param bool device: check that the device exists (default); under torchrun each process's session resolves its
        own device, so the command passes ``False`` there.
    """
    from pyro_vae.data import check_batch_size
    from pyro_vae.schedules import make_schedule

    make_schedule(config.train.kl_schedule)  # its values (linear:0, ...) are refused here, before any data load
    hint = binarization_hint(config.model.likelihood, config.data.binarize)
    if config.data.n_train is not None:
        # --n-train caps the training set: a batch above the cap is refused now (a smaller file still is, on load)
        check_batch_size(config.data.n_train, config.train.batch_size)
    if device:
        from pyro_vae.distributed import resolve_device

        resolve_device(config.train.device)
    return hint
