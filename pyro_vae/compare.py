r"""Compare the values of one option under one protocol: :func:`compare` trains each value with each seed and
tabulates. The option is the guide family by default; ``field`` names any of :func:`vary_fields` (the guide, the
likelihood, the objective, and the prior and network where the config has them), e.g.
``compare(["bernoulli", "continuous_bernoulli"], config, seeds, field="likelihood")``.

Every (value, seed) run gets the same budget and everything that can be shared:

- **data**: the same training order, dynamic binarisation and binarised test split (all functions of the seed, see
  :class:`~pyro_vae.data.EpochBatches`), the same epochs, batch size, learning rate and (unless it is what varies)
  objective;
- **initial weights**: :func:`initial_vae` draws the encoder body and the decoder from a generator seeded by the
  seed alone, layer by layer in module order, so they are identical across values wherever the shapes agree (across
  guides and objectives all of them; across likelihoods with a different decoder width every layer but the last);
  the encoder head (whose width is ``family.num_params``) is drawn from its own seeded stream, so its first rows,
  the ones that emit the base Gaussian's numbers, coincide too; the family's own networks (a flow's hyper-networks)
  come from a stream seeded by (seed, family). Each run records how many of its numbers start equal to the first
  value's (:func:`shared_weights`: same name, shape and values), and the report says which share none;
- **noise**: :func:`pyro_vae.train.fit` seeds Pyro with the seed before the first step.

So a row is reproducible on its own: ``fit(initial_vae(model, D, s), data, config with seed s)`` gives the same
numbers as the row's run for seed s.

Reported per value (a :class:`CompareRow`):

- **test ELBO** after the last epoch (nats per image, on the binarised test split): mean over seeds ± its standard
  error :math:`\mathrm{sd} / \sqrt{S}`;
- **seconds per epoch**: the median over all epochs of all seeds of the training time of an epoch (SVI steps only,
  without the per-epoch evaluation), and its ratio to the reference value's median (:func:`reference_value`: the
  option's default, ``mvn_diag`` for guides, when it is compared, else the first value). Timings taken while the
  machine was busy are flagged: the 1-minute load average (:func:`machine_load`, our own threads included) is read
  before and after every run, and a run during which it exceeded the number of CPUs competed for them, so its
  seconds, and every ratio they enter, are marked as taken under load;
- **peak memory**: the growth of the process's resident set during a run (training and its per-epoch evaluations),
  measured by :class:`pyro_vae._memory.PeakRSS` (Linux's ``VmHWM`` after a reset, minus the RSS at the start, in
  MiB); the maximum over seeds. A tiny warm-up step with the same family, objective and optimiser runs first, so
  that one-time library initialisation is not counted. With ``isolate=True`` (the default of ``pyro-vae compare``)
  each run has a fresh process, so the figure does not depend on what ran before; in-process it is a lower bound,
  as the heap reuses memory that earlier runs freed. On systems without ``/proc`` it is not measured (``None``).

- **IS-NLL** (``nll_k`` particles, 1000 by default): :math:`-\log p(x)` estimated by the importance-weighted bound
  of :func:`pyro_vae.evaluation.evaluate` with the family's own q as the proposal (nats per image, on the same
  binarised test split; evaluation seed = the run's seed), mean over seeds ± standard error over seeds. It is an
  upper bound on the true NLL that tightens as q improves, so it compares the *models* the families trained, while
  the ELBO also charges each family for its own inference gap. Its time is not part of the seconds per epoch, nor
  its memory part of the peak. ``nll_images`` restricts it to the first test images (K forward passes of the
  decoder per image make it cost far more than training on a CPU); the table says how many.

- **accuracy** (M2): of q(y | x) on the test split after the last epoch, mean ± standard error over seeds.

A base config of ``--model cvae`` or ``m2`` compares like the VAE's, each run recording the data's C; the model kind
itself is no option to vary (:data:`KIND_NOT_VARIED` says why).

Every argument, the data and the output directory are checked before anything is trained or written: a refused
comparison leaves no file behind. The records and their tables live in :mod:`pyro_vae.compare_report`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from pyro.infer import SVI

from pyro_vae._memory import PeakRSS
from pyro_vae.checkpoint import atomic_write_bytes, environment_info, safe_name
from pyro_vae.compare_checks import (
    VARY_FIELDS,
    check_counts,
    check_data,
    check_out_dir,
    check_values,
    run_configs,
    vary_fields,
    with_classes,
)
from pyro_vae.compare_report import REFERENCE_GUIDE, CompareResult, CompareRow, SeedRun, summarise
from pyro_vae.config import SECTIONS, ModelConfig, RunConfig
from pyro_vae.data import Dataset, binarize_eval, derive_seed, load_dataset
from pyro_vae.errors import ConfigError, NonFiniteLossError
from pyro_vae.evaluation import DataProtocol, evaluate
from pyro_vae.labelled import SSVAE, build_model, class_count
from pyro_vae.labelled.evaluation import evaluate_labelled
from pyro_vae.labelled.training import epoch_evaluation
from pyro_vae.model import VAE
from pyro_vae.objectives import make_objective
from pyro_vae.optim import adamw
from pyro_vae.progress import Progress
from pyro_vae.stats import MeanSE
from pyro_vae.train import fit

logger = logging.getLogger(__name__)

__all__ = [
    "REFERENCE_GUIDE",
    "VARY_FIELDS",
    "CompareResult",
    "CompareRow",
    "SeedRun",
    "compare",
    "initial_vae",
    "machine_load",
    "reference_value",
    "shared_weights",
    "vary_fields",
]


def initial_vae(model: ModelConfig, input_dim: int, seed: int, image_shape: Sequence[int] | None = None) -> VAE:
    """The model a comparison starts from (a VAE, or the CVAE or M2 with ``model.num_classes`` set that
    ``model.kind`` names): shared parts identical across families for a given seed.

    The encoder body and the decoder are re-initialised (each layer's ``reset_parameters``, in module order) from
    ``torch.manual_seed(derive_seed("compare-shared", seed))``, the encoder head from
    ``derive_seed("compare-head", seed)``, and everything the family builds (a flow's networks and orderings) from
    ``derive_seed("compare-family", seed, model.guide)``. The global torch RNG is left as it was.

    :param model: the model section; ``model.guide`` is the family spec.
    :param int input_dim: D.
    :param int seed: the run's seed.
    :param image_shape: one image's shape ``(C, H, W)``, for networks that need it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("compare-family", seed, model.guide))
        vae = build_model(model, input_dim, image_shape)
        torch.manual_seed(derive_seed("compare-shared", seed))
        for module in (*vae.encoder.body.modules(), *vae.decoder.modules()):
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        torch.manual_seed(derive_seed("compare-head", seed))
        vae.encoder.head.reset_parameters()
    return vae


def _warm_up(config: RunConfig, input_dim: int, image_shape: Sequence[int] | None) -> None:
    """One SVI step and one evaluation of a tiny model of the run's kind (labels 0, 1; M2 enumerates y) with the
    run's family, objective and optimiser, on two random images, so that one-time initialisation (the first fused
    AdamW step alone maps about 150 MiB of kernels) happens before the memory of the run is measured. The global RNG
    is left as it was."""
    model = dataclasses.replace(config.model, hidden_dims=(8,))
    with torch.random.fork_rng(devices=[]):
        vae = build_model(model, input_dim, image_shape)  # a model with labels has num_classes set by _with_classes
        x, y = torch.rand(2, input_dim).bernoulli(), torch.arange(2)
        objective = make_objective(config.train.objective, config.train.num_particles, enumerate=vae.enumerates)
        if isinstance(vae, SSVAE):
            vae.set_aux_weight(2)
        SVI(vae.model, vae.guide, adamw(), objective).step(x, **({"y": y} if vae.kind == "cvae" else {}))
        epoch_evaluation(vae, x, None if vae.kind == "vae" else y, seed=0)


class _Job(NamedTuple):
    """One (value, seed) run of a comparison: its full config, the model config whose initial weights it shares, and
    where it writes (``None``: nowhere)."""

    variant: str
    seed: int
    run_dir: Path | None
    config: RunConfig
    reference_model: ModelConfig


def shared_weights(vae: VAE, reference: VAE) -> int:
    """Trainable numbers of ``vae`` held by a parameter that ``reference`` has under the same name, with the same
    shape and the same values: what two runs of a comparison share at the start."""
    theirs = dict(reference.named_parameters())
    return sum(
        p.numel()
        for name, p in vae.named_parameters()
        if p.requires_grad and name in theirs and theirs[name].shape == p.shape and torch.equal(theirs[name], p)
    )


def machine_load() -> float | None:
    """The machine's 1-minute load average (runnable threads, ours included), or ``None`` where the system has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows has no getloadavg; a sandbox may refuse it
        return None


def _nll(vae: VAE, data: Dataset, config: RunConfig, nll_k: int, nll_images: int | None) -> tuple[MeanSE, float, int]:
    """IS-NLL on the first ``nll_images`` test images binarised as the run's test ELBO saw them; also its seconds and
    the number of images."""
    dc, seed = config.data, config.train.seed
    x_test = binarize_eval(data.x_test, dc.binarize, seed, dc.threshold)[:nll_images]  # the ELBO's images
    x_test = x_test.to(next(vae.parameters()).device)
    protocol = DataProtocol.from_config(dc, seed, dataset=data.name)
    start = time.perf_counter()
    if class_count(vae) is None:
        nll = evaluate(vae, x_test, ks=(nll_k,), protocol=protocol, seed=seed).nll
    else:  # the CVAE's is of log p(x | y), with the test labels; M2's of log p(x), y summed out
        y_test = data.y_test[: x_test.shape[0]].to(x_test.device)
        nll = evaluate_labelled(vae, x_test, y_test, ks=(nll_k,), protocol=protocol, seed=seed).nll
    return nll, time.perf_counter() - start, x_test.shape[0]


def _run(job: _Job, data: Dataset | None, nll_k: int | None, nll_images: int | None, overwrite: bool) -> SeedRun:
    """Train one value with one seed, then estimate its NLL; loads the data when not given (in a child process)."""
    run_config = job.config
    if run_config.train.threads is not None:
        torch.set_num_threads(run_config.train.threads)
    if data is None:
        data = load_dataset(run_config.data)
    vae = initial_vae(run_config.model, data.input_dim, job.seed, data.image_shape)
    shared = shared_weights(vae, initial_vae(job.reference_model, data.input_dim, job.seed, data.image_shape))
    _warm_up(run_config, data.input_dim, data.image_shape)
    result = failure = None
    with PeakRSS() as memory:
        try:
            result = fit(vae, data, run_config, out_dir=job.run_dir, overwrite=overwrite)
        except NonFiniteLossError as err:
            # a value that diverges under the shared protocol is a result to report, not a reason to lose the others
            logger.warning("%s seed %d diverged: %s", job.variant, job.seed, err)
            failure = str(err)
    if result is not None and not result.epochs:
        raise ConfigError(
            f"the run of {job.variant} with seed {job.seed} finished no epoch; raise --max-steps or --epochs"
        )
    nll = nll_seconds = None
    if result is not None and nll_k is not None:
        nll, nll_seconds, nll_images = _nll(vae, data, run_config, nll_k, nll_images)
    return SeedRun(
        variant=job.variant,
        seed=job.seed,
        test_elbo=MeanSE(math.nan, math.nan) if result is None else result.test_elbo,
        epoch_seconds=() if result is None else tuple(e.seconds for e in result.epochs),
        peak_memory_mib=memory.peak_mib,
        num_params=vae.family.num_params,
        num_weights=sum(p.numel() for p in vae.parameters() if p.requires_grad),
        steps=0 if result is None else result.steps,
        dataset=data.name,
        nll=nll,
        nll_seconds=nll_seconds,
        nll_images=nll_images if nll is not None else None,
        failure=failure,
        shared_weights=shared,
        accuracy=result.epochs[-1].accuracy if result is not None else None,
    )


def _write_manifest(out: Path, config: RunConfig, field: str, values: Sequence[str], seeds: Sequence[int]) -> None:
    """``config.json``: what is being compared and on what software, written before the first run."""
    record = {
        "config": config.to_dict(),
        "vary": field,
        "values": list(values),
        "seeds": list(seeds),
        "environment": environment_info(),
    }
    if field == "guide":
        record["guides"] = list(values)  # the key of the guide-only comparisons of earlier versions
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "config.json", lambda f: f.write(text.encode()))


def _run_dir(out: Path | None, value: str, seed: int) -> Path | None:
    """``out/runs/<value>-seed<s>``, the value made a plain name (its options come from the user)."""
    name = f"{value.replace(':', '-').replace('/', '-')}-seed{seed}"
    return None if out is None else out / "runs" / safe_name(name, what="run name")


def _jobs(configs: dict[str, RunConfig], seeds: Sequence[int], out: Path | None) -> list[_Job]:
    """Seed by seed, every value: the first value's model is the one whose initial weights the others share."""
    reference = next(iter(configs.values())).model
    return [
        _Job(
            value,
            seed,
            _run_dir(out, value, seed),
            # compare shows a line per run; a step bar per run beside it would be noise (unless asked for)
            run_config.replace(train={"seed": seed, "progress": bool(run_config.train.progress)}),
            reference,
        )
        for seed in seeds
        for value, run_config in configs.items()
    ]


def compare(
    values: Sequence[str],
    config: RunConfig | None = None,
    seeds: Sequence[int] = (0,),
    *,
    field: str = "guide",
    data: Dataset | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    isolate: bool = False,
    nll_k: int | None = 1000,
    nll_images: int | None = None,
) -> CompareResult:
    """Train with every value of one option (``field``) and every seed under the same protocol, and tabulate.

    Everything is checked first (the field, every value's run config, the arguments, the data against each config,
    the output directory); a refused comparison writes nothing.

    :param values: the values of ``field``, e.g. guide specs ``["mvn_diag", "full_rank", "low_rank:4", "iaf:2"]``,
        or likelihoods ``["bernoulli", "continuous_bernoulli"]``.
    :param config: the shared run configuration (default :class:`~pyro_vae.config.RunConfig()`); its ``field`` and
        ``train.seed`` are set per run.
    :param seeds: the seeds, each an integer ≥ 0.
    :param str field: the option that varies, one of :func:`vary_fields` (default ``"guide"``).
    :param data: the data set; default: loaded from ``config.data`` (once here to check it, and again in each run's
        process when ``isolate``).
    :param out_dir: where ``config.json`` (the configuration, the values, seeds and software versions), each run's
        directory (``runs/<value>-seed<s>``) and the tables (``compare.md``, ``compare.csv``, ``runs.csv``) are
        written; ``None`` writes nothing.
    :param bool overwrite: replace an earlier comparison in ``out_dir`` (its files and the run directories of the
        runs compared now); default ``False`` refuses such a directory.
    :param bool isolate: run every (value, seed) in a fresh process, one at a time, so that memory is measured per
        run; ``data`` must then be ``None``.
    :param nll_k: particles of the importance-sampled NLL of every run (default 1000); ``None`` skips it.
    :param nll_images: estimate the NLL on the first this many test images (default ``None``: all of them).
    :returns: a :class:`CompareResult`, rows in the order of ``values``.
    """
    config = config or RunConfig()
    values = check_values(values, field)
    configs = run_configs(values, field, config)
    seeds = check_counts(seeds, nll_k, nll_images)
    if isolate and data is not None:
        raise ConfigError("isolate=True loads the data in each run's process from config.data; pass data=None")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_out_dir(out, [job.run_dir for job in _jobs(configs, seeds, out)], overwrite)
    checked = data if data is not None else load_dataset(config.data)
    config = with_classes(config, checked)
    configs = {value: with_classes(run_config, checked) for value, run_config in configs.items()}
    jobs = _jobs(configs, seeds, out)
    check_data(checked, list(configs.values()))
    if out is not None:
        _write_manifest(out, config, field, values, seeds)
    runs = _run_jobs(jobs, None if isolate else checked, nll_k, nll_images, overwrite)
    reference, cpus = reference_value(field, values), os.cpu_count()
    rows = summarise(values, runs, reference, cpus)
    result = CompareResult(rows, runs, config, runs[0].dataset, isolate, nll_k, field, cpus, reference)
    if out is not None:
        result.write(out)
    return result


def reference_value(field: str, values: Sequence[str]) -> str:
    """The value the time ratio is taken against: the field's default (``mvn_diag`` for the guide) when it is
    compared, else the first value."""
    default = next(f.default for f in dataclasses.fields(SECTIONS[vary_fields()[field]]) if f.name == field)
    return default if default in values else values[0]


def _run_jobs(jobs: Sequence[_Job], data: Dataset | None, nll_k, nll_images, overwrite: bool) -> list[SeedRun]:
    """Every job in order: in this process with ``data``, or each in a fresh process when ``data`` is ``None``; the
    machine's load is read before and after each, and progress is shown per run (:class:`pyro_vae.progress.Progress`).
    """
    runs = []
    with Progress(len(jobs), desc="compare", unit="runs", logger=logger) as progress:
        for job in jobs:
            before, start = machine_load(), time.perf_counter()
            if data is None:
                context = multiprocessing.get_context("spawn")
                # a fresh process per run (max_tasks_per_child would need Python 3.11)
                with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                    run = pool.submit(_run, job, None, nll_k, nll_images, overwrite).result()
            else:
                run = _run(job, data, nll_k, nll_images, overwrite)
            runs.append(run._replace(load_before=before, load_after=machine_load()))
            nll = "" if run.nll_seconds is None else f" (IS-NLL {run.nll_seconds:.0f} s)"
            note = f"{job.variant} seed {job.seed}: test ELBO {run.test_elbo}, {time.perf_counter() - start:.0f} s{nll}"
            progress.update(1, note)
    return runs
