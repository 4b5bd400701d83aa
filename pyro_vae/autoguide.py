r"""Amortised guides for any Pyro model with local latents under a plate: :class:`AmortizedGuide`.

A site is *local* when it lies under the model's data plate (``plate="data"``) and *global* otherwise. Every local
site is mapped to unconstrained space with ``biject_to(support).inv``, flattened per data point and concatenated
into one vector u of size :math:`L = \sum_s \dim u_s`; a registered guide family gives one joint q(u | x) from an
encoder, so full-rank guides and flows capture correlations between sites::

    x_i ──encoder──► raw (B, family.num_params(L)) ──family──► q(u | x_i)     u = [ u_1 | u_2 | … ]  (B, L)
    site s:  z_s = biject_to(support_s)(u_s)          log q(z | x) = log q(u | x) + Σ_s log |det ∂u_s / ∂z_s|

exactly as Pyro's :class:`~pyro.infer.autoguide.AutoContinuous` does for global latents. Global sites get a Pyro
autoguide (``AutoNormal`` by default) on the model with the local sites blocked.

**The scale.** The guide's plate takes the model's own plate arguments on every call (size N, the subsample), so
both programs scale their log-densities by the same N/B; scaling log q by 1 instead breaks the ELBO's bound.

**No auxiliary site.** The joint log q(u | x) is carried by the first local site and each site carries its own
log-Jacobian, so every guide site has a model counterpart and the guide's log-densities sum to log q(z | x). This
keeps the per-data-point importance weights of :mod:`pyro_vae.importance` (IWAE) valid, and gives
``TraceMeanField_ELBO`` the right entropy (Pyro's ``KL(Delta ‖ p)`` would drop the Jacobian). The shared record of
u is not copied when Pyro detaches a site's distribution, so the sticking-the-landing estimator keeps its path
derivative. When the layout is one unconstrained site whose event is the family's vector (our :class:`VAE`'s
``"z"``), that site is sampled from q itself: the guide is then ``VAE.guide``, sample for sample.

Parameters belong to the guide (an ``nn.Module``), never to Pyro's global param store: a new guide trains afresh
and ``state_dict`` saves it. The networks are built on the first call (or :meth:`AmortizedGuide.setup`).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.guides import prototype_hide_fn
from pyro.infer.util import is_validation_enabled
from pyro.poutine.runtime import NonlocalExit, effectful, get_plates
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_vae.config import ModelConfig, check_int
from pyro_vae.errors import ConfigError, DataError, unknown_choice
from pyro_vae.guides import family_names, make_family, parse_spec
from pyro_vae.networks import Encoder

__all__ = ["AmortizedGuide", "Layout", "LocalSite", "PlateCall", "Prototype", "trace_prototype"]


class LocalSite(NamedTuple):
    """One local latent site: its name, the shapes of its value and of ``biject_to(support).inv(value)`` for one
    data point (a K-category simplex has K − 1 unconstrained numbers), and its support."""

    name: str
    shape: torch.Size
    unconstrained_shape: torch.Size
    support: constraints.Constraint

    @property
    def size(self) -> int:
        """Its share of u per data point."""
        return math.prod(self.unconstrained_shape)


class Layout(NamedTuple):
    """The model's latent sites as the guide sees them: the local ones in model order (u concatenates their
    unconstrained values), the names of the global ones, and the data plate's dim."""

    local: tuple[LocalSite, ...]
    global_names: tuple[str, ...]
    plate_dim: int

    @property
    def latent_dim(self) -> int:
        """L, the size of u per data point."""
        return sum(site.size for site in self.local)

    @property
    def direct(self) -> bool:
        """One unconstrained site whose event is a vector: sample it from q itself."""
        (site, *rest) = self.local
        return not rest and len(site.shape) == 1 and _unconstrained(site.support)


def _unconstrained(support: constraints.Constraint) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


class Prototype(NamedTuple):
    """A traced model: its :class:`Layout` and the values its global sites took (the plate probe's conditions)."""

    layout: Layout
    global_values: dict[str, torch.Tensor]


def trace_prototype(model: Callable, plate: str, args: tuple = (), kwargs: dict | None = None) -> Prototype:
    """Trace ``model`` once (blocked, on a private RNG stream) and sort its latent sites into local and global.

    :param str plate: the name of the model's data plate.
    :raises ConfigError: for discrete latent sites, no latent site under the plate, or a local site whose batch
        shape is not the plate's ``(B,)``.
    """
    with _private_rng():
        traced = poutine.trace(poutine.block(model, hide_fn=prototype_hide_fn))
        trace = poutine.block(traced.get_trace)(*args, **(kwargs or {}))  # nothing reaches an enclosing trace
    sites = list(trace.iter_stochastic_nodes())
    discrete = [name for name, site in sites if site["fn"].support.is_discrete]
    if discrete:
        raise ConfigError(
            f"AmortizedGuide needs continuous latent sites, but {discrete} are discrete; sum them out with "
            "pyro.infer.config_enumerate and a hand-written guide (TraceEnum_ELBO), or use the M2 model for labels"
        )
    local, global_names, plate_dim = [], [], -1
    for name, site in sites:
        frames = [frame for frame in site["cond_indep_stack"] if frame.vectorized]
        if not any(frame.name == plate for frame in frames):
            global_names.append(name)
            continue
        fn = site["fn"]
        if len(frames) != 1 or len(fn.batch_shape) != 1:
            raise ConfigError(
                f"local site {name!r} has batch shape {tuple(fn.batch_shape)} under plates "
                f"{[f.name for f in frames]}; AmortizedGuide needs batch shape (B,) under plate {plate!r} alone: "
                "move per-data-point dimensions into the event with .to_event(...)"
            )
        plate_dim = frames[0].dim
        unconstrained = biject_to(fn.support).inv(site["value"].detach())
        local.append(LocalSite(name, fn.event_shape, unconstrained.shape[1:], fn.support))
    if not local:
        seen = sorted({f.name for _, s in sites for f in s["cond_indep_stack"]})
        raise ConfigError(
            f"the model has no latent sample site under plate {plate!r} (plates with latent sites: {seen or 'none'}); "
            "pass plate= the name of the model's data plate"
        )
    global_values = {name: trace.nodes[name]["value"].detach() for name in global_names}
    return Prototype(Layout(tuple(local), tuple(global_names), plate_dim), global_values)


class PlateCall(NamedTuple):
    """The model's data-plate arguments in one call: full size N, minibatch size B, the subsample (or None)."""

    size: int
    subsample_size: int
    subsample: torch.Tensor | None


def _plate_call(model: Callable, plate: str, global_values: dict, args: tuple, kwargs: dict) -> PlateCall:
    """Run ``model`` up to its data plate and read the plate's arguments.

    Global sites are conditioned on their prototype values, so the probe draws no random numbers; everything is
    blocked, so nothing reaches the caller's trace.
    """
    probe = poutine.escape(
        poutine.condition(model, data=global_values), escape_fn=lambda m: m["name"] == plate and site_is_subsample(m)
    )
    try:
        poutine.block(probe)(*args, **kwargs)
    except NonlocalExit as exit_:
        fn, subsample = exit_.site["fn"], exit_.site["value"]
        if subsample is not None:
            batch = len(subsample)
        else:
            batch = fn.size if fn.subsample_size is None else min(fn.subsample_size, fn.size)
        return PlateCall(fn.size, batch, subsample)
    raise ConfigError(f"the model did not open plate {plate!r} in this call; AmortizedGuide needs it on every call")


@contextlib.contextmanager
def _private_rng():
    # Tracing the model draws from its priors; a private stream keeps the guide's noise what it would be without.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


class _SharedPath:
    """u and every site's log-Jacobian, as drawn. ``deepcopy`` (hence Pyro's ``detach``) shares it rather than
    copying it: an estimator that detaches q's parameters keeps the derivative through the drawn path."""

    def __init__(self, u: torch.Tensor):
        self.u = u  # (*batch, L)
        self.log_jacobians: list[torch.Tensor] = []

    def __deepcopy__(self, memo):
        return self


class _LocalValue(TorchDistribution):
    """The distribution at a local site: a point mass at the value the guide drew, whose log-density is the site's
    log-Jacobian, plus log q(u | x) at the first site (``joint``). Its support is the model site's."""

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, value, event_dim, support, path, index, joint=None):
        self.v, self._support, self.path, self.index, self.joint = value, support, path, index, joint
        super().__init__(value.shape[: value.dim() - event_dim], value.shape[value.dim() - event_dim :], False)

    support = property(lambda self: self._support)

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) != self.batch_shape:
            raise NotImplementedError(f"cannot expand an amortised local site from {self.batch_shape} to {batch_shape}")
        return self

    def rsample(self, sample_shape=()) -> torch.Tensor:
        if sample_shape:
            raise NotImplementedError("an amortised local site is drawn once per guide call")
        return self.v

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if value is not self.v and not torch.equal(value, self.v):
            raise ValueError("AmortizedGuide scores only the values it drew itself; it cannot be replayed")
        log_p = self.path.log_jacobians[self.index]
        return log_p if self.joint is None else log_p + self.joint.log_prob(self.path.u)


# A param site whose value is the module's own tensor, as VAE announces its parameters (see pyro_vae.model).
_announce_param = effectful(lambda name, value, *args, **kwargs: value, type="param")


def _plate_batch_shape(batch_shape: torch.Size) -> torch.Size:
    """``batch_shape`` broadcast over every enclosing vectorised plate (e.g. the ELBO's particle plate), as Pyro's
    plates broadcast a sample site."""
    frames = [frame for frame in get_plates() if frame.vectorized]
    ndim = max([len(batch_shape)] + [-frame.dim for frame in frames])
    shape = [1] * (ndim - len(batch_shape)) + list(batch_shape)
    for frame in frames:
        shape[frame.dim] = frame.size
    return torch.Size(shape)


class AmortizedGuide(nn.Module):
    r"""An amortised guide for any Pyro model whose local latents lie under a data plate.

    ::

        guide = AmortizedGuide(model, plate="data", encoder_input=0, family="iaf:2", hidden_dims=(256, 128))
        svi = SVI(model, guide, pyro_vae.adamw(1e-3), Trace_ELBO())

    Local sites may have any event shape and continuous support (see the module docstring). The encoder is
    :class:`~pyro_vae.networks.Encoder`: one flattened data point in, ``family.num_params(L)`` raw numbers out.

    :param model: the Pyro model; the guide is called with the model's arguments.
    :param str plate: name of the model's data plate (default ``"data"``).
    :param encoder_input: index of the model's positional argument holding the per-data-point input ``(B, ...)``
        (default 0), or a callable ``(args, kwargs) -> tensor`` of shape ``(B, ...)``.
    :param family: a guide-family spec (``"mvn_diag"``, ``"full_rank"``, ``"iaf:2"``, …; see
        :func:`pyro_vae.guides.family_names`); L is set by the model.
    :param dict family_options: the family's own options (as ``VAE``'s ``guide_options``).
    :param hidden_dims: the encoder's hidden widths (default ``(256, 128)``: small models rarely need the seed VAE's
        four layers).
    :param str activation: the encoder's non-linearity (default ``"silu"``, the seed's).
    :param global_guide: a callable ``model -> AutoGuide`` for the global sites, run on the model with the local
        sites blocked (default :class:`~pyro.infer.autoguide.AutoNormal`), or ``None`` when the model has none.
    """

    def __init__(
        self,
        model: Callable,
        plate: str = "data",
        encoder_input: int | Callable[[tuple, dict], torch.Tensor] = 0,
        family: str = "mvn_diag",
        family_options: dict | None = None,
        hidden_dims: Sequence[int] = (256, 128),
        activation: str = "silu",
        global_guide: Callable | None = AutoNormal,
    ):
        super().__init__()
        _check_options(model, plate, encoder_input, family, family_options, global_guide)
        config = ModelConfig(hidden_dims=tuple(hidden_dims), activation=activation)  # validates both
        self._model = (model,)  # a tuple, so that a module's bound method does not become a submodule
        self.plate, self.encoder_input, self.family_spec = plate, encoder_input, family
        self.family_options = dict(family_options or {})
        self.hidden_dims, self.activation = config.hidden_dims, config.activation
        self._global_guide_factory = global_guide
        self.layout: Layout | None = None
        self._global_values: dict[str, torch.Tensor] = {}
        self._param_cache: list[tuple[str, torch.Tensor]] | None = None

    model = property(lambda self: self._model[0], doc="The model this guide serves.")

    def setup(self, *args, **kwargs) -> Layout:
        """Trace the model with these arguments and build the networks (the first call does it; call it yourself
        before ``load_state_dict``).

        :returns: the :class:`Layout` of the model's latent sites.
        """
        prototype = trace_prototype(self.model, self.plate, args, kwargs)
        layout = prototype.layout
        if layout.global_names and self._global_guide_factory is None:
            raise ConfigError(
                f"the model has global latent site(s) {list(layout.global_names)} outside plate {self.plate!r}, but "
                "global_guide=None; pass global_guide=AutoNormal (the default) or another AutoGuide class"
            )
        self._global_values = prototype.global_values
        call = _plate_call(self.model, self.plate, self._global_values, args, kwargs)
        x = self._input(args, kwargs, call.subsample_size)
        family = make_family(self.family_spec, layout.latent_dim, **self.family_options)
        encoder = Encoder(x.shape[1], self.hidden_dims, family.num_params, self.activation)
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        self.encoder, self.family = encoder.to(x.device, dtype), family.to(x.device, dtype)
        self.input_dim, self.dtype = x.shape[1], dtype
        if layout.global_names:
            local_names = [site.name for site in layout.local]
            with pyro.settings.context(module_local_params=True), _private_rng():
                self.global_guide = self._global_guide_factory(poutine.block(self.model, hide=local_names))
                poutine.block(self.global_guide)(*args, **kwargs)  # creates its parameters
            for name, p in self.global_guide.named_parameters():
                p._pyro_vae_site_name = f"amortized.global_guide.{name}"  # orders SingleOptimizer's state
        self.layout = layout
        self._param_cache = None
        return layout

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The guide: takes the model's arguments and returns ``{site name: value}`` for every latent site."""
        if self.layout is None:
            self.setup(*args, **kwargs)
        elif is_validation_enabled():
            self._check_layout(args, kwargs)
        call = _plate_call(self.model, self.plate, self._global_values, args, kwargs)
        x = self._input(args, kwargs, call.subsample_size)  # (B, D)
        for name, p in self._param_sites():
            _announce_param(name, p, constraint=constraints.real, event_dim=None, name=name)
        result = {}
        if self.layout.global_names:
            with pyro.settings.context(module_local_params=True):
                result.update(self.global_guide(*args, **kwargs))
        plate = pyro.plate(
            self.plate,
            call.size,
            subsample_size=call.subsample_size,
            subsample=call.subsample,
            dim=self.layout.plate_dim,
        )
        with plate:
            result.update(self._sample_local(self.encode(x)))
        return result

    def encode(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(u | x) for the encoder input ``x`` of shape ``(B, ...)``: batch_shape ``(B,)``, event_shape ``(L,)``, over
        the unconstrained local values u laid out as :attr:`layout` says."""
        x = x.reshape(x.shape[0], -1).to(self.dtype)  # (B, D)
        return self.family(self.encoder(x))  # the family checks the width

    def _sample_local(self, q: dist.TorchDistribution) -> dict[str, torch.Tensor]:
        if self.layout.direct:
            name = self.layout.local[0].name
            return {name: pyro.sample(name, q)}
        shape = _plate_batch_shape(q.batch_shape)  # (B,), or (K, B) under vectorised particles
        joint = q if shape == q.batch_shape else q.expand(shape)
        path = _SharedPath(joint.rsample())  # (*shape, L)
        values, offset = {}, 0
        for index, site in enumerate(self.layout.local):
            u = path.u[..., offset : offset + site.size].reshape(shape + site.unconstrained_shape)
            offset += site.size
            transform = biject_to(site.support)
            value = transform(u)  # (*shape, *site.shape)
            log_det = transform.inv.log_abs_det_jacobian(value, u)  # log |det ∂u/∂z|, not yet summed over the event
            path.log_jacobians.append(sum_rightmost(log_det, log_det.dim() - len(shape)))  # (*shape,)
            fn = _LocalValue(value, len(site.shape), site.support, path, index, joint if index == 0 else None)
            values[site.name] = pyro.sample(site.name, fn)
        return values

    def _input(self, args: tuple, kwargs: dict, batch: int) -> torch.Tensor:
        """The encoder input, checked to hold one row per data point of this call, flattened to ``(B, D)``."""
        if callable(self.encoder_input):
            x = self.encoder_input(args, kwargs)
        elif self.encoder_input >= len(args):
            raise DataError(
                f"encoder_input={self.encoder_input}, but the model was called with {len(args)} positional "
                "argument(s); pass the index of the per-data-point input, or a callable (args, kwargs) -> tensor"
            )
        else:
            x = args[self.encoder_input]
        if not torch.is_tensor(x) or x.dim() == 0 or x.shape[0] != batch:
            got = f"shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
            raise DataError(
                f"the encoder input has {got}, but plate {self.plate!r} holds {batch} data points in this call; "
                "encoder_input must give one row per data point of the minibatch"
            )
        x = x.reshape(batch, -1)
        if self.layout is not None and x.shape[1] != self.input_dim:
            raise DataError(
                f"the encoder input has {x.shape[1]} numbers per data point, not {self.input_dim} as at set-up"
            )
        return x

    def _check_layout(self, args: tuple, kwargs: dict) -> None:
        """With Pyro validation on: the local sites must keep the names and shapes the guide was set up with."""
        new = trace_prototype(self.model, self.plate, args, kwargs).layout
        old_shapes = {site.name: tuple(site.shape) for site in self.layout.local}
        new_shapes = {site.name: tuple(site.shape) for site in new.local}
        if old_shapes != new_shapes:
            raise ConfigError(
                f"the model's local sites changed between calls: {old_shapes} per data point when the guide was set "
                f"up, {new_shapes} now; AmortizedGuide needs fixed shapes, so build a new guide for the new model"
            )

    def _param_sites(self) -> list[tuple[str, torch.Tensor]]:
        # The encoder's and the family's parameters as Pyro param sites holding the module's own tensors (the global
        # guide announces its own). Cached; _apply (.to(), .double(), ...) may swap the tensors and clears it.
        if self._param_cache is None:
            self._param_cache = []
            for prefix in ("encoder", "family"):
                for name, p in getattr(self, prefix).named_parameters():
                    p.unconstrained = weakref.ref(p)  # SVI asks every param site for its unconstrained tensor
                    p._pyro_vae_site_name = f"amortized.{prefix}.{name}"  # orders SingleOptimizer's state
                    self._param_cache.append((p._pyro_vae_site_name, p))
        return self._param_cache

    def _apply(self, fn, recurse=True):
        self._param_cache = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"plate={self.plate!r}, family={self.family_spec!r}, layout={self.layout}"


def _check_options(model, plate, encoder_input, family, family_options, global_guide) -> None:
    """One line per bad option, before any tracing."""
    if not callable(model) or not isinstance(plate, str) or not plate:
        raise ConfigError(f"pass a Pyro model (a callable) and plate= the name of its data plate, got {plate!r}")
    if not callable(encoder_input):
        check_int("encoder_input (a model argument's index, or else a callable)", encoder_input, low=0)
    if not isinstance(family, str):  # L is known only once the model is traced, so a ready family cannot fit it
        raise ConfigError(f"family must be a family spec such as 'full_rank' or 'iaf:2', got {family!r}")
    if parse_spec(family)[0] not in family_names():
        raise unknown_choice("guide family", parse_spec(family)[0], family_names())
    if family_options is not None and not isinstance(family_options, dict):
        raise ConfigError(f"family_options must be a dict of the family's options, got {family_options!r}")
    if global_guide is not None and not callable(global_guide):
        raise ConfigError(f"global_guide must be an AutoGuide class (e.g. AutoNormal) or None, got {global_guide!r}")
