"""Defaults that learn: candidate training settings of the quickstart, measured on the embedded data.

The quickstart (``pyro-vae train`` with every default) trains the seed networks (hidden dims 512,256,128,64, L=16,
``mvn_diag``) on the embedded Fashion-MNIST subset (10 000 train / 2 000 test images). With the old defaults (lr 1e-3,
batch 128, 20 epochs, no KL schedule) it collapsed: a test ELBO of -264.3 with 2 of 16 active units. This script
trains each candidate setting with several seeds and prints, per candidate:

* the test ELBO (mean ± standard error over seeds; each seed's value is the mean over the 2 000 statically binarised
  test images, from :func:`pyro_vae.evaluation.evaluate`, which traces ``vae.model`` and ``vae.guide`` themselves and
  therefore never sees a KL schedule: the reported ELBO is always the unweighted one);
* active units (Burda et al. 2016, :data:`pyro_vae.evaluation.ACTIVE_UNIT_THRESHOLD`): mean and min over seeds;
* the test KL (nats per image, mean over seeds), and each seed's ELBO and active units (seed 0, 1, ...);
* the training steps, and seconds per run (training and evaluation; wall time, so under load it is indicative only).

Every candidate keeps the quickstart's budget of epochs × images unless its name says otherwise (``epochs 40``
doubles it, and its s/run shows the cost). A KL warm-up must end (weight 1) before training ends, so that the model
is trained on the plain ELBO at the end: the script refuses a candidate whose ``linear:S`` warm-up is longer than its
run. ``free_bits`` is measured for comparison only: it stays on to the last step (it is a surrogate, not the ELBO), so
it cannot be a default.

Each finished run is appended as a JSON line to ``--results`` (default ``benchmarks/defaults-results.jsonl``), and a
rerun skips the runs already there, so a long sweep can be stopped and continued. Runs go seed by seed (every
candidate's seed 0 first), so a partial sweep already covers every candidate.

``python benchmarks/defaults.py --threads 1`` runs the full sweep (13 candidates × 3 seeds); ``--only NAME,...``
restricts it; ``--quick`` is a tiny smoke run whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.data import binarize_eval, load_dataset
from pyro_vae.evaluation import DataProtocol, evaluate
from pyro_vae.model import VAE
from pyro_vae.schedules import make_schedule
from pyro_vae.stats import mean_se
from pyro_vae.train import fit


class Candidate(NamedTuple):
    """One training setting; the seed networks and every other option stay at the quickstart's."""

    name: str
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 20
    kl_schedule: str | None = None


#: The old quickstart defaults (lr 1e-3, batch 128, 20 epochs, plain ELBO) come first. At batch 128 an epoch of the
#: 10 000 embedded images is 79 steps, so 20 epochs are 1 580 steps; batch 64 is 3 140 steps and batch 256 is 800.
CANDIDATES = (
    Candidate("old defaults"),
    Candidate("warm-up linear:500", kl_schedule="linear:500"),
    Candidate("warm-up linear:1000", kl_schedule="linear:1000"),
    Candidate("warm-up linear:1500", kl_schedule="linear:1500"),
    Candidate("free bits 0.5 (never ends)", kl_schedule="free_bits:0.5"),
    Candidate("lr 3e-4", lr=3e-4),
    Candidate("lr 2e-3", lr=2e-3),
    Candidate("batch 64", batch_size=64),
    Candidate("batch 256", batch_size=256),
    Candidate("epochs 40 (2x budget)", epochs=40),
    Candidate("lr 2e-3 + linear:1000", lr=2e-3, kl_schedule="linear:1000"),
    Candidate("lr 3e-4 + linear:1000", lr=3e-4, kl_schedule="linear:1000"),
    Candidate("batch 64 + linear:2000", batch_size=64, kl_schedule="linear:2000"),
    # Fu et al. (2019): the weight rises over half of each cycle and holds 1 over the other half; 1 580 steps end in
    # the held half of the last cycle, so the last 197 (4 cycles) or 395 (2 cycles) steps train on the plain ELBO.
    Candidate("cyclical:395 (4 cycles)", kl_schedule="cyclical:395"),
    Candidate("cyclical:790 (2 cycles)", kl_schedule="cyclical:790"),
)


class RunRecord(NamedTuple):
    """One trained and evaluated run (one JSON line of the results file)."""

    candidate: str
    seed: int
    test_elbo: float
    active_units: int
    kl: float
    steps: int
    seconds: float


def total_steps(candidate: Candidate, n_train: int) -> int:
    """Optimiser steps of a run: every epoch is ``ceil(n_train / batch_size)`` steps (the last batch is partial)."""
    return candidate.epochs * math.ceil(n_train / candidate.batch_size)


def check_warmup_ends(candidate: Candidate, n_train: int, max_steps: int | None) -> None:
    """Refuse a ``linear:S`` warm-up that would not reach weight 1 before the run ends.

    :raises SystemExit: naming the candidate, its warm-up and its steps.
    """
    if candidate.kl_schedule is None:
        return
    steps = total_steps(candidate, n_train) if max_steps is None else min(max_steps, total_steps(candidate, n_train))
    schedule = make_schedule(candidate.kl_schedule)
    if schedule.name == "free_bits":
        return  # measured for comparison only (the module docstring says why it cannot be a default)
    schedule.steps = steps - 1  # the weight of the last step
    if schedule.beta() != 1.0:
        raise SystemExit(
            f"candidate {candidate.name!r}: {candidate.kl_schedule} weighs the KL term {schedule.beta():.3f} at the "
            f"last of its {steps} steps; the model would not end on the plain ELBO"
        )


def run_one(candidate: Candidate, seed: int, data, x_test, protocol, model_config, max_steps, k: int) -> RunRecord:
    """Train one candidate with one seed (:func:`pyro_vae.fit`, no run directory) and evaluate it on ``x_test``."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    vae = VAE.from_config(model_config, data.input_dim)
    train = TrainConfig(
        epochs=candidate.epochs,
        batch_size=candidate.batch_size,
        lr=candidate.lr,
        kl_schedule=candidate.kl_schedule,
        seed=seed,
        progress=False,
        max_steps=max_steps,
    )
    result = fit(vae, data, RunConfig(model=model_config, train=train))
    # ks=(k,): the ELBO, KL and active units come from the single-particle pass either way; k only adds the bound.
    evaluation = evaluate(vae, x_test, ks=(k,), protocol=protocol, seed=0)
    return RunRecord(
        candidate=candidate.name,
        seed=seed,
        test_elbo=evaluation.elbo.mean,
        active_units=evaluation.active_units,
        kl=evaluation.kl.mean,
        steps=result.steps,
        seconds=time.perf_counter() - start,
    )


def read_results(path: Path) -> list[RunRecord]:
    """The runs already in the results file (none if it does not exist)."""
    if not path.exists():
        return []
    return [RunRecord(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def table(records: list[RunRecord], candidates, latent_dim: int) -> list[str]:
    """The Markdown table, one row per candidate with at least one finished run, in the order of ``candidates``."""
    lines = [
        "| candidate | seeds | steps | test ELBO (mean ± SE over seeds) | active units of "
        f"{latent_dim} (mean, min) | KL (nats) | per seed: ELBO (active) | s/run (under load, indicative only) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for candidate in candidates:
        rows = sorted((r for r in records if r.candidate == candidate.name), key=lambda r: r.seed)
        if not rows:
            continue
        elbos = [r.test_elbo for r in rows]
        elbo = f"{elbos[0]:.2f}" if len(rows) < 2 else str(mean_se(elbos))
        active = [r.active_units for r in rows]
        lines.append(
            f"| {candidate.name} | {len(rows)} | {rows[0].steps} | {elbo} | {statistics.mean(active):.1f}, "
            f"{min(active)} | {statistics.mean(r.kl for r in rows):.1f} | "
            f"{', '.join(f'{r.test_elbo:.1f} ({r.active_units})' for r in rows)} | "
            f"{statistics.mean(r.seconds for r in rows):.0f} |"
        )
    return lines


def sweep(candidates, data_config, model_config, seeds: int, max_steps, results: Path, k: int) -> None:
    """Train and evaluate every candidate with every seed not yet in ``results``, then print the table."""
    data = load_dataset(data_config)
    n_train = data.x_train.shape[0]
    for candidate in candidates:
        check_warmup_ends(candidate, n_train, max_steps)
    x_test = binarize_eval(data.x_test, data_config.binarize, 0, data_config.threshold)
    protocol = DataProtocol.from_config(data_config, 0, dataset=data.name)
    print(
        f"# defaults on {data.name}: {n_train} train / {x_test.shape[0]} test images, {seeds} seeds, "
        f"networks {model_config.hidden_dims} L={model_config.latent_dim} {model_config.guide}; torch threads "
        f"{torch.get_num_threads()}; results in {results}",
        flush=True,
    )
    done = {(r.candidate, r.seed) for r in read_results(results)}
    for seed in range(seeds):
        for candidate in candidates:
            if (candidate.name, seed) in done:
                continue
            record = run_one(candidate, seed, data, x_test, protocol, model_config, max_steps, k)
            with results.open("a") as f:
                f.write(json.dumps(record._asdict()) + "\n")
            print(
                f"#   {candidate.name} seed {seed}: test ELBO {record.test_elbo:.2f}, {record.active_units} active, "
                f"KL {record.kl:.1f}, {record.seconds:.0f} s",
                flush=True,
            )
    records = [r for r in read_results(results) if r.seed < seeds]
    print("\n".join(table(records, candidates, model_config.latent_dim)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (CI): numbers are not meaningful")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--only", default=None, help="comma-separated candidate names to run (default: all)")
    parser.add_argument("--k", type=int, default=1, help="also the IS bound with k particles (default 1: none)")
    parser.add_argument("--results", type=Path, default=None, help="JSON-lines file of finished runs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    candidates = CANDIDATES
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {c.name for c in CANDIDATES}
        if unknown:
            parser.error(f"unknown candidate(s) {sorted(unknown)}; the candidates are {[c.name for c in CANDIDATES]}")
        candidates = tuple(c for c in CANDIDATES if c.name in wanted)
    if args.quick:
        # Three steps on 256 images with a warm-up that ends within them; the results file is removed afterwards.
        quick = (CANDIDATES[0], CANDIDATES[2]._replace(name="warm-up linear:2", kl_schedule="linear:2"))
        with tempfile.TemporaryDirectory() as tmp:
            data_config = DataConfig(n_train=256, n_test=32)
            sweep(quick, data_config, ModelConfig(), 2, 3, Path(tmp) / "results.jsonl", args.k)
    else:
        results = args.results or Path(__file__).resolve().parent / "defaults-results.jsonl"
        sweep(candidates, DataConfig(), ModelConfig(), args.seeds, None, results, args.k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
