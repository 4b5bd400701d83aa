"""Encoder and decoder networks: plain :mod:`torch.nn`, no Pyro.

The networks know nothing about distributions. The encoder maps an image to a flat vector of raw parameters whose
width the guide family chooses (``family.num_params``); the decoder maps a latent code to the raw parameters of the
likelihood (logits for a Bernoulli). Meaning is imposed elsewhere: in the guide family and in the likelihood.

The pair is chosen by name from a registry (``--network``): :func:`make_networks` builds it, :func:`network_names`
lists the choices, :func:`register_network` adds one. Whatever the network, the encoder takes flat images ``(B, D)``
(D = C·H·W, channel-first) and returns one flat raw vector per image, and the decoder returns
``(..., D * params_per_dim)``, one block of D numbers per raw likelihood parameter (param-major: all of the first
parameter's D values, then the second's). Every encoder has a ``body`` (the image to features) and a linear ``head``
(features to the raw vector), which :mod:`pyro_vae.compare` re-initialises separately.

Two pairs are registered: ``mlp`` (the seed's multilayer perceptrons, widths from ``hidden_dims``) and ``conv``
(strided convolutions and transposed convolutions for ``(C, H, W)`` images, widths from ``conv_channels``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from pyro_vae.config import check_int
from pyro_vae.errors import ConfigError, DataError, unknown_choice

_ACTIVATIONS = {
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
}


def mlp(input_dim: int, hidden_dims: Sequence[int], output_dim: int, activation: str = "silu") -> nn.Sequential:
    """A multilayer perceptron ``input_dim → hidden_dims… → output_dim`` with an activation after every hidden layer.

    :param int input_dim: width of the input.
    :param hidden_dims: hidden widths, in order.
    :param int output_dim: width of the (linear) output layer.
    :param str activation: one of ``silu``, ``relu``, ``gelu``, ``tanh``, ``softplus``.
    """
    act = _ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    width = input_dim
    for hidden in hidden_dims:
        layers += [nn.Linear(width, hidden), act()]
        width = hidden
    layers.append(nn.Linear(width, output_dim))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """The amortised encoder: ``x (B, D) → raw (B, num_params)``.

    With the seed widths ``(512, 256, 128, 64)`` this is ``D→512→256→128→64→num_params``, SiLU between layers:
    the last layer is ``Linear(hidden_dims[-1], num_params)``, i.e. the seed's ``Linear(hidden // 8, 2 * L)`` for the
    ``mvn_diag`` family.

    :param int input_dim: D, taken from the data.
    :param hidden_dims: hidden widths from the input side.
    :param int num_params: raw output width, ``family.num_params``.
    :param str activation: non-linearity.
    """

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], num_params: int, activation: str = "silu"):
        super().__init__()
        hidden_dims = tuple(hidden_dims)
        self.input_dim = input_dim
        self.hidden_dim = hidden_dims[-1]
        self.body = mlp(input_dim, hidden_dims[:-1], hidden_dims[-1], activation)
        self.body.append(_ACTIVATIONS[activation]())
        self.head = nn.Linear(hidden_dims[-1], num_params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))  # (B, D) → (B, H) → (B, num_params)


class Decoder(nn.Module):
    """The decoder: ``z (..., L) → raw likelihood parameters (..., output_dim)``.

    With the seed widths this is ``L→64→128→256→512→D`` (the encoder's widths reversed), SiLU between layers.

    :param int latent_dim: L.
    :param hidden_dims: hidden widths from the latent side.
    :param int output_dim: D times the number of raw parameters per pixel the likelihood needs.
    :param str activation: non-linearity.
    """

    def __init__(self, latent_dim: int, hidden_dims: Sequence[int], output_dim: int, activation: str = "silu"):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = mlp(latent_dim, hidden_dims, output_dim, activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # (..., output_dim)


class Networks(NamedTuple):
    """An encoder ``(B, D) → (B, num_params)`` and a decoder ``(..., L) → (..., output_dim)``."""

    encoder: nn.Module
    decoder: nn.Module


class NetworkSpec(NamedTuple):
    """What a network builder is asked to build (see :func:`make_networks` for each field)."""

    input_shape: tuple[int, ...]
    latent_dim: int
    num_params: int
    output_dim: int
    hidden_dims: tuple[int, ...]
    activation: str
    conv_channels: tuple[int, ...]


#: A network builder: :class:`NetworkSpec` → :class:`Networks`. Each reads the fields it needs.
NetworkBuilder = Callable[[NetworkSpec], Networks]
_REGISTRY: dict[str, NetworkBuilder] = {}


def register_network(name: str) -> Callable[[NetworkBuilder], NetworkBuilder]:
    """Decorator that registers a network builder (``NetworkSpec -> Networks``) under ``name``::

    @register_network("my_net")
    def my_networks(spec: NetworkSpec) -> Networks:
        return Networks(MyEncoder(spec.input_shape, spec.num_params), MyDecoder(spec.latent_dim, spec.output_dim))
    """

    def add(builder: NetworkBuilder) -> NetworkBuilder:
        _REGISTRY[name] = builder
        return builder

    return add


def network_names() -> list[str]:
    """Registered network names, sorted (the CLI's ``--network`` choices)."""
    return sorted(_REGISTRY)


def make_networks(
    name: str,
    *,
    input_shape: Sequence[int],
    latent_dim: int,
    num_params: int,
    output_dim: int,
    hidden_dims: Sequence[int],
    activation: str = "silu",
    conv_channels: Sequence[int] = (32, 64),
) -> Networks:
    """Build the registered encoder/decoder pair ``name``.

    :param str name: a name of :func:`network_names`.
    :param input_shape: one image's shape: ``(D,)`` for flat data, ``(C, H, W)`` for images.
    :param int latent_dim: L.
    :param int num_params: the encoder's output width (``family.num_params``).
    :param int output_dim: the decoder's output width (``likelihood.output_dim(D)``).
    :param hidden_dims: hidden widths from the input side.
    :param str activation: non-linearity.
    :param conv_channels: the ``conv`` network's channel widths from the input side, one stride-2 layer each;
        default ``(32, 64)`` (:attr:`~pyro_vae.config.ModelConfig.conv_channels`'s). Other networks ignore it.
    :raises ConfigError: an unknown name, with the closest match.
    :raises DataError: images the network cannot take (``conv`` on flat data, or images under 8 pixels a side).
    """
    if name not in _REGISTRY:
        raise unknown_choice("network", name, _REGISTRY)
    spec = NetworkSpec(
        tuple(input_shape), latent_dim, num_params, output_dim, tuple(hidden_dims), activation, tuple(conv_channels)
    )
    return _REGISTRY[name](spec)


@register_network("mlp")
def mlp_networks(spec: NetworkSpec) -> Networks:
    """The seed networks: an MLP :class:`Encoder` on the flattened image and an MLP :class:`Decoder` with the widths
    reversed (``conv_channels`` is the conv network's and unused here)."""
    return Networks(
        Encoder(math.prod(spec.input_shape), spec.hidden_dims, spec.num_params, spec.activation),
        Decoder(spec.latent_dim, tuple(reversed(spec.hidden_dims)), spec.output_dim, spec.activation),
    )


#: The smallest image side ``conv`` takes: two stride-2 layers leave a 2×2 map, the least that keeps a spatial layout.
CONV_MIN_SIZE = 8


def _conv_out(size: int) -> int:
    """Side after a 3×3 stride-2 convolution with padding 1: ``⌊(n + 2 − 3) / 2⌋ + 1 = ⌈n / 2⌉`` (28 → 14 → 7,
    13 → 7 → 4)."""
    return (size + 1) // 2


def _conv_t_padding(small: int, large: int) -> int:
    """``output_padding`` that makes a 3×3 stride-2 transposed convolution with padding 1 give ``large`` from
    ``small``: it gives ``(small − 1)·2 − 2 + 3 + p = 2·small − 1 + p``, and a side ``large`` that the encoder halved
    to ``small = ⌈large / 2⌉`` is ``2·small − 1`` (odd) or ``2·small`` (even), so ``p`` is 0 or 1 (below the stride, as
    torch requires)."""
    return large - (2 * small - 1)


def _image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(C, H, W)`` from ``(C, H, W)`` or a legacy ``(H, W)`` (one grey channel); one line for anything else."""
    if len(input_shape) == 2:
        input_shape = (1, *input_shape)
    if len(input_shape) != 3:
        raise DataError(
            f"network 'conv' needs images (C, H, W) but the data are flat vectors of shape {input_shape}; give an "
            ".npz whose x is image-shaped, (N, H, W), (N, C, H, W) or (N, H, W, C) (in Python: VAE(..., "
            "image_shape=(C, H, W))), or use --network mlp"
        )
    c, h, w = input_shape
    if min(h, w) < CONV_MIN_SIZE:
        raise DataError(
            f"network 'conv' needs images of at least {CONV_MIN_SIZE}×{CONV_MIN_SIZE} pixels but these are {h}×{w} "
            f"(image shape {input_shape}); use --network mlp"
        )
    return c, h, w


class ConvEncoder(nn.Module):
    """A strided convolutional encoder: ``x (B, D) → raw (B, num_params)``, D = C·H·W channel-first.

    Each width ``c_i`` of ``channels`` is a ``Conv2d(c_{i-1}, c_i, 3, stride=2, padding=1)`` and the activation,
    halving each side (rounding up); the last map is flattened and a linear ``head`` gives the raw vector. Shapes for
    28×28 grey images and ``channels=(32, 64)``::

        (B, 784) → (B, 1, 28, 28) → (B, 32, 14, 14) → (B, 64, 7, 7) → (B, 3136) → head → (B, num_params)

    and for 32×32 colour ``(B, 3072) → (B, 3, 32, 32) → (B, 32, 16, 16) → (B, 64, 8, 8) → (B, 4096) → (B, num_params)``.

    :param image_shape: ``(C, H, W)``.
    :param channels: widths from the input side, one stride-2 layer each.
    :param int num_params: raw output width, ``family.num_params``.
    :param str activation: non-linearity.
    """

    def __init__(self, image_shape: Sequence[int], channels: Sequence[int], num_params: int, activation: str = "silu"):
        super().__init__()
        c, h, w = self.image_shape = tuple(image_shape)
        self.input_dim = c * h * w
        layers: list[nn.Module] = [nn.Unflatten(-1, (c, h, w))]
        for width in channels:
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1), _ACTIVATIONS[activation]()]
            c, h, w = width, _conv_out(h), _conv_out(w)
        layers.append(nn.Flatten(-3))
        self.body = nn.Sequential(*layers)
        self.hidden_dim = c * h * w
        self.head = nn.Linear(self.hidden_dim, num_params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        raw = self.head(self.body(x.reshape(-1, self.input_dim)))  # (B', C·H·W) → (B', C, H, W) → … → (B', num_params)
        return raw.reshape(*lead, raw.shape[-1])


class ConvDecoder(nn.Module):
    """A transposed-convolution decoder: ``z (..., L) → raw (..., P·D)``, param-major, D = C·H·W channel-first.

    A linear layer maps z to the encoder's last feature map; each stride-2 layer is undone by a
    ``ConvTranspose2d(·, ·, 3, stride=2, padding=1, output_padding=p)`` whose ``p ∈ {0, 1}`` per side gives back the
    encoder's size exactly (13 → 7 → 4 comes back 4 → 7 → 13), with the activation between layers and none after the
    last, which emits ``P·C`` channels. Channel ``p·C + c`` is parameter ``p`` of colour channel ``c``, so flattening
    ``(B, P·C, H, W)`` puts all of parameter 0's D values first (the param-major layout of the likelihoods). Shapes for
    28×28 grey images, ``channels=(32, 64)`` and P raw parameters per pixel::

        (B, L) → (B, 3136) → (B, 64, 7, 7) → (B, 32, 14, 14) → (B, P, 28, 28) → (B, P·784)

    :param int latent_dim: L.
    :param image_shape: ``(C, H, W)``.
    :param channels: the encoder's widths from the input side (the decoder runs them in reverse).
    :param int params_per_dim: P, raw likelihood parameters per pixel.
    :param str activation: non-linearity.
    """

    def __init__(
        self,
        latent_dim: int,
        image_shape: Sequence[int],
        channels: Sequence[int],
        params_per_dim: int = 1,
        activation: str = "silu",
    ):
        super().__init__()
        c, h, w = image_shape
        self.latent_dim = latent_dim
        self.output_dim = params_per_dim * c * h * w
        sizes = [(h, w)]  # the encoder's map sides, input first
        for _ in channels:
            sizes.append((_conv_out(sizes[-1][0]), _conv_out(sizes[-1][1])))
        widths = [params_per_dim * c, *channels]  # widths[i] is the channel count at sizes[i] (pixels: P·C)
        act = _ACTIVATIONS[activation]
        h0, w0 = sizes[-1]
        layers: list[nn.Module] = [
            nn.Linear(latent_dim, widths[-1] * h0 * w0),
            act(),
            nn.Unflatten(-1, (widths[-1], h0, w0)),
        ]
        for i in range(len(channels), 0, -1):  # (widths[i], sizes[i]) → (widths[i-1], sizes[i-1])
            padding = tuple(_conv_t_padding(small, large) for small, large in zip(sizes[i], sizes[i - 1], strict=True))
            layers.append(nn.ConvTranspose2d(widths[i], widths[i - 1], 3, stride=2, padding=1, output_padding=padding))
            if i > 1:
                layers.append(act())
        layers.append(nn.Flatten(-3))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]  # (B,) or (particles, B)
        return self.net(z.reshape(-1, self.latent_dim)).reshape(*lead, self.output_dim)


@register_network("conv")
def conv_networks(spec: NetworkSpec) -> Networks:
    """A :class:`ConvEncoder` and a :class:`ConvDecoder` for ``(C, H, W)`` images of at least 8×8 pixels (a legacy
    ``(H, W)`` is one grey channel), widths ``conv_channels`` (``hidden_dims`` is the mlp's and unused here).

    :raises DataError: flat data, or images under 8 pixels a side.
    :raises ConfigError: an ``output_dim`` that is not a whole number of images (a likelihood's ``output_dim`` bug).
    """
    image_shape, channels, output_dim = _image_shape(spec.input_shape), spec.conv_channels, spec.output_dim
    for width in channels:
        check_int("every entry of conv_channels", width, low=1)
    pixels = math.prod(image_shape)
    if output_dim % pixels:
        raise ConfigError(
            f"network 'conv' needs a decoder output that is a whole number of images of {pixels} values, but the "
            f"likelihood asks for {output_dim}; its output_dim must be a multiple of D"
        )
    return Networks(
        ConvEncoder(image_shape, channels, spec.num_params, spec.activation),
        ConvDecoder(spec.latent_dim, image_shape, channels, output_dim // pixels, spec.activation),
    )


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` (and every submodule) in eval mode for the block, then give each submodule back the
    ``training`` flag it had, also when the block raises.

    Each submodule's own flag is restored, not the root's applied to all: a model whose encoder was frozen in eval
    mode inside a training model comes back that way, which ``module.train(was_training)`` would undo. A module given
    twice (or reachable from two of the arguments) is restored to the flag it had on entry.

    :param modules: the modules, e.g. ``eval_mode(vae)``.
    """
    saved = {id(m): (m, m.training) for root in modules for m in root.modules()}
    for root in modules:
        root.eval()
    try:
        yield
    finally:
        for module, training in saved.values():
            module.training = training
