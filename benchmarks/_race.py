"""The one timing loop of ``train_speed.py``: contenders take training steps interleaved, in chunks, in a rotating
order, each with its own copy of the same RNG stream; the tables report medians and *paired* ratios (per round, the
ratio of two contenders' chunk medians; then the median over rounds), so that a slow spell of the machine falls on
both sides of a ratio.

A helper of ``train_speed.py`` (the leading underscore keeps it out of ``tests/test_benchmarks.py``'s list of
scripts); it is imported from the ``benchmarks`` folder, which a script run there has on ``sys.path``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from pyro_vae.data import EpochBatches
from pyro_vae.model import VAE

#: One training step's input: a minibatch ``(B, D)`` and its positions in the training set ``(B,)``.
Batch = tuple[torch.Tensor, torch.Tensor]


def rng_states(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU generator's state and, on CUDA, the device generator's (the model's noise is drawn there)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


class Contender:
    """One way of taking a training step; owns its model, optimiser, RNG stream and (on CUDA) peak memory.

    Every contender's step returns a Python float, so each timed step ends with a host sync on CUDA as on CPU.
    """

    def __init__(self, name: str, vae: VAE, step: Callable, device: torch.device, rng: tuple):
        self.name, self.vae, self._step, self.device = name, vae, step, device
        self.rng = tuple(None if state is None else state.clone() for state in rng)
        self.times: list[list[float]] = []
        self.losses: list[float] = []
        self.peak_bytes = 0

    def run(self, batches: Sequence[Batch]) -> float:
        """Run ``batches`` and record their per-step times; returns the chunk's total seconds."""
        torch.set_rng_state(self.rng[0])
        if self.rng[1] is not None:
            torch.cuda.set_rng_state(self.rng[1], self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        chunk = []
        for x, index in batches:
            start = time.perf_counter()
            loss = self._step(x, index)
            chunk.append(time.perf_counter() - start)
            self.losses.append(loss)
        if self.rng[1] is not None:
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
        self.rng = rng_states(self.device)
        self.times.append(chunk)
        return sum(chunk)


def batch_pool(x: torch.Tensor, batch: int, steps: int, binarize: str) -> list[Batch]:
    """The first ``steps`` full batches of size ``batch`` (seed 0, epoch after epoch; a short last batch is skipped,
    as the compiled step compiles one shape). The order does not depend on ``binarize``, so pools that differ only
    in it hold the same images."""
    batches = EpochBatches(x, batch_size=batch, seed=0, binarize=binarize)
    pool: list[Batch] = []
    epoch = 0
    while len(pool) < steps:
        pool += [(b.x, b.index) for b in batches.batches(epoch) if b.x.shape[0] == batch]
        epoch += 1
    return pool[:steps]


def race(
    racers: Sequence[Contender], pools: Mapping[str, Sequence[Batch]], rounds: int, chunk: int, warmup: int
) -> dict[str, float]:
    """Warm every racer up on its first ``warmup`` batches (untimed in the tables), then run ``rounds`` rounds of
    ``chunk`` steps per racer, the order rotating by one racer per round. Racer ``r`` takes its batches from
    ``pools[r.name]`` (at least ``warmup + rounds * chunk`` of them); racers given the same pool see the same batches.

    :returns: each racer's warm-up seconds, by name.
    """
    warm = {racer.name: racer.run(pools[racer.name][:warmup]) for racer in racers}
    for racer in racers:
        racer.times.clear()
    for r in range(rounds):
        order = list(racers[r % len(racers) :]) + list(racers[: r % len(racers)])
        for racer in order:
            racer.run(pools[racer.name][warmup + r * chunk : warmup + (r + 1) * chunk])
    return warm


def summary(racer: Contender) -> tuple[float, float, float]:
    """The racer's median step time and its first and third quartiles, in seconds."""
    flat = sorted(t for chunk in racer.times for t in chunk)
    q = statistics.quantiles(flat, n=4)
    return statistics.median(flat), q[0], q[2]


def paired(num: Contender, den: Contender) -> float:
    """The median over rounds of ``num``'s chunk median over ``den``'s."""
    ratios = [statistics.median(a) / statistics.median(b) for a, b in zip(num.times, den.times, strict=True)]
    return statistics.median(ratios)
