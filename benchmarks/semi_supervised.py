"""Semi-supervised classification: M2 (Kingma et al. 2014) against the same classifier trained on the labels alone.

For each number of labels n (default 100, 600, 1000, 3000) and each seed, on full Fashion-MNIST (60 000 training,
10 000 test images, dynamically binarised):

* **M2**: ``fit`` with ``--model m2 --labelled n`` (n images chosen by the seed, balanced over the 10 classes; the
  other images unlabelled), every other option at its default: each step holds 128 unlabelled and 32 labelled images,
  α = 0.1 · N, the KL warm-up on z; the accuracy of q(y | x) on the 10 000 test images after the last epoch.
* **Baseline**: the very classifier network of M2's q(y | x) (:func:`pyro_vae.labelled.conditioning.build_classifier`,
  same widths, initial weights drawn from the seed), trained by AdamW (the same learning rate) on the same n
  labelled images only, in batches of 32 dynamically binarised images, for as many steps as M2 took: each sees the
  labelled images equally often. Cross-entropy is the classification loss α·log q(y | x) of M2 without the
  generative model.

Both are scored on the same binarised test split (:func:`pyro_vae.data.binarize_eval`). The table gives the accuracy
over seeds (mean ± standard error), the paired gain of M2 (its mean ± the SE of the per-seed differences), and, for
orientation only, the M2 accuracies Kingma et al. (2014, Table 1) report on **MNIST**, another data set.

Each finished run is appended as a JSON line to ``--results`` (default ``benchmarks/semi-supervised-results.jsonl``)
and a rerun skips the runs already there. Runs go in priority order: every seed of the first label count given, then
seed by seed for the others. ``--quick`` is a tiny smoke run on the embedded subset whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import pyro
import torch
from torch.nn import functional as F

from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.data import EpochBatches, binarize_eval, load_dataset, num_classes, select_labelled
from pyro_vae.labelled import build_model
from pyro_vae.labelled.conditioning import build_classifier
from pyro_vae.train import fit

#: Kingma et al. (2014), Table 1: M2's test error (%) on MNIST with 100, 600, 1000 and 3000 labels.
KINGMA_MNIST_M2_ERROR = {100: 11.97, 600: 4.94, 1000: 3.60, 3000: 3.92}


class RunRecord(NamedTuple):
    method: str  # "m2" or "baseline"
    labels: int
    seed: int
    accuracy: float
    steps: int
    seconds: float


def run_m2(data, data_config: DataConfig, labels: int, seed: int, epochs: int, max_steps: int | None) -> RunRecord:
    config = RunConfig(
        data=data_config.__class__(**{**data_config.__dict__, "labelled": labels}),
        model=ModelConfig(kind="m2"),
        train=TrainConfig(epochs=epochs, seed=seed, max_steps=max_steps, progress=False),
    )
    pyro.set_rng_seed(seed)
    model = build_model(config.model, data.input_dim, data.image_shape, num_classes(data))
    config = config.replace(model={"num_classes": model.num_classes})
    began = time.perf_counter()
    result = fit(model, data, config)
    return RunRecord("m2", labels, seed, result.epochs[-1].accuracy, result.steps, time.perf_counter() - began)


def run_baseline(data, data_config: DataConfig, labels: int, seed: int, steps: int, batch: int) -> RunRecord:
    """The classifier alone on the labelled images, for ``steps`` steps of ``batch`` images."""
    classes = num_classes(data)
    pyro.set_rng_seed(seed)
    model_config = ModelConfig()
    classifier = build_classifier(
        model_config.network, input_shape=(data.input_dim,), num_classes=classes, hidden_dims=model_config.hidden_dims,
        activation=model_config.activation, conv_channels=model_config.conv_channels,
    )  # fmt: skip
    index = select_labelled(data.y_train, labels, classes, seed)
    batches = EpochBatches(
        data.x_train[index], batch_size=batch, seed=seed, binarize=data_config.binarize, y=data.y_train[index]
    )
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=TrainConfig().lr, weight_decay=0.0)
    began, step, epoch = time.perf_counter(), 0, 0
    while step < steps:
        for b in batches.batches(epoch):
            loss = F.cross_entropy(classifier(b.x), b.y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
        epoch += 1
    x_test = binarize_eval(data.x_test, data_config.binarize, seed, data_config.threshold)
    with torch.no_grad():
        accuracy = (classifier(x_test).argmax(-1) == data.y_test).double().mean().item()
    return RunRecord("baseline", labels, seed, accuracy, steps, time.perf_counter() - began)


def speed_table(rounds: int, steps: int) -> list[str]:
    """ms per training step of the VAE, the CVAE and M2 (a mixed step: 128 unlabelled images with every class
    enumerated, 32 labelled; and a step on the 32 labelled images alone), on random binary 784-pixel images with the
    seed networks and C = 10, measured in interleaved rounds; ratios against the VAE's step."""
    from pyro_vae.labelled import LabelledPart
    from pyro_vae.step import TrainStep

    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((128, 784), 0.3), generator=g)
    x_l, y_l = x[:32], torch.randint(0, 10, (32,), generator=g)
    cases = {
        "vae": ("vae", {}),
        "cvae": ("cvae", {"y": torch.randint(0, 10, (128,), generator=g)}),
        "m2 mixed step (128 enumerated + 32 labelled)": (
            "m2",
            {"labelled": LabelledPart(x_l, y_l, 1000, torch.arange(32))},
        ),
        "m2 labelled images only (32)": ("m2", {"y": y_l}),
    }
    steps_of = {}
    for name, (kind, _) in cases.items():
        pyro.set_rng_seed(0)
        model = build_model(ModelConfig(kind=kind), 784, None, None if kind == "vae" else 10)
        if kind == "m2":
            model.set_aux_weight(60_000)
        steps_of[name] = TrainStep(model, TrainConfig(kl_schedule=None), num_data=59_000)
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (_, labels) in cases.items():
            xb = x_l if "only" in name else x
            for _ in range(2):  # warm
                steps_of[name].step(xb, torch.arange(xb.shape[0]), **labels)
            began = time.perf_counter()
            for _ in range(steps):
                steps_of[name].step(xb, torch.arange(xb.shape[0]), **labels)
            times[name].append((time.perf_counter() - began) / steps * 1000)
    base = statistics.median(times["vae"])
    lines = ["| step | ms/step (median of rounds) | × the VAE's step |", "| --- | --- | --- |"]
    for name, values in times.items():
        lines.append(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / base:.2f} |")
    return lines


def read_results(path: Path) -> list[RunRecord]:
    if not path.exists():
        return []
    return [RunRecord(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _mean_se(values: list[float]) -> str:
    if len(values) < 2:
        return f"{100 * values[0]:.2f} (1 seed)" if values else "n/a"
    return f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values) / math.sqrt(len(values)):.2f}"


def table(records: list[RunRecord], label_counts) -> list[str]:
    lines = [
        "| labels | baseline accuracy (%) | M2 accuracy (%) | M2 − baseline (paired, %) | seeds | M2 s/run | "
        "Kingma et al. M2 on MNIST (%) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in label_counts:
        base = {r.seed: r for r in records if r.method == "baseline" and r.labels == n}
        m2 = {r.seed: r for r in records if r.method == "m2" and r.labels == n}
        paired = sorted(set(base) & set(m2))
        gains = [m2[s].accuracy - base[s].accuracy for s in paired]
        seconds = statistics.fmean(r.seconds for r in m2.values()) if m2 else float("nan")
        kingma = KINGMA_MNIST_M2_ERROR.get(n)
        lines.append(
            f"| {n} | {_mean_se([r.accuracy for r in base.values()])} | {_mean_se([r.accuracy for r in m2.values()])} "
            f"| {_mean_se(gains)} | {len(paired)} | {seconds:.0f} | "
            f"{'' if kingma is None else f'{100 - kingma:.2f} (MNIST, not this data)'} |"
        )
    return lines


def plan(label_counts: list[int], seeds: int) -> list[tuple[int, int]]:
    """(labels, seed) in priority order: every seed of the first count, then seed by seed for the rest."""
    first, rest = label_counts[0], label_counts[1:]
    return [(first, s) for s in range(seeds)] + [(n, s) for s in range(seeds) for n in rest]


def sweep(data, data_config, label_counts, seeds, epochs, max_steps, results: Path) -> None:
    done = {(r.method, r.labels, r.seed) for r in read_results(results)}
    for labels, seed in plan(label_counts, seeds):
        if ("m2", labels, seed) not in done:
            record = run_m2(data, data_config, labels, seed, epochs, max_steps)
            _append(results, record)
        m2 = next(r for r in read_results(results) if (r.method, r.labels, r.seed) == ("m2", labels, seed))
        if ("baseline", labels, seed) not in done:
            batch = TrainConfig().labelled_batch or TrainConfig().batch_size // 4
            _append(results, run_baseline(data, data_config, labels, seed, m2.steps, min(batch, labels)))


def _append(path: Path, record: RunRecord) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record._asdict()) + "\n")
    print(f"{record.method} labels={record.labels} seed={record.seed}: accuracy {record.accuracy:.4f} "
          f"({record.steps} steps, {record.seconds:.0f} s)", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", default="1000,100,600,3000", help="label counts; the first gets every seed first")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="M2's epochs over the unlabelled images")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("semi-supervised-results.jsonl"))
    parser.add_argument("--table-only", action="store_true", help="print the table of the results file and stop")
    parser.add_argument("--speed-only", action="store_true", help="print the step-cost table (VAE, CVAE, M2) only")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the step-cost table")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (CI): numbers are not meaningful")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.speed_only or args.quick:
        print(f"threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}")
        print("\n".join(speed_table(1 if args.quick else args.rounds, 1 if args.quick else 10)))
        if args.speed_only:
            return 0
    label_counts = [int(n) for n in args.labels.split(",")]
    if args.quick:
        data_config = DataConfig(n_train=600, n_test=200)
        data = load_dataset(data_config)
        with tempfile.TemporaryDirectory() as tmp:
            results = Path(tmp) / "results.jsonl"
            sweep(data, data_config, [20, 40], 2, 1, 3, results)
            print("\n".join(table(read_results(results), [20, 40])))
        return 0
    data_config = DataConfig(dataset="fashion-mnist")
    if not args.table_only:
        sweep(load_dataset(data_config), data_config, label_counts, args.seeds, args.epochs, None, args.results)
    threads = "" if args.table_only else f"threads {torch.get_num_threads()}; "
    print(f"{threads}M2: {args.epochs} epochs; accuracy on the 10 000 test images")
    print("\n".join(table(read_results(args.results), sorted(label_counts))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
