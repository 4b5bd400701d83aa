"""Compiled step against the eager step (and the hand-written loop), side by side in one process.

Contenders (same initial weights, same batches, each with its own copy of the same RNG stream):

* ``a`` — the eager step: ``GuardedSVI(vae.model, vae.guide, adamw(), Trace_ELBO())``, validation off;
* ``b`` — the hand-written PyTorch loop of ``train_speed.py`` (``--no-hand`` leaves it out);
* ``e`` — the compiled step, :func:`pyro_vae.compile.compile_step` (``mode="reduce-overhead"``, CUDA graphs, on CUDA).

Contenders run interleaved in chunks with a rotating order; the table gives the median per-step time and the paired
ratio to ``a`` (per round, the ratio of chunk medians; then the median over rounds). Also reported: the compile time
(tracing plus Inductor's first call), the break-even step count ``compile_time / (t_a - t_e)`` after which compiling
has paid for itself, and on CUDA the peak allocated memory of each contender.

Run ``python benchmarks/compile_speed.py`` (``--device cuda``, ``--batch-sizes 128,1024,4096``); ``--quick`` is a
smoke run whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import Trace_ELBO

from pyro_vae.compile import compile_step
from pyro_vae.config import DataConfig
from pyro_vae.data import EpochBatches, load_dataset
from pyro_vae.model import VAE
from pyro_vae.optim import GuardedSVI, adamw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import make_torch_step  # noqa: E402

LR = 1e-3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Racer:
    """One contender: its step, its RNG stream, its chunk timings and its peak memory."""

    def __init__(self, name: str, step, device: torch.device):
        self.name, self.step, self.device = name, step, device
        self.rng = torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.times: list[float] = []
        self.peak = 0

    def run(self, batches) -> None:
        torch.set_rng_state(self.rng[0])
        if self.rng[1] is not None:
            torch.cuda.set_rng_state(self.rng[1], self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        sync(self.device)
        start = time.perf_counter()
        for x, index in batches:
            self.step(x, index)
        sync(self.device)
        self.times.append((time.perf_counter() - start) / len(batches))
        if self.rng[1] is not None:
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        self.rng = torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.rng[1] is not None else None


def make_racers(x_train, batch: int, device: torch.device, hand: bool) -> tuple[list[Racer], float]:
    n = x_train.shape[0]
    torch.manual_seed(0)
    reference = VAE(x_train.shape[1]).to(device)
    racers = []
    eager_vae = VAE(x_train.shape[1]).to(device)
    eager_vae.load_state_dict(reference.state_dict())
    svi = GuardedSVI(eager_vae.model, eager_vae.guide, adamw(LR), Trace_ELBO())
    racers.append(Racer("a", lambda x, i: svi.step(x, n, i), device))
    if hand:
        hand_vae = VAE(x_train.shape[1]).to(device)
        hand_vae.load_state_dict(reference.state_dict())
        racers.append(Racer("b", make_torch_step(hand_vae, n, fused=device.type == "cuda"), device))
    compiled_vae = VAE(x_train.shape[1]).to(device)
    compiled_vae.load_state_dict(reference.state_dict())
    example = x_train[:batch]
    index = torch.arange(batch, device=device)
    start = time.perf_counter()
    step = compile_step(compiled_vae, Trace_ELBO(), adamw(LR), num_data=n, batch_size=batch, device=device)
    if step is None:
        raise SystemExit("the default configuration did not compile; see the log line above")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for _ in range(3):  # Inductor compiles on the first call; CUDA graphs record on the next ones
            step(example, index)
    sync(device)
    compile_seconds = time.perf_counter() - start
    compiled_vae.load_state_dict(reference.state_dict())  # undo the warm-up steps' updates
    racers.append(Racer("e", step, device))
    return racers, compile_seconds


def run_batch_size(x_train, batch, device, rounds, chunk, hand) -> list[str]:
    batches = EpochBatches(x_train, batch_size=batch, seed=0, binarize="dynamic")
    pool, epoch = [], 0
    while len(pool) < rounds * chunk + chunk:  # full batches only: the compiled step's static shape
        pool += [(b.x, b.index) for b in batches.batches(epoch) if b.x.shape[0] == batch]
        epoch += 1
    pool = pool[: rounds * chunk + chunk]
    racers, compile_seconds = make_racers(x_train, batch, device, hand)
    for racer in racers:  # warm-up chunk, not timed
        racer.run(pool[:chunk])
        racer.times.clear()
    for r in range(rounds):
        for racer in racers[r % len(racers) :] + racers[: r % len(racers)]:
            racer.run(pool[chunk * (r + 1) : chunk * (r + 2)])
    by = {r.name: r for r in racers}
    t_a, t_e = statistics.median(by["a"].times), statistics.median(by["e"].times)
    even = f"{compile_seconds / (t_a - t_e):.0f}" if t_a > t_e else "never"
    rows = []
    for racer in racers:
        ratio = statistics.median(t / a for t, a in zip(racer.times, by["a"].times, strict=True))
        peak = f"{racer.peak / 2**20:.0f}" if device.type == "cuda" else "n/a"
        rows.append(f"| {batch} | {racer.name} | {statistics.median(racer.times) * 1e3:.3f} | {ratio:.3f} | {peak} |")
    rows.append(f"| {batch} | compile | {compile_seconds:.1f} s | break-even after {even} steps | |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (CI): numbers are not meaningful")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batch-sizes", default="128", help="comma-separated batch sizes (default 128)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=20)
    parser.add_argument("--no-hand", action="store_true", help="leave out the hand-written loop (b)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rounds, chunk = (2, 2) if args.quick else (args.rounds, args.chunk)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    x_train = load_dataset(DataConfig()).x_train.to(device)
    if args.quick:
        x_train = x_train[:256]
    pyro.set_rng_seed(0)
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"torch {torch.__version__}, pyro {pyro.__version__}, threads {torch.get_num_threads()}"
    )
    print("| batch | contender | ms/step (median) | ratio to a (paired) | peak MiB |")
    print("| --- | --- | --- | --- | --- |")
    with pyro.validation_enabled(False):
        for batch in sizes:
            for row in run_batch_size(x_train, batch, device, rounds, chunk, not args.no_hand):
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
