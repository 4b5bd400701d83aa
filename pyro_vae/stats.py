r"""Mean ± standard error, the one statistic every reported number carries, and how to pool it across groups.

For values :math:`v_1, \dots, v_n` the estimate is the sample mean :math:`\bar v` with the standard error of the
mean

.. math::

    \mathrm{SE} = \frac{s}{\sqrt n}, \qquad s^2 = \frac{M_2}{n - 1}, \qquad M_2 = \sum_i (v_i - \bar v)^2,

i.e. the sample standard deviation (``ddof=1``, as :func:`scipy.stats.sem`) over √n. Conventions at the edges:

* ``n == 1``: the mean is the value and the SE is NaN (one value says nothing about its spread);
* ``n == 0``: both are NaN (nothing was measured), so a summary over zero runs is visibly empty, not an error.

Everything is computed in float64 with the two-pass form (mean first, then squared deviations). The one-pass form
:math:`\sum v^2 - n \bar v^2` cancels: its relative error in the variance grows like
:math:`\epsilon \, (\bar v / s)^2` (ε ≈ 1.1e-16), so sums of squares are never what is reduced here.

Groups are pooled exactly with :class:`Moments` ``(count, mean, m2)`` and Chan et al.'s (1979) update,

.. math::

    n = \sum_g n_g, \quad \bar v = \frac{1}{n}\sum_g n_g \bar v_g, \quad
    M_2 = \sum_g \big(M_{2,g} + n_g (\bar v_g - \bar v)^2\big),

which is what the distributed reduction (:func:`pyro_vae.distributed.reduce_moments`) computes with two
all-reduces of sums: every term is a sum over groups, so pooling the ranks' moments gives the same numbers as
:func:`mean_se` over the union of their values, to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

__all__ = ["MeanSE", "Moments", "mean_se", "moments", "pool"]


class MeanSE(NamedTuple):
    """A mean and its standard error (sample standard deviation / √n; see the module docstring for n ≤ 1)."""

    mean: float
    se: float

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.se:.2f}"


class Moments(NamedTuple):
    r"""What a group of values contributes to a pooled mean ± SE.

    :ivar count: n, the number of values.
    :ivar mean: their mean (NaN when ``count == 0``).
    :ivar m2: :math:`M_2 = \sum_i (v_i - \bar v)^2`, the sum of squared deviations from their mean.
    """

    count: int
    mean: float
    m2: float

    def mean_se(self) -> MeanSE:
        """The mean ± standard error of the values these moments describe."""
        if self.count == 0:
            return MeanSE(math.nan, math.nan)
        if self.count == 1:
            return MeanSE(self.mean, math.nan)
        return MeanSE(self.mean, math.sqrt(max(self.m2, 0.0) / (self.count - 1) / self.count))

    @classmethod
    def from_mean_se(cls, value: MeanSE, count: int) -> Moments:
        r"""The moments of ``count`` values whose mean ± SE is ``value``: :math:`M_2 = \mathrm{SE}^2 \, n (n - 1)`
        (zero when ``count`` ≤ 1, where the SE is NaN and the group has no spread of its own)."""
        m2 = value.se**2 * count * (count - 1) if count > 1 else 0.0
        return cls(count, value.mean, m2)


def _as_float64(values: torch.Tensor | Sequence[float]) -> torch.Tensor:
    if torch.is_tensor(values):
        return values.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    return torch.tensor(list(values), dtype=torch.float64).reshape(-1)


def moments(values: torch.Tensor | Sequence[float]) -> Moments:
    """The :class:`Moments` of ``values`` (any shape; flattened), two-pass in float64.

    :param values: a tensor or a sequence of floats.
    """
    flat = _as_float64(values)
    n = flat.numel()
    if n == 0:
        return Moments(0, math.nan, 0.0)
    mean = flat.mean()
    return Moments(n, mean.item(), (flat - mean).square().sum().item())


def mean_se(values: torch.Tensor | Sequence[float]) -> MeanSE:
    """Mean ± standard error (``ddof=1``) of ``values``, in float64; ``se`` is NaN for one value, both for none.

    :param values: a tensor (e.g. per-image ELBOs ``(N,)``) or a sequence of floats (e.g. one number per seed).
    """
    return moments(values).mean_se()


def pool(groups: Iterable[Moments]) -> Moments:
    """Exact moments of the union of ``groups`` (Chan et al.'s update; see the module docstring).

    :param groups: the groups' :class:`Moments`; empty groups contribute nothing.
    """
    groups = [g for g in groups if g.count > 0]
    count = sum(g.count for g in groups)
    if count == 0:
        return Moments(0, math.nan, 0.0)
    mean = math.fsum(g.count * g.mean for g in groups) / count
    m2 = math.fsum(g.m2 + g.count * (g.mean - mean) ** 2 for g in groups)
    return Moments(count, mean, m2)
