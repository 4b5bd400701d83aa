"""The component table of ``train_speed.py``: pyro_vae's step ``a`` with one prior, likelihood or network changed from
the seed configuration, raced against ``a`` with the seed configuration.

The seed configuration is B=128, L=16, ``mvn_diag``, the ``standard`` prior, the ``bernoulli`` likelihood and the
``mlp`` network. Each row races two contenders, the seed and the variant, interleaved by :func:`_race.race` (the one
timing loop) from the same initial RNG stream and the same training images; its ratio is the paired ratio
variant / seed. A row whose value is the seed's own (``standard``, ``bernoulli``, ``mlp``) races the seed against an
identical copy of itself: its distance from 1 is the noise of the other ratios.

Data: a likelihood that needs binary pixels (``bernoulli``) gets dynamically binarised batches, every other likelihood
the grey batch itself (``binarize="none"``), as ``--binarize none`` would give it; the seed always gets the binarised
batch of the same images. Priors start as :func:`pyro_vae.fit` starts them (:meth:`~pyro_vae.priors.Prior.initialise`:
the VampPrior's pseudo-inputs are training images). ``conv`` sees the images as ``image_shape`` (1, 28, 28).

The table's header gives the thread count and the 1-minute load average (:func:`pyro_vae.compare.machine_load`) at
the start and the end of the table, and flags the table as taken under load when either exceeds the CPU count
(:func:`pyro_vae.compare_report.under_load`): threads then competed for the CPUs and every ratio is suspect.

The s/epoch of ``conv`` against ``mlp`` is *derived*, not timed: the network row's median ms/step times the steps of
one epoch of Fashion-MNIST's 60 000 training images at B=128 (469 steps), without the per-epoch evaluation and
shuffling; its ratio is that row's paired ratio.

``--quick`` races only :data:`QUICK`'s three rows, as a smoke run.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from _race import Contender, batch_pool, paired, race, rng_states, summary

from pyro_vae.compare import machine_load
from pyro_vae.compare_report import under_load
from pyro_vae.model import VAE

BATCH, LATENT = 128, 16
#: The seed configuration's value of each option the table varies.
SEED = {"prior": "standard", "likelihood": "bernoulli", "network": "mlp"}
#: The values raced against the seed, one row each (the seed's own value first: the A/A row).
VALUES = {
    "prior": ("standard", "mog:10", "vamp:50", "flow:4"),
    "likelihood": ("bernoulli", "continuous_bernoulli", "gaussian", "gaussian:learned", "beta", "discretized_logistic"),
    "network": ("mlp", "conv"),
}
#: ``--quick``'s rows: one value per option, the one with the most machinery of its kind (a prior built from the
#: encoder and started from images, a likelihood on grey batches with two outputs per pixel, the image network).
QUICK = (("prior", "vamp:50"), ("likelihood", "discretized_logistic"), ("network", "conv"))
#: Fashion-MNIST's training images: the epoch of the derived s/epoch rows.
EPOCH_IMAGES = 60_000

HEADER = "| option | value | data | a ms (IQR) | seed a ms | a / seed (paired) | weights | weights / seed |"


class ComponentRow(NamedTuple):
    """One raced variant.

    :ivar option: the option changed (``prior``, ``likelihood`` or ``network``).
    :ivar value: its value in the variant.
    :ivar binarize: the variant's batches: ``dynamic`` (binarised) or ``none`` (grey).
    :ivar step: the variant's median step time and its first and third quartiles, seconds.
    :ivar seed_step: the seed's median step time in the same race, seconds.
    :ivar ratio: the paired ratio of the variant's step time to the seed's.
    :ivar weights: the variant's trainable numbers (prior, networks, likelihood).
    :ivar seed_weights: the seed's.
    """

    option: str
    value: str
    binarize: str
    step: tuple[float, float, float]
    seed_step: float
    ratio: float
    weights: int
    seed_weights: int

    def cells(self) -> str:
        median, q1, q3 = (t * 1e3 for t in self.step)
        return (
            f"| {self.option} | {self.value} | {'binarised' if self.binarize == 'dynamic' else 'grey'} | "
            f"{median:.2f} ({q1:.2f}–{q3:.2f}) | {self.seed_step * 1e3:.2f} | {self.ratio:.3f} | {self.weights} | "
            f"{self.weights / self.seed_weights:.2f} |"
        )


def build_vae(options: dict[str, str], x: torch.Tensor, image_shape: Sequence[int]) -> VAE:
    """The VAE of ``options`` (prior, likelihood, network) at L=16 with ``mvn_diag``, seeded, started as ``fit``
    starts it."""
    torch.manual_seed(0)
    vae = VAE(x.shape[1], latent_dim=LATENT, image_shape=image_shape, **options).to(x.device)
    vae.prior.initialise(x, torch.Generator().manual_seed(0))  # fit's start: a VampPrior's pseudo-inputs are images
    return vae


def race_row(
    option: str,
    value: str,
    x: torch.Tensor,
    image_shape: Sequence[int],
    make_step: Callable,
    schedule: tuple[int, int, int],
) -> ComponentRow:
    """Race the seed configuration against the one with ``option=value`` (``schedule``: rounds, chunk, warm-up)."""
    rounds, chunk, warmup = schedule
    device, steps = x.device, rounds * chunk + warmup
    seed, variant = build_vae(SEED, x, image_shape), build_vae({**SEED, option: value}, x, image_shape)
    binarize = "dynamic" if variant.likelihood.requires_binary else "none"
    pools = {"seed": batch_pool(x, BATCH, steps, "dynamic"), "variant": batch_pool(x, BATCH, steps, binarize)}
    rng = rng_states(device)
    step_seed = Contender("seed", seed, make_step(seed, x.shape[0]), device, rng)
    step_variant = Contender("variant", variant, make_step(variant, x.shape[0]), device, rng)
    race([step_seed, step_variant], pools, rounds, chunk, warmup)
    weights = [sum(p.numel() for p in vae.parameters() if p.requires_grad) for vae in (variant, seed)]
    return ComponentRow(
        option, value, binarize, summary(step_variant), summary(step_seed)[0], paired(step_variant, step_seed), *weights
    )


def load_line(threads: int, start: float | None, end: float | None) -> str:
    """The header line on threads and load, flagged when the table was taken under load."""
    cpus = os.cpu_count()
    shown = ["unknown" if load is None else f"{load:.2f}" for load in (start, end)]
    line = f"# {threads} threads; 1-minute load {shown[0]} at start, {shown[1]} at end, on {cpus} CPUs"
    if under_load(start, cpus) or under_load(end, cpus):
        line += " — UNDER LOAD (load > CPUs): threads competed for the CPUs, the ratios are not to be trusted"
    return line


def components(
    x: torch.Tensor,
    image_shape: Sequence[int],
    schedule: tuple[int, int, int],
    make_step: Callable,
    quick: bool = False,
) -> None:
    """Print the component table and the derived s/epoch of conv against mlp (see the module docstring).

    :param x: the training images ``(N, D)``, grey, on the device.
    :param image_shape: one image's shape ``(C, H, W)``, for ``conv``.
    :param schedule: ``(rounds, chunk, warmup)`` of :func:`_race.race`.
    :param make_step: ``(vae, num_data) -> step``, the contender ``a``.
    :param quick: only the rows of :data:`QUICK` (a smoke run).
    """
    jobs = list(QUICK) if quick else [(option, value) for option, values in VALUES.items() for value in values]
    start = machine_load()
    rows = []
    for i, (option, value) in enumerate(jobs):
        rows.append(race_row(option, value, x, image_shape, make_step, schedule))
        print(f"# components: {i + 1}/{len(jobs)} ({option} {value}) raced", file=sys.stderr, flush=True)
    end = machine_load()
    print(
        f"\n# one option changed from the seed configuration (B={BATCH}, L={LATENT}, mvn_diag, "
        + ", ".join(SEED.values())
        + "): step a with that option against step a with the seed, interleaved; the seed's own values are A/A rows"
    )
    print(load_line(torch.get_num_threads(), start, end))
    print(HEADER)
    print("|---" * (HEADER.count("|") - 1) + "|")
    for row in rows:
        print(row.cells())
    conv = next(row for row in rows if row.value == "conv")
    steps = math.ceil(EPOCH_IMAGES / BATCH)
    print(f"\n# s/epoch derived as ms/step × {steps} steps ({EPOCH_IMAGES} images at B={BATCH}), not timed:")
    print("| network | s/epoch (derived) | conv / mlp (paired) |\n|---|---|---|")
    print(f"| mlp | {conv.seed_step * steps:.1f} | – |")
    print(f"| conv | {conv.step[0] * steps:.1f} | {conv.ratio:.3f} |")
