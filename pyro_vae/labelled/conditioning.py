"""How a label reaches the networks: one-hot codes appended to their inputs, and any batch shape.

A model with labels conditions two networks on y:

* the encoder of q(z | x, y) reads ``[x, onehot(y)]``: for a network that sees flat vectors (``mlp``) the C one-hot
  values are appended to the D pixels; for one that sees images (``conv``) they are appended as C constant
  channels, so that every filter sees the label;
* the decoder of p(x | z, y) reads ``[z, onehot(y)]``, a code of L + C numbers, whatever the network.

The networks themselves are the registered ones (:func:`pyro_vae.networks.make_networks`), built for the wider
inputs; nothing here is specific to a network. Under parallel enumeration y arrives with an extra leading dimension
(``(C, 1)`` against a batch ``(B,)``): :func:`apply_flat` runs a network on any batch shape by flattening it, and
:class:`BatchReshaped` gives the guide family's distribution back the batch shape of its inputs, so every
registered guide family works as q(z | x, y) unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import Independent, kl_divergence, register_kl
from torch.nn import functional as F

from pyro_vae.networks import Encoder, make_networks

__all__ = [
    "BatchReshaped",
    "ConditionalInput",
    "apply_flat",
    "build_classifier",
    "build_conditional_networks",
    "encoder_output",
    "joined",
    "one_hot",
]

_EMPTY = torch.Size()

#: Networks that read an image as a flat vector: their label goes in as C extra numbers, not C extra channels.
FLAT_NETWORKS = ("mlp",)


def one_hot(y: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """``onehot(y)`` of ``like``'s dtype and device: ``(..., C)`` for integer labels ``y`` of any shape."""
    return F.one_hot(y.long(), num_classes).to(dtype=like.dtype, device=like.device)


def apply_flat(net: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """``net`` on inputs ``(*batch, W)`` of any batch shape: flattened to ``(prod(batch), W)``, run, and given the batch
    shape back, so that networks written for ``(B, W)`` (convolutions reshape their input) take enumerated labels."""
    batch = inputs.shape[:-1]
    out = net(inputs.reshape(-1, inputs.shape[-1]))
    return out.reshape(*batch, out.shape[-1])


def joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[a, b]`` along the last dimension after broadcasting their batch shapes."""
    batch = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*batch, a.shape[-1]), b.expand(*batch, b.shape[-1])], dim=-1)


class ConditionalInput(nn.Module):
    """``(x, onehot(y)) → `` the encoder's input: appended values for a flat network, constant channels for an image
    network (``image_shape`` ``(C_img, H, W)``)."""

    def __init__(self, image_shape: tuple[int, ...] | None):
        super().__init__()
        self.image_shape = image_shape

    def forward(self, x: torch.Tensor, y_code: torch.Tensor) -> torch.Tensor:
        if self.image_shape is None:
            return joined(x, y_code)
        pixels = math.prod(self.image_shape[1:])
        # (..., K) one-hot → (..., K·H·W): channel k is the constant y_k over the image (channel-first rows).
        planes = y_code.unsqueeze(-1).expand(*y_code.shape, pixels).reshape(*y_code.shape[:-1], -1)
        return joined(x, planes)


def encoder_output(encoder: nn.Module, conditional_input: ConditionalInput, x: torch.Tensor, code: torch.Tensor):
    """The encoder's raw output for ``[x, onehot(y)]``, ``(*batch, num_params)`` for ``x (B, D)`` and one-hot codes
    whose batch shape broadcasts against ``(B,)``.

    For the ``mlp`` encoder (a :class:`~pyro_vae.networks.Encoder` whose first layer is linear) the first layer is
    split, ``W [x; y] + b = (W_x x + b) + W_y y``: ``W_x x`` is computed once per image and not once per enumerated
    class, which under M2's enumeration of C classes saves C − 1 of the C passes through the widest layer (the same
    numbers up to float rounding). Any other encoder reads the joined input.
    """
    # A routed encoder (DistributedDataParallel: an instance-level forward) must be called as a whole.
    routed = "forward" in encoder.__dict__
    body = encoder.body if isinstance(encoder, Encoder) else None
    first = body[0] if body is not None and len(body) else None
    if routed or conditional_input.image_shape is not None or not isinstance(first, nn.Linear):
        return apply_flat(encoder, conditional_input(x, code))
    d = x.shape[-1]
    hidden = F.linear(x, first.weight[:, :d], first.bias) + F.linear(code, first.weight[:, d:])  # (*batch, H)
    return apply_flat(lambda h: encoder.head(body[1:](h)), hidden)


def build_conditional_networks(
    name: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    latent_dim: int,
    num_params: int,
    output_dim: int,
    hidden_dims: Sequence[int],
    activation: str,
    conv_channels: Sequence[int],
) -> tuple[nn.Module, nn.Module, ConditionalInput]:
    """Build the registered pair ``name`` for inputs conditioned on one of ``num_classes`` labels.

    :returns: ``(encoder, decoder, conditional_input)``: the encoder takes ``conditional_input(x, onehot(y))``, the
        decoder ``[z, onehot(y)]``.
    """
    flat = name in FLAT_NETWORKS or len(input_shape) != 3
    if flat:
        encoder_shape = (math.prod(input_shape) + num_classes,)
    else:
        encoder_shape = (input_shape[0] + num_classes, *input_shape[1:])
    common = {"num_params": num_params, "hidden_dims": hidden_dims, "activation": activation}
    # Only the pair's encoder is kept; its unused decoder must still be valid for the wider input (conv refuses an
    # output that is not a whole number of its images), so it gets one value per input value.
    encoder = make_networks(
        name, input_shape=encoder_shape, latent_dim=latent_dim + num_classes, output_dim=math.prod(encoder_shape),
        conv_channels=conv_channels, **common,
    ).encoder  # fmt: skip
    decoder = make_networks(
        name, input_shape=input_shape, latent_dim=latent_dim + num_classes, output_dim=output_dim,
        conv_channels=conv_channels, **common,
    ).decoder  # fmt: skip
    return encoder, decoder, ConditionalInput(None if flat else tuple(input_shape))


def build_classifier(
    name: str, *, input_shape: tuple[int, ...], num_classes: int, hidden_dims: Sequence[int], activation: str,
    conv_channels: Sequence[int],
) -> nn.Module:  # fmt: skip
    """The classifier network of q(y | x): the registered encoder ``name`` with ``num_classes`` outputs (logits)."""
    # The pair's unused decoder gets one value per pixel, an output every network accepts.
    return make_networks(
        name, input_shape=input_shape, latent_dim=1, num_params=num_classes, output_dim=math.prod(input_shape),
        hidden_dims=hidden_dims, activation=activation, conv_channels=conv_channels,
    ).encoder  # fmt: skip


class BatchReshaped(dist.TorchDistribution):
    """A distribution over ``(*batch, *event)`` made from one over ``(prod(batch), *event)``: the guide family ran on
    flattened inputs (:func:`apply_flat`) and this gives its distribution the inputs' batch shape back.

    Sampling is reparameterised when the base's is; ``log_prob`` flattens the value's batch dimensions, scores, and
    restores them (extra leading sample dimensions are kept). :meth:`expand` adds batch dimensions (vectorised
    particles: ``(B,)`` to ``(P, B)``, or an enumerated ``(C, 1, B)`` to ``(C, P, B)``) by expanding the base to
    ``(E, prod(batch))``, E the product of the new sizes, so every new position gets its own draw.
    """

    arg_constraints = {}

    def __init__(self, base: dist.TorchDistribution, batch_shape: torch.Size, validate_args=None, *, order=None):
        self.base = base
        # Where each batch position (row-major) lies in the base's flattened batch; None: the same place (no expand).
        self._order: torch.Tensor | None = order
        # The last sample and the base's tensor it was reshaped from: flows score their own samples from a cache
        # keyed by the very tensor they returned (planar, radial, ...), so log_prob hands that tensor back.
        self._drawn: tuple[torch.Tensor, torch.Tensor] | None = None
        super().__init__(torch.Size(batch_shape), base.event_shape, validate_args=False)

    @property
    def has_rsample(self) -> bool:
        return self.base.has_rsample

    @property
    def support(self):
        return self.base.support

    def _lift(self, value: torch.Tensor, n_event: int | None = None) -> torch.Tensor:
        """``(*lead, *base.batch_shape, *event)`` → ``(*lead, *batch_shape, *event)`` (``n_event`` 0 for scores)."""
        n_event = len(self.event_shape) if n_event is None else n_event
        event = value.shape[value.dim() - n_event :]
        lead = value.shape[: value.dim() - n_event - len(self.base.batch_shape)]
        flat = value.reshape(*lead, -1, *event)
        if self._order is not None:
            self._order = self._order.to(flat.device)  # made on the CPU by expand; moved once
            flat = flat.index_select(len(lead), self._order)
        return flat.reshape(*lead, *self.batch_shape, *event)

    def _lower(self, value: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`_lift` for a value ``(*lead, *batch_shape, *event)``."""
        n_event = len(self.event_shape)
        lead = value.shape[: value.dim() - n_event - len(self.batch_shape)]
        value = value.expand(*lead, *self.batch_shape, *self.event_shape)
        flat = value.reshape(*lead, -1, *self.event_shape)
        if self._order is not None:
            self._order = self._order.to(flat.device)
            flat = flat.index_select(len(lead), torch.argsort(self._order))
        return flat.reshape(*lead, *self.base.batch_shape, *self.event_shape)

    def rsample(self, sample_shape=_EMPTY) -> torch.Tensor:
        drawn = self.base.rsample(sample_shape)
        self._drawn = (self._lift(drawn), drawn)
        return self._drawn[0]

    def sample(self, sample_shape=_EMPTY) -> torch.Tensor:
        drawn = self.base.sample(sample_shape)
        self._drawn = (self._lift(drawn), drawn)
        return self._drawn[0]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._drawn is not None and value is self._drawn[0]:
            flat = self._drawn[1]
        else:
            flat = self._lower(value)
        return self._lift(self.base.log_prob(flat), 0)

    @property
    def mean(self) -> torch.Tensor:
        return self._lift(self.base.mean)

    def expand(self, batch_shape, _instance=None):
        """The same distribution over more batch dimensions, each new position with its own draws: new leading
        dimensions, or sizes > 1 where the batch shape has 1 (Pyro's particle plate inside an enumerated y)."""
        target = torch.Size(batch_shape)
        if target == self.batch_shape:
            return self
        padded = torch.Size([1] * (len(target) - len(self.batch_shape)) + list(self.batch_shape))
        if len(target) < len(self.batch_shape) or any(o not in (1, t) for o, t in zip(padded, target, strict=True)):
            raise ValueError(f"BatchReshaped of batch shape {tuple(self.batch_shape)} cannot expand to {tuple(target)}")
        new = [i for i, (old, size) in enumerate(zip(padded, target, strict=True)) if old == 1 and size != 1]
        # The base grows a leading dimension of E = prod(new sizes): position t takes base row e(t), the row-major
        # index of t's coordinates along the new dimensions, and within it the column it had before.
        row = torch.zeros(target, dtype=torch.long)
        stride = 1
        for i in reversed(new):
            row = row + stride * torch.arange(target[i]).reshape([-1 if j == i else 1 for j in range(len(target))])
            stride *= target[i]
        before = torch.arange(math.prod(self.batch_shape)) if self._order is None else self._order.cpu()
        order = row * math.prod(self.base.batch_shape) + before.reshape(padded)
        base = self.base.expand(torch.Size([stride, *self.base.batch_shape]))
        return BatchReshaped(base, target, order=order.reshape(-1))


@register_kl(BatchReshaped, Independent)
def _kl_batch_reshaped(q: BatchReshaped, p: Independent) -> torch.Tensor:
    """KL(q ‖ p) for a p of independent Normals over the event (the standard prior, the one ``meanfield`` takes): the
    base's KL against p laid out as the base, so that q(z | x, y) has the closed form the VAE's q(z | x) has, where
    the family has one (else ``NotImplementedError``, and Pyro estimates the KL from the sample, as for the VAE)."""
    if (
        not isinstance(p.base_dist, torch.distributions.Normal)
        or p.reinterpreted_batch_ndims != 1
        or p.event_shape != q.event_shape
        or torch.broadcast_shapes(p.batch_shape, q.batch_shape) != q.batch_shape
    ):
        raise NotImplementedError(f"no closed-form KL of a BatchReshaped against {type(p).__name__}")
    shape = (*q.batch_shape, *q.event_shape)
    loc, scale = (q._lower(t.expand(shape)) for t in (p.base_dist.loc, p.base_dist.scale))
    return q._lift(kl_divergence(q.base, dist.Normal(loc, scale).to_event(1)), 0)
