"""The variational autoencoder as a Pyro model and an amortised Pyro guide.

The two programs are a textbook Pyro VAE::

    def model(self, x, num_data=None, index=None):
        self.announce_params("model")
        with self.data_plate(x, num_data, index):
            z = pyro.sample("z", self.prior(x.shape[0], x))              # (B, L)
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)   # observed, event (D,)

    def guide(self, x, num_data=None, index=None):
        self.announce_params("guide")
        with self.data_plate(x, num_data, index):
            pyro.sample("z", self.family(self.encoder(x)))              # q(z | x), reparameterised

With a minibatch of B images out of N, :meth:`VAE.data_plate` is ``pyro.plate("data", size=N, subsample=index)``, so
Pyro scales every log-density in the plate by N / B and the minibatch ELBO is an unbiased estimate of the full-data
ELBO. The model never computes its own loss: :class:`pyro.infer.SVI` with an ELBO does.

What makes the step fast sits behind three named seams, none of which shows in the programs' text:

* :meth:`VAE.announce_params` is the instance-local twin of ``pyro.module``. It announces the module's own tensors
  as Pyro ``param`` sites (as :class:`pyro.nn.PyroModule` does with ``module_local_params``), never through the
  global param store, from a list built once and cached: ``named_parameters()`` costs tens of microseconds a call.
  Building a new ``VAE`` in a notebook and training it again therefore trains the new network; with shared
  ``pyro.module`` names the old store entries would silently shadow it.
* :meth:`VAE.data_plate` opens the data plate; when no index is given, the minibatch's positions default to an
  ``arange(B)`` built once per (B, device) and cached, not on every call.
* :meth:`VAE.route` sends a submodule's calls through a wrapper (``DistributedDataParallel`` under torchrun) by
  giving that submodule an instance-level ``forward``: ``self.decoder(z)`` in the program runs the wrapper, whose
  own call of the submodule reaches the real ``forward``. The wrapper is not a submodule, so ``state_dict`` keys,
  ``parameters()`` and checkpoints are the same with and without routes, and an unrouted VAE pays nothing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn

from pyro_vae._compat import announce_param, tag_module_param
from pyro_vae.config import ModelConfig, check_int
from pyro_vae.errors import ConfigError, unknown_choice
from pyro_vae.guides import GuideFamily, make_family
from pyro_vae.likelihoods import Likelihood, make_likelihood
from pyro_vae.networks import make_networks
from pyro_vae.priors import Prior, StandardNormal, make_prior

__all__ = ["VAE", "StandardNormal", "posterior_mean"]  # StandardNormal lives in pyro_vae.priors; kept importable here


class VAE(nn.Module):
    """A VAE whose variational family is a plug-in.

    :param int input_dim: D, the flattened size of one data point (taken from the data).
    :param int latent_dim: L.
    :param hidden_dims: encoder hidden widths from the input side; the decoder uses them reversed. Default is the
        seed network ``(512, 256, 128, 64)``.
    :param str activation: non-linearity (SiLU in the seed).
    :param guide: a family name for :func:`pyro_vae.guides.make_family` (e.g. ``"mvn_diag"``, ``"low_rank:4"``)
        or a ready :class:`~pyro_vae.guides.GuideFamily`.
    :param dict guide_options: options for the family when ``guide`` is a name.
    :param likelihood: a likelihood spec of :func:`pyro_vae.likelihoods.likelihood_names` (``"bernoulli"``,
        ``"continuous_bernoulli"``, ...) or a :class:`~pyro_vae.likelihoods.Likelihood`.
    :param prior: a prior spec of :func:`pyro_vae.priors.prior_names` (``"standard"``, ``"mog:10"``, ...) or a
        ready :class:`~pyro_vae.priors.Prior`.
    :param str network: the encoder/decoder pair, a name of :func:`pyro_vae.networks.network_names`.
    :param image_shape: one image's shape ``(C, H, W)`` (or ``(H, W)``), with product ``input_dim``; needed by
        networks that see the image as an image (``conv``). Default: flat ``(input_dim,)``.
    :param conv_channels: the ``conv`` network's channel widths (see :func:`pyro_vae.networks.make_networks`).

    :cvar str kind: the model's name in :data:`pyro_vae.config.MODEL_KINDS` (``--model``); subclasses with labels
        (:mod:`pyro_vae.labelled`) name theirs.
    :cvar param_groups: which submodules' parameters each Pyro program announces (:meth:`announce_params`): the
        model owns the prior, the decoder and the likelihood, the guide the encoder and the family.
    :cvar routable: the submodules :meth:`route` may send through a wrapper (DDP routes those with parameters).
    :cvar latent_sites: the latent sample sites a KL schedule weights.
    :cvar bool enumerates: whether the guide enumerates a discrete site, so that training needs
        :class:`~pyro.infer.TraceEnum_ELBO`.
    """

    kind = "vae"
    param_groups: dict[str, tuple[str, ...]] = {
        "model": ("prior", "decoder", "likelihood"),
        "guide": ("encoder", "family"),
    }
    routable: tuple[str, ...] = ("prior", "encoder", "decoder", "family", "likelihood")
    latent_sites: tuple[str, ...] = ("z",)
    enumerates = False

    def __init__(
        self,
        input_dim: int,
        latent_dim: int = 16,
        hidden_dims: Sequence[int] = (512, 256, 128, 64),
        activation: str = "silu",
        guide: str | GuideFamily = "mvn_diag",
        guide_options: dict | None = None,
        likelihood: str | Likelihood = "bernoulli",
        prior: str | Prior = "standard",
        network: str = "mlp",
        image_shape: Sequence[int] | None = None,
        conv_channels: Sequence[int] = (32, 64),
    ):
        super().__init__()
        check_int("input_dim", input_dim, low=1)
        family = make_family(guide, latent_dim, **(guide_options or {})) if isinstance(guide, str) else guide
        if family.latent_dim != latent_dim:
            raise ValueError(f"guide family has latent_dim={family.latent_dim} but the VAE has {latent_dim}")
        self.input_dim = input_dim
        #: The :class:`~pyro_vae.config.ModelConfig` this VAE was built from, or ``None`` when it was given objects
        #: (a ready family or likelihood) that a config cannot describe.
        self.config: ModelConfig | None = None
        input_shape = _input_shape(input_dim, image_shape)
        #: One image's shape ``(C, H, W)``, or ``None`` for a VAE built for flat vectors.
        self.image_shape: tuple[int, ...] | None = input_shape if image_shape is not None else None
        if isinstance(guide, str) and isinstance(likelihood, str) and isinstance(prior, str):
            self.config = ModelConfig(
                latent_dim=latent_dim,
                hidden_dims=tuple(hidden_dims),
                activation=activation,
                guide=guide,
                guide_options=dict(guide_options or {}),
                likelihood=likelihood,
                prior=prior,
                network=network,
                conv_channels=tuple(conv_channels),
                **self._config_extras(),
            )
        self.latent_dim = latent_dim
        self.family = family
        self.likelihood = make_likelihood(likelihood) if isinstance(likelihood, str) else likelihood
        self.prior = make_prior(prior, latent_dim) if isinstance(prior, str) else prior
        if self.prior.latent_dim != latent_dim:
            raise ValueError(f"the prior has latent_dim={self.prior.latent_dim} but the VAE has {latent_dim}")
        self._build_networks(
            network,
            input_shape=input_shape,
            latent_dim=latent_dim,
            num_params=family.num_params,
            output_dim=self.likelihood.output_dim(input_dim),
            hidden_dims=tuple(hidden_dims),
            activation=activation,
            conv_channels=tuple(conv_channels),
        )
        self.prior.attach(self.encode, input_dim)
        self._arange_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._routes: dict[str, nn.Module] = {}
        self._param_cache: dict[str, list[tuple[str, torch.Tensor]]] = {}

    def _build_networks(self, network: str, **spec) -> None:
        """Build ``self.encoder`` and ``self.decoder`` (``spec``: :func:`~pyro_vae.networks.make_networks`' keywords);
        a model with labels builds them for inputs conditioned on y."""
        self.encoder, self.decoder = make_networks(network, **spec)

    def _config_extras(self) -> dict:
        """The :class:`~pyro_vae.config.ModelConfig` fields a subclass sets besides the VAE's (its ``kind``, ...)."""
        return {}

    @classmethod
    def from_config(cls, config: ModelConfig, input_dim: int, image_shape: Sequence[int] | None = None) -> VAE:
        """Build the VAE a :class:`~pyro_vae.config.ModelConfig` describes, for data of dimension ``input_dim``
        (images of shape ``image_shape``, where the network needs it)."""
        return cls(
            input_dim,
            latent_dim=config.latent_dim,
            hidden_dims=config.hidden_dims,
            activation=config.activation,
            guide=config.guide,
            guide_options=dict(config.guide_options),
            likelihood=config.likelihood,
            prior=config.prior,
            network=config.network,
            image_shape=image_shape,
            conv_channels=config.conv_channels,
        )

    def check_data_shape(self, input_dim: int, image_shape: Sequence[int] | None) -> None:
        """Refuse data this VAE was not built for: another number of values per image, or (for a VAE built for
        images) the same number in another shape, where training would silently scramble the pixels.

        :raises ConfigError: one line naming both shapes and how to build a VAE that fits.
        """
        fix = "build the VAE with VAE.from_config(config.model, data.input_dim, data.image_shape)"
        if input_dim != self.input_dim:
            raise ConfigError(f"the data have {input_dim} values per image but the VAE expects {self.input_dim}; {fix}")
        shape = None if image_shape is None else tuple(image_shape)
        if self.image_shape is not None and shape is not None and self.image_shape != shape:
            raise ConfigError(
                f"the data are images of shape {shape} but the VAE was built for {self.image_shape}; {fix}"
            )

    # ----------------------------------------------------------------------------------------------------------
    # Pyro programs
    def model(self, x: torch.Tensor, num_data: int | None = None, index: torch.Tensor | None = None) -> None:
        """The generative model p(z) p(x | z) for a minibatch.

        :param x: observed data, ``(B, D)``.
        :param num_data: N, the size of the data set the minibatch comes from (default B): sets the plate's scale
            N / B.
        :param index: positions of the minibatch in the data set, ``(B,)`` (default ``arange(B)``).
        """
        self.announce_params("model")
        with self.data_plate(x, num_data, index):
            z = pyro.sample("z", self.prior(x.shape[0], x))  # (B, L), or (P, B, L) with vectorised particles
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None, index: torch.Tensor | None = None) -> None:
        """The amortised guide q(z | x) = ``family(encoder(x))``. Takes the same arguments as :meth:`model`."""
        self.announce_params("guide")
        with self.data_plate(x, num_data, index):
            pyro.sample("z", self.family(self.encoder(x)))  # raw encoder output: (B, family.num_params(L))

    # ----------------------------------------------------------------------------------------------------------
    # The seams behind the programs
    def announce_params(self, program: str) -> None:
        """Announce the parameters that ``program`` owns as Pyro ``param`` sites holding the module's own tensors,
        so that :class:`~pyro.infer.SVI` optimises them; the instance-local twin of ``pyro.module``.

        The model owns the prior's, the decoder's and the likelihood's parameters, the guide the encoder's and the
        family's. Site names are the ``state_dict`` keys (``decoder.net.0.weight``, ...). Nothing goes into Pyro's
        global param store. Outside any Pyro handler it records nothing.

        :param str program: ``"model"`` or ``"guide"``.
        """
        sites = self._param_cache.get(program)
        if sites is None:
            sites = self._param_sites(program)
        for name, p in sites:
            announce_param(name, p, constraint=constraints.real, event_dim=None, name=name)

    def _param_sites(self, program: str) -> list[tuple[str, torch.Tensor]]:
        # Cached because named_parameters() costs tens of microseconds per call on the hot path; invalidated by
        # _apply (.to(), .cuda(), .double(), ...), which may swap the parameter tensors.
        if program not in self.param_groups:
            raise unknown_choice("Pyro program", program, self.param_groups)
        sites = []
        for prefix in self.param_groups[program]:
            for name, p in getattr(self, prefix).named_parameters():
                tag_module_param(p, f"{prefix}.{name}")  # the name orders SingleOptimizer's state
                sites.append((f"{prefix}.{name}", p))
        self._param_cache[program] = sites
        return sites

    def _apply(self, fn, recurse=True):
        self._param_cache = {}
        self._arange_cache = {}
        return super()._apply(fn, recurse)

    def data_plate(self, x: torch.Tensor, num_data: int | None = None, index: torch.Tensor | None = None) -> pyro.plate:
        """The plate over the minibatch: ``pyro.plate("data", size=num_data, subsample=index)``.

        :param x: the minibatch, ``(B, ...)``.
        :param num_data: N, the size of the data set (default B). Every log-density in the plate is scaled by N / B.
        :param index: the minibatch's positions in the data set, ``(B,)``. Default ``arange(B)``, built once per
            (B, device) and cached.
        """
        if index is None:
            key = (x.shape[0], x.device)
            index = self._arange_cache.get(key)
            if index is None:
                index = self._arange_cache[key] = torch.arange(x.shape[0], device=x.device)
        return pyro.plate("data", size=num_data if num_data is not None else x.shape[0], subsample=index)

    def route(self, **wrappers: nn.Module | None) -> None:
        """Run submodules' forward passes through wrappers, e.g.
        ``vae.route(encoder=DistributedDataParallel(vae.encoder))``: from then on ``vae.encoder(x)``, in the Pyro
        programs and everywhere else, calls the wrapper, and the wrapper's own call of ``vae.encoder`` runs the
        encoder's real ``forward``.

        The wrappers are not submodules: ``state_dict`` and ``parameters()`` are unchanged, so checkpoints stay
        the same with and without them. Pass ``name=None`` to remove a route.

        :raises ConfigError: for a name that is not in :attr:`routable` (``prior``, ``encoder``, ``decoder``,
            ``family``, ``likelihood``; a labelled model adds its own).
        """
        for name in wrappers:
            if name not in self.routable:
                raise unknown_choice("routable submodule", name, self.routable)
        for name, wrapper in wrappers.items():
            module = getattr(self, name)
            if isinstance(module.__dict__.get("forward"), _Route):
                del module.forward  # the class's forward again
            self._routes.pop(name, None)
            if wrapper is not None:
                module.forward = _Route(wrapper, module.forward)
                self._routes[name] = wrapper

    @property
    def routes(self) -> tuple[str, ...]:
        """The names of the submodules routed through a wrapper (:meth:`route`), sorted."""
        return tuple(sorted(self._routes))

    @contextlib.contextmanager
    def unrouted(self):
        """Run the submodules directly inside this context (e.g. to evaluate a DDP-wrapped model per rank, where
        the ranks make different numbers of forward passes); the routes come back on exit."""
        routes = dict(self._routes)
        self.route(**dict.fromkeys(routes))
        try:
            yield self
        finally:
            self.route(**routes)

    # ----------------------------------------------------------------------------------------------------------
    # Plain-torch helpers (no Pyro effects)
    def encode(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z | x) for a batch ``(B, D)``: batch_shape ``(B,)``, event_shape ``(L,)``."""
        return self.family(self.encoder(x))  # raw encoder output: (B, family.num_params(L))

    def decode(self, z: torch.Tensor) -> dist.TorchDistribution:
        """p(x | z) for latent codes ``(..., L)``: event_shape ``(D,)``."""
        return self.likelihood(self.decoder(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Mean image E[x | z] at the posterior mean of z (or at a posterior sample), ``(B, D)``."""
        q = self.encode(x)
        z = q.sample() if sample else posterior_mean(q)
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean images E[x | z] for ``n`` codes drawn from the prior p(z), ``(n, D)``."""
        ref = next(self.decoder.parameters())
        return self.likelihood.mean(self.decoder(self.prior.sample_codes(n, ref, generator)))


def _input_shape(input_dim: int, image_shape: Sequence[int] | None) -> tuple[int, ...]:
    """One data point's shape: ``(C, H, W)`` for images (a legacy ``(H, W)`` is one grey channel), ``(D,)`` for flat
    data; an image shape whose product is not ``input_dim`` is refused."""
    if image_shape is None:
        return (input_dim,)
    shape = tuple(image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if math.prod(shape) != input_dim:
        raise ValueError(f"image_shape {shape} has {math.prod(shape)} values but input_dim is {input_dim}")
    return shape


class _Route:
    """The instance-level ``forward`` that :meth:`VAE.route` gives a routed submodule.

    Calling the submodule calls this, which calls the wrapper; the wrapper's own call of the submodule
    (``DistributedDataParallel`` calls ``self.module(...)``) comes back here while the first call is still open, and
    runs the submodule's own ``forward``.
    """

    __slots__ = ("wrapper", "forward", "inside")

    def __init__(self, wrapper: nn.Module, forward):
        self.wrapper, self.forward, self.inside = wrapper, forward, False

    def __call__(self, *args, **kwargs):
        if self.inside:
            return self.forward(*args, **kwargs)
        self.inside = True
        try:
            return self.wrapper(*args, **kwargs)
        finally:
            self.inside = False


def posterior_mean(q: dist.TorchDistribution) -> torch.Tensor:
    """Mean of q(z | x) where the family has one in closed form; a 64-sample average otherwise (flows)."""
    try:
        return q.mean
    except NotImplementedError:
        return q.sample((64,)).mean(0)
