"""Encoder and decoder networks: plain :mod:`torch.nn`, no Pyro.

The networks know nothing about distributions. The encoder maps an image to a flat vector of raw parameters whose
width the guide family chooses (``family.num_params``); the decoder maps a latent code to the raw parameters of the
likelihood (logits for a Bernoulli). Meaning is imposed elsewhere: in the guide family and in the likelihood.

The pair is chosen by name from a registry (``--network``): :func:`make_networks` builds it, :func:`network_names`
lists the choices, :func:`register_network` adds one. Whatever the network, the encoder takes flat images ``(B, D)``
(D = C·H·W, channel-first) and returns one flat raw vector per image, and the decoder returns
``(..., D * params_per_dim)``, one block of D numbers per raw likelihood parameter (param-major: all of the first
parameter's D values, then the second's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from pyro_vae.errors import unknown_choice

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


#: A network builder: keyword arguments ``input_shape`` (``(D,)`` or ``(C, H, W)``), ``latent_dim``, ``num_params``,
#: ``output_dim``, ``hidden_dims``, ``activation``; returns :class:`Networks`.
NetworkBuilder = Callable[..., Networks]
_REGISTRY: dict[str, NetworkBuilder] = {}


def register_network(name: str) -> Callable[[NetworkBuilder], NetworkBuilder]:
    """Decorator that registers a network builder under ``name``."""

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
) -> Networks:
    """Build the registered encoder/decoder pair ``name``.

    :param str name: a name of :func:`network_names`.
    :param input_shape: one image's shape: ``(D,)`` for flat data, ``(C, H, W)`` for images.
    :param int latent_dim: L.
    :param int num_params: the encoder's output width (``family.num_params``).
    :param int output_dim: the decoder's output width (``likelihood.output_dim(D)``).
    :param hidden_dims: hidden widths from the input side.
    :param str activation: non-linearity.
    :raises ConfigError: an unknown name, with the closest match.
    """
    if name not in _REGISTRY:
        raise unknown_choice("network", name, _REGISTRY)
    return _REGISTRY[name](
        input_shape=tuple(input_shape),
        latent_dim=latent_dim,
        num_params=num_params,
        output_dim=output_dim,
        hidden_dims=tuple(hidden_dims),
        activation=activation,
    )


@register_network("mlp")
def mlp_networks(
    *,
    input_shape: tuple[int, ...],
    latent_dim: int,
    num_params: int,
    output_dim: int,
    hidden_dims: tuple[int, ...],
    activation: str,
) -> Networks:
    """The seed networks: an MLP :class:`Encoder` on the flattened image and an MLP :class:`Decoder` with the widths
    reversed."""
    input_dim = math.prod(input_shape)
    return Networks(
        Encoder(input_dim, hidden_dims, num_params, activation),
        Decoder(latent_dim, tuple(reversed(hidden_dims)), output_dim, activation),
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
