"""Encoder and decoder networks: plain :mod:`torch.nn`, no Pyro.

The networks know nothing about distributions. The encoder maps an image to a flat vector of raw parameters whose
width the guide family chooses (``family.num_params``); the decoder maps a latent code to the raw parameters of the
likelihood (logits for a Bernoulli). Meaning is imposed elsewhere: in the guide family and in the likelihood.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

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
