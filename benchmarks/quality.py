"""Quality parity: pyro_vae's training step (a) against a hand-written PyTorch VAE (b), on the same budget.

For every seed both contenders start from the same weights, see the same minibatches in the same order (the same
dynamic binarisation draws), and use their own copy of the same RNG stream. (a) trains with :func:`pyro_vae.fit`;
(b) with the hand-written step of ``benchmarks/train_speed.py`` (reparameterisation by hand, closed-form KL, default
AdamW). Both are then evaluated by :func:`pyro_vae.evaluation.evaluate` on the same statically binarised test
images: the test ELBO and the importance-sampled log-likelihood (IS-NLL, k particles).

The table gives mean ± standard error over seeds, each seed's values, and whether (a)'s mean lies within the spread
(min..max over seeds) of (b). ``--contenders abe`` adds (e), (a) with the compiled step (``TrainConfig(compile=True)``,
``pyro-vae train --compile``), and says whether (e)'s mean lies within (a)'s seed spread: compiling must not change
what is learnt.

``python benchmarks/quality.py`` runs the issue's protocol (full Fashion-MNIST, 20 epochs, 3 seeds, k=1000, all
10 000 test images); ``--quick`` is a smoke run on a few embedded images.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_speed import make_torch_step  # noqa: E402

from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from pyro_vae.data import EpochBatches, binarize_eval, load_dataset  # noqa: E402
from pyro_vae.evaluation import DataProtocol, evaluate  # noqa: E402
from pyro_vae.model import VAE  # noqa: E402
from pyro_vae.stats import mean_se  # noqa: E402
from pyro_vae.train import fit  # noqa: E402


def train_handwritten(vae: VAE, x_train: torch.Tensor, seed: int, epochs: int, batch_size: int, max_steps=None):
    step = make_torch_step(vae, x_train.shape[0], fused=False)
    batches = EpochBatches(x_train, batch_size=batch_size, seed=seed, binarize="dynamic")
    torch.manual_seed(seed)
    steps = 0
    for epoch in range(epochs):
        for batch in batches.batches(epoch):
            if max_steps is not None and steps >= max_steps:
                return
            step(batch.x)
            steps += 1


def fmt_mean_se(values: list[float]) -> str:
    """Mean ± standard error over seeds (:func:`pyro_vae.stats.mean_se`); the mean alone for one seed."""
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return str(mean_se(values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (CI): numbers are not meaningful")
    parser.add_argument("--dataset", default="fashion-mnist", help="data set (default: full Fashion-MNIST)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--k", type=int, default=1000, help="particles of the IS log-likelihood")
    parser.add_argument("--n-test", type=int, default=None, help="test images to evaluate (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--contenders", default="ab", help="which to train, of a, b, e (default ab)")
    parser.add_argument("--objective", default="trace", help="(a)'s objective, e.g. meanfield (default: trace)")
    parser.add_argument("--guide", default="mvn_diag", help="(a)'s guide family (default: the seed, mvn_diag)")
    args = parser.parse_args(argv)
    if not args.contenders or set(args.contenders) - set("abe"):
        parser.error(f"--contenders takes letters of a, b and e (e.g. ab or abe), got {args.contenders!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        data_config, epochs, seeds, k, max_steps = DataConfig(n_train=256, n_test=32), 1, 2, 10, 4
        model_config = ModelConfig(hidden_dims=(32, 16))
    else:
        data_config = DataConfig(dataset=args.dataset, n_test=args.n_test)
        epochs, seeds, k, max_steps = args.epochs, args.seeds, args.k, None
        model_config = ModelConfig()
    data = load_dataset(data_config)
    x_test = binarize_eval(data.x_test, data_config.binarize, 0, data_config.threshold)
    protocol = DataProtocol.from_config(data_config, 0, dataset=data.name)
    print(
        f"# quality on {data.name}: {data.x_train.shape[0]} train / {x_test.shape[0]} test images, {epochs} epochs, "
        f"{seeds} seeds, IS-NLL with k={k}; torch threads {torch.get_num_threads()}; "
        f"(a) = fit with guide {args.guide}, objective {args.objective}"
    )
    guide_config = dataclasses.replace(model_config, guide=args.guide)
    results: dict[str, dict[str, list[float]]] = {name: {"elbo": [], "nll": []} for name in "abe"}
    for seed in range(seeds):
        torch.manual_seed(seed)
        initial = VAE.from_config(model_config, data.input_dim).state_dict()
        for name in args.contenders:
            # Families without parameters of their own (mvn_diag, diag_normal) share the seed's initial weights.
            vae = VAE.from_config(guide_config if name in "ae" else model_config, data.input_dim)
            vae.load_state_dict(initial)
            start = time.perf_counter()
            if name in "ae":
                config = RunConfig(
                    model=guide_config,
                    train=TrainConfig(
                        epochs=epochs,
                        seed=seed,
                        progress=False,
                        max_steps=max_steps,
                        objective=args.objective,
                        compile=name == "e",
                        kl_schedule=None,  # the plain ELBO, as (b) trains
                    ),
                )
                fit(vae, data, config)
            else:
                train_handwritten(vae, data.x_train, seed, epochs, 128, max_steps)
            trained = time.perf_counter() - start
            result = evaluate(vae, x_test, ks=(1, k), protocol=protocol, seed=0)
            results[name]["elbo"].append(result.elbo.mean)
            results[name]["nll"].append(-result.bounds[-1].log_px.mean)
            evaluated = time.perf_counter() - start - trained
            nll = result.bounds[-1].log_px
            print(
                f"#   seed {seed} {name}: test ELBO {result.elbo}, IS-NLL {-nll.mean:.2f} ± {nll.se:.2f} "
                f"(train {trained:.0f} s, eval {evaluated:.0f} s)"
            )
    print("| contender | test ELBO (mean ± SE over seeds) | IS-NLL | per-seed NLL |")
    print("|---|---|---|---|")
    labels = (("a", "(a) pyro_vae fit"), ("b", "(b) hand-written PyTorch"), ("e", "(e) pyro_vae fit, compiled"))
    for name, label in labels:
        r = results[name]
        if not r["nll"]:
            continue
        per_seed = ", ".join(f"{v:.2f}" for v in r["nll"])
        print(f"| {label} | {fmt_mean_se(r['elbo'])} | {fmt_mean_se(r['nll'])} | {per_seed} |")
    for tested, reference in (("a", "b"), ("e", "a")):
        if tested not in args.contenders or reference not in args.contenders:
            continue
        for metric in ("elbo", "nll"):
            spread = results[reference][metric]
            inside = min(spread) <= statistics.mean(results[tested][metric]) <= max(spread)
            print(
                f"({tested})'s mean {metric} {'lies within' if inside else 'lies OUTSIDE'} ({reference})'s seed "
                f"spread [{min(spread):.2f}, {max(spread):.2f}]"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
