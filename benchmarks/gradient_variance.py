"""Variance of the encoder's gradient under the IWAE gradient estimators: ``iwae`` (reparam), ``stl``, ``dreg``.

The model is the seed VAE (default networks, L = 16), trained for a few hundred steps on the embedded Fashion-MNIST
subset so that q is a sensible proposal. At those fixed parameters and on one fixed minibatch of B images, each
estimator draws R independent gradient estimates of the IW bound at every k; replicate r uses the same noise for all
three estimators (common random numbers), which makes their ratios precise. Reported per k:

* ``Var[iwae]``: the total variance of the encoder's gradient, Σ over encoder coordinates of the sample variance
  over the R replicates (the trace of the covariance), for the reparameterised IWAE gradient;
* ``stl / iwae`` and ``dreg / iwae``: the same for STL and DReG, as ratios, with a 95 % bootstrap interval
  (replicates resampled jointly for the three estimators);
* ``decoder dreg / iwae``: the decoder's ratio, 1 by construction (every estimator gives the decoder the same
  gradient for the same noise).

At k = 1 STL and DReG coincide. Tucker et al. (2018) report the DReG encoder variance falling with k relative to
the IWAE gradient's, whose signal-to-noise ratio decays as k grows (Rainforth et al. 2018).

``python benchmarks/gradient_variance.py`` for the full table, ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.data import binarize_eval, load_dataset
from pyro_vae.model import VAE
from pyro_vae.objectives import IWAE_ELBO
from pyro_vae.train import fit

ESTIMATORS = ("reparam", "stl", "dreg")
LABELS = {"reparam": "iwae", "stl": "stl", "dreg": "dreg"}


def gradients(vae: VAE, x: torch.Tensor, k: int, replicates: int) -> dict[str, dict[str, torch.Tensor]]:
    """``{estimator: {"encoder": (R, P_enc), "decoder": (R, P_dec)}}``: per-image gradients of the IW bound."""
    groups = {
        "encoder": [p for n, p in vae.named_parameters() if n.startswith(("encoder.", "family."))],
        "decoder": [p for n, p in vae.named_parameters() if n.startswith(("decoder.", "likelihood."))],
    }
    out = {e: {g: [] for g in groups} for e in ESTIMATORS}
    for r in range(replicates):
        for estimator in ESTIMATORS:
            vae.zero_grad(set_to_none=True)
            torch.manual_seed(r)  # the same particles for every estimator
            IWAE_ELBO(k, estimator).loss_and_grads(vae.model, vae.guide, x)
            for group, params in groups.items():
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
                out[estimator][group].append(flat / x.shape[0])
    vae.zero_grad(set_to_none=True)
    return {e: {g: torch.stack(v) for g, v in groups_.items()} for e, groups_ in out.items()}


def total_variance(samples: torch.Tensor) -> float:
    """Σ over coordinates of the sample variance over replicates, for ``(R, P)`` samples."""
    return samples.double().var(0, unbiased=True).sum().item()


def _bootstrap_variances(samples: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Total variances of bootstrap resamples given as replicate counts ``(S, R)``, from the R × R Gram matrix of the
    centred replicates: with c the counts, Σ_p Var_p = R/(R-1) [c·‖g_r‖² / R - cᵀ G c / R²]; no (S, R, P) tensor."""
    g = samples.double() - samples.double().mean(0)
    gram = g @ g.T  # (R, R)
    r = samples.shape[0]
    return r / (r - 1) * ((counts @ gram.diagonal()) / r - ((counts @ gram) * counts).sum(-1) / r**2)


def bootstrap_counts(replicates: int, boots: int, generator: torch.Generator) -> torch.Tensor:
    """``(boots, R)``: how often each replicate appears in each resample."""
    idx = torch.randint(0, replicates, (boots, replicates), generator=generator)
    ones = torch.ones(boots, replicates, dtype=torch.float64)
    return torch.zeros(boots, replicates, dtype=torch.float64).scatter_add_(1, idx, ones)


def ratio_with_interval(num: torch.Tensor, den: torch.Tensor, counts: torch.Tensor):
    """Variance ratio and a 95 % percentile-bootstrap interval over the resamples ``counts``."""
    ratios = _bootstrap_variances(num, counts) / _bootstrap_variances(den, counts)  # (boots,)
    # With very few replicates a resample can repeat one replicate only: 0 / 0, left out of the quantiles.
    low, high = torch.nanquantile(ratios, torch.tensor([0.025, 0.975], dtype=ratios.dtype)).tolist()
    return total_variance(num) / total_variance(den), low, high


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small networks, few replicates")
    parser.add_argument("--replicates", type=int, default=100, help="gradient estimates per cell (default 100)")
    parser.add_argument("--batch", type=int, default=64, help="images in the fixed minibatch (default 64)")
    parser.add_argument("--train-steps", type=int, default=300, help="training steps before measuring (default 300)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ks = (1, 5, 50)
    if args.quick:
        model = ModelConfig(latent_dim=4, hidden_dims=(32, 16))
        replicates, batch, steps = 4, 8, 10
    else:
        model = ModelConfig()
        replicates, batch, steps = args.replicates, args.batch, args.train_steps
    config = RunConfig(
        data=DataConfig(n_train=1280 if args.quick else None),
        model=model,
        train=TrainConfig(epochs=1000, max_steps=steps, progress=False, seed=0, kl_schedule=None),
    )
    data = load_dataset(config.data)
    torch.manual_seed(0)
    vae = VAE.from_config(config.model, data.input_dim)
    fit(vae, data, config)
    vae.eval()
    x = binarize_eval(data.x_test[:batch], "dynamic", 0)
    print(
        f"encoder-gradient variance of the IW bound: seed VAE {model.hidden_dims}, L={model.latent_dim}, trained "
        f"{steps} steps on {data.name}; minibatch of {batch} test images, {replicates} replicates per cell with "
        f"common random numbers; torch {torch.__version__}, {platform.machine()}"
    )
    print()
    print("| k | Var[iwae] encoder | stl / iwae | dreg / iwae | decoder dreg / iwae |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    generator = torch.Generator().manual_seed(0)
    for k in ks:
        grads = gradients(vae, x, k, replicates)
        base = grads["reparam"]["encoder"]
        counts = bootstrap_counts(replicates, 1000, generator)  # the same resamples for every estimator
        cells = []
        for estimator in ("stl", "dreg"):
            ratio, low, high = ratio_with_interval(grads[estimator]["encoder"], base, counts)
            cells.append(f"{ratio:.3f} [{low:.3f}, {high:.3f}]")
        decoder = total_variance(grads["dreg"]["decoder"]) / total_variance(grads["reparam"]["decoder"])
        print(f"| {k} | {total_variance(base):.4g} | {cells[0]} | {cells[1]} | {decoder:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
