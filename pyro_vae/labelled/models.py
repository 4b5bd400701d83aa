r"""Models that read labels: the conditional VAE and the semi-supervised M2, as Pyro programs.

**CVAE** (Sohn et al. 2015): the label y is given, to the encoder and to the decoder::

    def model(self, x, num_data=None, index=None, *, y):
        with self.data_plate(x, num_data, index):
            z = pyro.sample("z", self.prior(x.shape[0], x))
            pyro.sample("x", self.decode(z, y), obs=x)                   # p(x | z, y)

    def guide(self, x, num_data=None, index=None, *, y):
        with self.data_plate(x, num_data, index):
            pyro.sample("z", self.encode(x, y))                          # q(z | x, y)

**M2** (Kingma et al. 2014): p(y) = Cat(1/C), p(z) = N(0, I), p(x | y, z); the guide is a classifier q(y | x) and
q(z | x, y). A labelled image observes y; an unlabelled one leaves it latent, and the guide's y site is enumerated in
parallel (``config_enumerate``) so that :class:`~pyro.infer.TraceEnum_ELBO` sums it out exactly: each unlabelled
image costs C passes through the encoder and the decoder. One step sees an unlabelled minibatch in the plate
``"data"`` and a labelled one in the plate ``"labelled"`` (sites ``z_labelled``, ``x_labelled``, ...), each scaled
to its own set's size, so the loss is an unbiased estimate of Kingma's objective over both sets,

.. math:: \mathcal{J}^\alpha = \sum_{(x, y)\ \text{labelled}} \big[\mathcal{L}(x, y)
    + \alpha \log q(y \mid x)\big] + \sum_{x\ \text{unlabelled}} \mathcal{U}(x),

where the classification term is an observed site ``y_aux`` of the model, scaled by α, as in Pyro's SS-VAE tutorial
(whose second SVI is that site alone; here both losses share one step and one optimiser). The default
α = 0.1 · N (N: all training images) is Kingma et al.'s.

Both models share the VAE's networks, guide families, priors and likelihoods: the networks are the registered ones
built for inputs with a one-hot label appended (:mod:`pyro_vae.labelled.conditioning`), and every registered guide
family turns the encoder's raw vector into q(z | x, y).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import config_enumerate

from pyro_vae.config import ModelConfig, check_int
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.labelled.conditioning import (
    BatchReshaped,
    apply_flat,
    build_classifier,
    build_conditional_networks,
    encoder_output,
    joined,
    one_hot,
)
from pyro_vae.model import VAE, posterior_mean

__all__ = ["CVAE", "LabelledPart", "SSVAE", "build_model"]


class LabelledPart(NamedTuple):
    """The labelled minibatch of an M2 step: images ``(B_l, D)``, their labels ``(B_l,)``, the labelled set's size
    N_l (the plate's size) and the images' positions in it ``(B_l,)``."""

    x: torch.Tensor
    y: torch.Tensor
    num_data: int
    index: torch.Tensor


class _Labelled(VAE):
    """What the CVAE and M2 share: the conditional networks, ``encode``/``decode``/``sample`` given labels."""

    def __init__(self, input_dim: int, num_classes: int, *args, **kwargs):
        check_int("num_classes", num_classes, low=2)
        self.num_classes = num_classes  # read by _build_networks, which VAE.__init__ calls
        super().__init__(input_dim, *args, **kwargs)

    def _build_networks(self, network: str, **spec) -> None:
        self._network_spec = (network, spec)  # the classifier (M2) is built from the same spec
        self.encoder, self.decoder, self.conditional_input = build_conditional_networks(
            network, num_classes=self.num_classes, **spec
        )

    def _config_extras(self) -> dict:
        return {"kind": self.kind, "num_classes": self.num_classes}

    @classmethod
    def from_config(cls, config: ModelConfig, input_dim: int, image_shape: Sequence[int] | None = None):
        if config.kind != cls.kind or config.num_classes is None:
            raise ConfigError(
                f"{cls.__name__}.from_config needs a config of kind {cls.kind!r} with num_classes set, got kind "
                f"{config.kind!r}, num_classes {config.num_classes}; use pyro_vae.labelled.build_model"
            )
        return cls(
            input_dim, config.num_classes, latent_dim=config.latent_dim, hidden_dims=config.hidden_dims,
            activation=config.activation, guide=config.guide, guide_options=dict(config.guide_options),
            likelihood=config.likelihood, prior=config.prior, network=config.network, image_shape=image_shape,
            conv_channels=config.conv_channels, **cls._extra_kwargs(config),
        )  # fmt: skip

    @staticmethod
    def _extra_kwargs(config: ModelConfig) -> dict:
        return {}

    # -- plain torch, given labels ---------------------------------------------------------------------------------
    def check_labels(self, y: torch.Tensor, n: int | None = None, *, what: str = "y") -> None:
        """Refuse labels that are not integers ``0..C-1`` (or not ``n`` of them): one line naming the problem."""
        if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise DataError(f"{what} must be an integer tensor of labels 0..{self.num_classes - 1}, got {y!r:.60}")
        if n is not None and tuple(y.shape) != (n,):
            raise DataError(f"{what} has shape {tuple(y.shape)} but there are {n} images; give one label per image")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise DataError(f"{what} holds the label {bad} but this model's labels are 0..{self.num_classes - 1}")

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dist.TorchDistribution:
        """q(z | x, y) for images ``(B, D)`` and labels ``(B,)`` (or any shape broadcasting against ``(B,)``, e.g. the
        ``(C, 1)`` of an enumerated y): batch shape the broadcast shape, event ``(L,)``."""
        if y is None:
            y = self.default_labels(x)
        raw = encoder_output(self.encoder, self.conditional_input, x, one_hot(y, self.num_classes, x))
        return BatchReshaped(self.family(raw.reshape(-1, raw.shape[-1])), raw.shape[:-1])

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> dist.TorchDistribution:
        """p(x | z, y) for codes ``(..., L)`` and labels broadcasting against ``z``'s batch shape."""
        if y is None:
            raise ConfigError(f"{type(self).__name__}.decode needs labels y: the decoder is p(x | z, y)")
        return self.likelihood(apply_flat(self.decoder, joined(z, one_hot(y, self.num_classes, z))))

    def default_labels(self, x: torch.Tensor) -> torch.Tensor:
        raise ConfigError(f"{type(self).__name__} encodes q(z | x, y): pass the labels y")

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None, sample: bool = False) -> torch.Tensor:
        """Mean image E[x | z, y] at the posterior mean of q(z | x, y) (or a posterior sample), ``(B, D)``."""
        y = self.default_labels(x) if y is None else y
        q = self.encode(x, y)
        z = q.sample() if sample else posterior_mean(q)
        return self.likelihood.mean(apply_flat(self.decoder, joined(z, one_hot(y, self.num_classes, z))))

    def sample_labels(self, n: int, label: int | None, like: torch.Tensor) -> torch.Tensor:
        """``n`` labels: all ``label``, or balanced over the classes (``i mod C``) when ``label`` is ``None``."""
        check_int("n", n, low=1)
        if label is not None:
            check_int("label", label, low=0, high=self.num_classes - 1, why=f"the model has {self.num_classes} classes")
            return torch.full((n,), label, dtype=torch.long, device=like.device)
        return torch.arange(n, device=like.device) % self.num_classes

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, label: int | None = None) -> torch.Tensor:
        """Mean images E[x | z, y] for ``n`` codes from p(z) and labels ``label`` (default: balanced over the
        classes), ``(n, D)``."""
        ref = next(self.decoder.parameters())
        z = self.prior.sample_codes(n, ref, generator)
        y = self.sample_labels(n, label, ref)
        return self.likelihood.mean(apply_flat(self.decoder, joined(z, one_hot(y, self.num_classes, z))))


class CVAE(_Labelled):
    """The conditional VAE: p(z) p(x | z, y) and q(z | x, y), y given (one-hot) to the encoder and the decoder.

    :param int input_dim: D.
    :param int num_classes: C; labels are ``0..C-1``.
    :param args: the :class:`~pyro_vae.model.VAE`'s other parameters (``latent_dim``, ``guide``, ``prior``, ...).
    """

    kind = "cvae"

    def model(self, x: torch.Tensor, num_data: int | None = None, index: torch.Tensor | None = None, *, y) -> None:
        """p(z) p(x | z, y) for a minibatch ``x (B, D)`` with labels ``y (B,)``."""
        self.announce_params("model")
        with self.data_plate(x, num_data, index):
            z = pyro.sample("z", self.prior(x.shape[0], x))
            pyro.sample("x", self.decode(z, y), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None, index: torch.Tensor | None = None, *, y) -> None:
        """q(z | x, y)."""
        self.announce_params("guide")
        with self.data_plate(x, num_data, index):
            pyro.sample("z", self.encode(x, y))


class SSVAE(_Labelled):
    """The semi-supervised M2 of Kingma et al. (2014) (see the module docstring).

    :param int input_dim: D.
    :param int num_classes: C.
    :param aux_weight: α, the weight of the classification loss α·log q(y | x) on labelled images; ``None`` (the
        default) sets α = 0.1 · N when training starts (:meth:`set_aux_weight`), Kingma et al.'s choice.
    :param args: the :class:`~pyro_vae.model.VAE`'s other parameters.

    :ivar classifier: the network of q(y | x): the registered encoder with C outputs (logits).
    """

    kind = "m2"
    param_groups = {"model": ("prior", "decoder", "likelihood"), "guide": ("encoder", "family", "classifier")}
    routable = ("prior", "encoder", "decoder", "family", "likelihood", "classifier")
    latent_sites = ("z", "z_labelled")
    enumerates = True

    def __init__(self, input_dim: int, num_classes: int, *args, aux_weight: float | None = None, **kwargs):
        super().__init__(input_dim, num_classes, *args, **kwargs)
        network, spec = self._network_spec
        self.classifier = build_classifier(
            network, input_shape=spec["input_shape"], num_classes=num_classes, hidden_dims=spec["hidden_dims"],
            activation=spec["activation"], conv_channels=spec["conv_channels"],
        )  # fmt: skip
        self.aux_weight = aux_weight
        if self.config is not None:
            self.config = ModelConfig(**{**self.config.__dict__, "aux_weight": aux_weight})

    @staticmethod
    def _extra_kwargs(config: ModelConfig) -> dict:
        return {"aux_weight": config.aux_weight}

    def set_aux_weight(self, num_images: int) -> float:
        """α for a training set of ``num_images`` images: the one given, else 0.1 · ``num_images``."""
        if self.aux_weight is None:
            self.aux_weight = 0.1 * num_images
        return self.aux_weight

    # -- the Pyro programs -----------------------------------------------------------------------------------------
    def model(self, x, num_data=None, index=None, *, y=None, labelled: LabelledPart | None = None) -> None:
        """p(y) p(z) p(x | y, z) over an unlabelled minibatch ``x`` (``y=None``; or labelled, with ``y``), and over
        the labelled part of a mixed step, with the classification term α·log q(y | x) on every observed y."""
        self.announce_params("model")
        if x is not None:
            with self.data_plate(x, num_data, index):
                self._generate("", x, y)
        if labelled is not None:
            with pyro.plate("labelled", labelled.num_data, subsample=labelled.index):
                self._generate("_labelled", labelled.x, labelled.y)

    def _generate(self, suffix: str, x: torch.Tensor, y: torch.Tensor | None) -> None:
        uniform = x.new_zeros(self.num_classes)  # logits of p(y) = Cat(1/C)
        z = pyro.sample(f"z{suffix}", self.prior(x.shape[0], x))
        y = pyro.sample(f"y{suffix}", dist.Categorical(logits=uniform), obs=y)
        pyro.sample(f"x{suffix}", self.decode(z, y), obs=x)
        if y is not None and not _enumerated(y, x):
            with poutine.scale(scale=self._aux_weight()):
                pyro.sample(f"y_aux{suffix}", dist.Categorical(logits=self.classifier(x)), obs=y)

    @config_enumerate
    def guide(self, x, num_data=None, index=None, *, y=None, labelled: LabelledPart | None = None) -> None:
        """q(y | x) q(z | x, y); an unobserved y is enumerated in parallel (``config_enumerate``)."""
        self.announce_params("guide")
        if x is not None:
            with self.data_plate(x, num_data, index):
                if y is None:
                    y = pyro.sample("y", dist.Categorical(logits=self.classifier(x)))
                pyro.sample("z", self.encode(x, y))
        if labelled is not None:
            with pyro.plate("labelled", labelled.num_data, subsample=labelled.index):
                pyro.sample("z_labelled", self.encode(labelled.x, labelled.y))

    def _aux_weight(self) -> float:
        if self.aux_weight is None:
            raise ConfigError("SSVAE.aux_weight is unset: pass aux_weight=, or call set_aux_weight(N) before training")
        return self.aux_weight

    # -- plain torch -----------------------------------------------------------------------------------------------
    def classify(self, x: torch.Tensor) -> dist.Categorical:
        """q(y | x) for images ``(B, D)``: a Categorical of batch shape ``(B,)``."""
        return dist.Categorical(logits=self.classifier(x))

    def default_labels(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable label under q(y | x): what ``encode`` and ``reconstruct`` use when no y is given."""
        return self.classifier(x).argmax(-1)


def _enumerated(y: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``y`` is an enumerated value (``(C, 1)`` against a batch ``(B,)``) rather than observed labels."""
    return y.dim() > 1 or (y.shape[0] != x.shape[0])


_KINDS = {"vae": VAE, "cvae": CVAE, "m2": SSVAE}


def build_model(
    config: ModelConfig, input_dim: int, image_shape: Sequence[int] | None = None, num_classes: int | None = None
) -> VAE:
    """The model ``config.kind`` names (a :class:`~pyro_vae.model.VAE`, :class:`CVAE` or :class:`SSVAE`), for data
    of dimension ``input_dim``; a model with labels takes ``config.num_classes``, else ``num_classes`` (the data's:
    :func:`pyro_vae.data.num_classes`).

    :raises ConfigError: a model with labels and no number of classes, or two numbers that disagree.
    """
    if config.kind == "vae":
        return VAE.from_config(config, input_dim, image_shape)
    if config.num_classes is not None and num_classes is not None and config.num_classes != num_classes:
        raise ConfigError(
            f"the config says num_classes={config.num_classes} but the data have {num_classes} classes; drop "
            "num_classes from the config to take the data's"
        )
    classes = config.num_classes if config.num_classes is not None else num_classes
    if classes is None:
        raise ConfigError(f"--model {config.kind} needs the number of classes: pass num_classes or labelled data")
    resolved = ModelConfig(**{**config.__dict__, "num_classes": classes})
    return _KINDS[config.kind].from_config(resolved, input_dim, image_shape)


def class_count(model: VAE) -> int | None:
    """C for a model with labels, ``None`` for the VAE."""
    return getattr(model, "num_classes", None)
