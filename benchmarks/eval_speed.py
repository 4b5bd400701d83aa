"""Evaluation speed and memory: :func:`pyro_vae.evaluate` against a hand-written PyTorch importance sampler.

Contenders, over the same networks (the seed VAE, L = 16) and the same binarised test images:

* ``evaluate`` — ``pyro_vae.evaluate(vae, x, ks=(1, 100, K))``: Pyro traces in a vectorised particle plate, the
  per-data-point log-weights, the IW bounds at every k, the ELBO's parts with the analytic KL, active units;
* ``torch`` — a hand-written importance sampler: ``z = loc + scale ⊙ ε``, Gaussian log-densities written out,
  ``-binary_cross_entropy_with_logits`` for log p(x | z), ``logsumexp`` over the K particles.

Both process the images in the same chunks of at most ``--chunk`` particles × images under ``torch.no_grad()``.
The images are split into rounds; in every round both contenders evaluate the round's images, in alternating order,
and the table gives the median per-image time and the median of the per-round paired ratios ``evaluate / torch``.
The target is a ratio of at most 1.2.

Peak memory is measured in fresh processes with :class:`pyro_vae._memory.PeakRSS` (``VmHWM`` reset after loading;
``ru_maxrss`` would inherit the parent's high-water mark) while evaluating N and 4 N images. With chunking, the peak
depends on the chunk size, not on K × N.

``python benchmarks/eval_speed.py`` runs the issue's setting (K = 1000 on the 10 000 Fashion-MNIST test images from
``/usr/share/datasets/fashion-mnist``, or the 2 000 embedded ones when those files are missing); ``--quick`` is a
smoke run.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pyro_vae.config import DataConfig
from pyro_vae.data import binarize_eval, load_dataset
from pyro_vae.errors import DataError
from pyro_vae.evaluation import evaluate
from pyro_vae.model import VAE


def load_images(quick: bool) -> tuple[torch.Tensor, str]:
    """Binarised test images: full Fashion-MNIST when its files are installed (else, and with ``quick``, the
    embedded subset)."""
    try:
        data = load_dataset(DataConfig() if quick else DataConfig(dataset="fashion-mnist"))
    except DataError:
        data = load_dataset(DataConfig())
    x = binarize_eval(data.x_test, "dynamic", 0)
    return (x[:64] if quick else x), data.name


@torch.no_grad()
def torch_sampler(vae: VAE, x: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """log p̂(x) with k particles per image, ``(N,)``, written with plain torch over ``vae``'s networks."""
    images = max(1, chunk_size // k)
    per_pass = min(k, chunk_size)
    out = []
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    for start in range(0, x.shape[0], images):
        xb = x[start : start + images]  # (B, D)
        raw = vae.encoder(xb)  # (B, 2L)
        loc, raw_scale = raw.chunk(2, dim=-1)
        scale = F.softplus(raw_scale) + vae.family.eps  # (B, L)
        log_w = []
        for first in range(0, k, per_pass):
            count = min(per_pass, k - first)
            eps = torch.randn(count, *loc.shape, dtype=loc.dtype)  # (P, B, L)
            z = loc + scale * eps
            log_q = (-0.5 * eps.square() - scale.log() - half_log_2pi).sum(-1)  # (P, B)
            log_prior = (-0.5 * z.square() - half_log_2pi).sum(-1)
            logits = vae.decoder(z)  # (P, B, D)
            log_lik = -F.binary_cross_entropy_with_logits(logits, xb.expand_as(logits), reduction="none").sum(-1)
            log_w.append(log_lik + log_prior - log_q)
        out.append(torch.logsumexp(torch.cat(log_w), 0) - math.log(k))
    return torch.cat(out)


def peak_mib(mode: str, n: int, k: int, chunk: int, threads: int, quick: bool) -> float:
    """Peak RSS (MiB) reached while running ``mode`` on n images, above the RSS just before it.

    A fresh process loads the data and a seed VAE, then measures ``mode`` with :class:`pyro_vae._memory.PeakRSS`
    (Linux's ``VmHWM`` reset on entry, minus the RSS on entry); loading the data would otherwise set the mark.
    """
    ks = (1, 100, k) if k > 100 else (k,)
    code = "\n".join(
        [
            "import sys, torch",
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})",
            "import eval_speed as b",
            "from pyro_vae._memory import PeakRSS",
            f"torch.set_num_threads({threads})",
            f"x = b.load_images({quick})[0][:{n}]",
            "torch.manual_seed(0)",
            "vae = b.VAE(x.shape[1]).eval()",
            "with PeakRSS() as memory:",
            f"    if {mode!r} == 'evaluate': b.evaluate(vae, x, {ks}, chunk_size={chunk})",
            f"    if {mode!r} == 'torch': b.torch_sampler(vae, x, {k}, {chunk})",
            "print(memory.peak_mib)",
        ]
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def run_evaluate(vae, x, ks, chunk, seed) -> tuple[float, float]:
    """Seconds for :func:`evaluate`, and its mean log p̂(x) at the largest k times the number of images."""
    start = time.perf_counter()
    result = evaluate(vae, x, ks, chunk_size=chunk, seed=seed)
    return time.perf_counter() - start, result.bound(ks[-1]).log_px.mean * x.shape[0]


def run_torch(vae, x, k, chunk, seed) -> tuple[float, float]:
    torch.manual_seed(seed)
    start = time.perf_counter()
    log_px = torch_sampler(vae, x, k, chunk)
    return time.perf_counter() - start, log_px.sum().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: K=50, 64 images, 2 rounds")
    parser.add_argument("--k", type=int, default=1000, help="particles per image (default 1000)")
    parser.add_argument("--chunk", type=int, default=4096, help="particles x images per pass (default 4096)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds the images are split into (default 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--n", type=int, help="use only the first N test images (default: all)")
    args = parser.parse_args(argv)
    k, rounds = (50, 2) if args.quick else (args.k, args.rounds)
    torch.set_num_threads(args.threads)
    x, name = load_images(args.quick)
    x = x[: args.n] if args.n else x
    torch.manual_seed(0)
    vae = VAE(x.shape[1]).eval()
    ks = (1, 100, k) if k > 100 else (k,)
    per_round = math.ceil(x.shape[0] / rounds)
    contenders = {
        "evaluate": lambda xr, seed: run_evaluate(vae, xr, ks, args.chunk, seed),
        "torch": lambda xr, seed: run_torch(vae, xr, k, args.chunk, seed),
    }
    for run in contenders.values():  # warm-up: first-call costs (Pyro's validated first chunk, allocator) untimed
        run(x[:2], 0)
    times = {"evaluate": [], "torch": []}
    totals = {"evaluate": 0.0, "torch": 0.0}
    ratios = []
    for r in range(rounds):
        xr = x[r * per_round : (r + 1) * per_round]
        if xr.shape[0] == 0:
            break
        seconds = {}
        for who in ["evaluate", "torch"] if r % 2 == 0 else ["torch", "evaluate"]:
            seconds[who], total = contenders[who](xr, r)
            totals[who] += total
            times[who].append(seconds[who] / xr.shape[0])
        ratios.append(seconds["evaluate"] / seconds["torch"])
    n_images = sum(min(per_round, x.shape[0] - r * per_round) for r in range(len(ratios)))
    print(
        f"evaluation at K={k} on {n_images} {name} test images, chunk {args.chunk}, {args.threads} thread(s); "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print()
    print("| contender | median ms / image | IQR ms / image | mean log p̂(x), k=K (nats) |")
    print("| --- | ---: | ---: | ---: |")
    for who in ("evaluate", "torch"):
        q = statistics.quantiles(times[who], n=4) if len(times[who]) > 1 else [times[who][0]] * 3
        print(
            f"| {who} | {1e3 * statistics.median(times[who]):.2f} | {1e3 * q[0]:.2f}–{1e3 * q[2]:.2f} | "
            f"{totals[who] / n_images:.2f} |"
        )
    print()
    print(
        f"paired ratio evaluate / torch: median {statistics.median(ratios):.3f} over {len(ratios)} rounds "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}); target <= 1.2"
    )
    print()
    n_small = 16 if args.quick else 500
    print("| contender | images | peak RSS above the start, MiB (fresh process, VmHWM) |")
    print("| --- | ---: | ---: |")
    for mode in ("evaluate", "torch"):
        for n in (n_small,) if args.quick else (n_small, 4 * n_small):
            print(f"| {mode} | {n} | {peak_mib(mode, n, k, args.chunk, args.threads, args.quick):.1f} |")
    naive = k * 4 * n_small * x.shape[1] * 4 / 2**20
    print(
        f"\n(one pass over all K x N = {k} x {4 * n_small} particles would hold {naive:.0f} MiB of float32 logits "
        "alone)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
