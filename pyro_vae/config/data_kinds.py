"""Which likelihoods a data set admits: the one rule, shared by the config check (before any data load) and the data
check (after it, :func:`pyro_vae.data.check_likelihood_data`).

Data that reach a model come in three nested kinds, each a subset of the next:

============  ==========================================================  =====================================
kind          values                                                      examples
============  ==========================================================  =====================================
``binary``    exactly 0 or 1                                              any binarised data (``--binarize``
                                                                          dynamic, static, threshold)
``8bit``      on the grid k/255, k = 0..255 (uint8 images divided by 255)  grey Fashion-MNIST and MNIST with
                                                                          ``--binarize none``; a uint8 npz
``unit``      anywhere in [0, 1]                                          a float npz, e.g. real-valued images
============  ==========================================================  =====================================

Each likelihood declares the widest kind it admits (:attr:`pyro_vae.likelihoods.Likelihood.support`), and a data set
is admitted when its kind lies inside that one (:func:`admits`):

========================  ======  ======  ======
likelihood                binary  8bit    unit
========================  ======  ======  ======
``bernoulli``             yes     no      no
``discretized_logistic``  yes     yes     no
``continuous_bernoulli``  yes     yes     yes
``gaussian[:...]``        yes     yes     yes
``beta[:eps]``            yes     yes     yes
========================  ======  ======  ======

Binary data are admitted by every likelihood, since 0 and 1 lie in every support; a continuous density on binarised
data is legal but rarely meant, and the command line hints at ``--binarize none`` for it. :data:`LIKELIHOOD_SUPPORT`
mirrors the registry's attribute for the config check, which must run before torch is imported; a test keeps the two
equal.
"""

from __future__ import annotations

from pyro_vae.errors import DataError, PyroVAEError

#: The data kinds, narrowest first; each is a subset of the next.
DATA_KINDS = ("binary", "8bit", "unit")

#: The widest data kind each registered likelihood admits (``Likelihood.support``), keyed by its name; a test checks
#: it against :func:`pyro_vae.likelihoods.likelihood_names` and the classes' ``support``.
LIKELIHOOD_SUPPORT = {
    "bernoulli": "binary",
    "beta": "unit",
    "continuous_bernoulli": "unit",
    "discretized_logistic": "8bit",
    "gaussian": "unit",
}

#: Built-in data sets whose kind is known before they load: 8-bit grey images (uint8 files divided by 255).
EIGHT_BIT_DATASETS = ("embedded", "fashion-mnist", "mnist")

_NEEDS = {"binary": "binary data", "8bit": "8-bit data (values k/255, k = 0..255)"}
_HAS = {"8bit": "grey levels", "unit": "values off the 8-bit grid k/255"}
_FIX = {
    "binary": "use --likelihood continuous_bernoulli, or --binarize dynamic/static/threshold",
    "8bit": "use --likelihood gaussian, beta or continuous_bernoulli, or save the images as uint8 0..255",
}


def admits(support: str, kind: str) -> bool:
    """Whether a likelihood whose widest admitted kind is ``support`` admits data of ``kind``.

    :param str support: one of :data:`DATA_KINDS`, the likelihood's ``support``.
    :param str kind: one of :data:`DATA_KINDS`, the data's kind.
    """
    return DATA_KINDS.index(kind) <= DATA_KINDS.index(support)


def known_data_kind(binarize: str, dataset: str) -> str | None:
    """The kind of the data a model will see, where the config alone tells it: ``"binary"`` when the data are
    binarised, ``"8bit"`` for the built-in grey data sets without binarisation, else ``None`` (an npz file, known only
    once loaded).

    :param str binarize: one of :data:`pyro_vae.config.BINARIZATIONS`.
    :param str dataset: one of :data:`pyro_vae.config.DATASETS`.
    """
    if binarize != "none":
        return "binary"
    return "8bit" if dataset in EIGHT_BIT_DATASETS else None


def check_admits(likelihood: str, support: str, kind: str, source: str, error: type[PyroVAEError] = DataError) -> None:
    """Refuse data of ``kind`` for a likelihood that does not admit it, in one line that says what to do.

    :param str likelihood: the likelihood's name, for the message.
    :param str support: the likelihood's ``support``.
    :param str kind: the data's kind (:data:`DATA_KINDS`).
    :param str source: the data, for the message, e.g. ``"embedded"`` or ``"npz:x.npz"``.
    :param error: the exception class: :class:`~pyro_vae.errors.DataError` for loaded data, ``ConfigError`` for the
        config check.
    :raises DataError: ``"the bernoulli likelihood needs binary data but embedded has grey levels and binarize is
        'none'; use ..."``.
    """
    if admits(support, kind):
        return
    raise error(
        f"the {likelihood} likelihood needs {_NEEDS[support]} but {source} has {_HAS[kind]} and binarize is 'none'; "
        f"{_FIX[support]}"
    )


def binarization_hint(likelihood: str, binarize: str) -> str | None:
    """A hint for a legal but rarely meant pair: a likelihood for grey levels (``support`` wider than ``binary``) on
    data that a binarisation turns into 0/1 before the model sees them. The refusals are :func:`check_admits`'s.

    :param str likelihood: the likelihood spec (``name`` or ``name:option``).
    :param str binarize: one of :data:`pyro_vae.config.BINARIZATIONS`.
    :returns: one line naming the flag to pass, or ``None`` when the two agree.
    """
    name = likelihood.partition(":")[0]
    if binarize == "none" or LIKELIHOOD_SUPPORT.get(name, "binary") == "binary":
        return None
    return (
        f"the {likelihood} likelihood models grey levels, but --binarize {binarize} turns the data into 0/1 "
        "before it sees them; pass --binarize none to model the grey levels"
    )
