r"""Compare guide families under one protocol: :func:`compare` trains each family with each seed and tabulates.

Every (family, seed) run gets the same budget and everything that can be shared:

- **data**: the same training order, dynamic binarisation and binarised test split (all functions of the seed, see
  :class:`~pyro_vae.data.EpochBatches`), the same epochs, batch size, learning rate and objective;
- **initial weights**: :func:`initial_vae` draws the encoder body and the decoder from a generator seeded by the
  seed alone, so they are identical across families; the encoder head (whose width is ``family.num_params``) is
  drawn from its own seeded stream, so its first rows, the ones that emit the base Gaussian's numbers, coincide
  too; the family's own networks (a flow's hyper-networks) come from a stream seeded by (seed, family);
- **noise**: :func:`pyro_vae.train.fit` seeds Pyro with the seed before the first step.

So a row is reproducible on its own: ``fit(initial_vae(model, D, s), data, config with seed s)`` gives the same
numbers as the row's run for seed s.

Reported per family (a :class:`CompareRow`):

- **test ELBO** after the last epoch (nats per image, on the binarised test split): mean over seeds ± its standard
  error :math:`\mathrm{sd} / \sqrt{S}`;
- **seconds per epoch**: the median over all epochs of all seeds of the training time of an epoch (SVI steps only,
  without the per-epoch evaluation), and its ratio to ``mvn_diag``'s median when ``mvn_diag`` is compared;
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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from pyro.infer import SVI

from pyro_vae._memory import PeakRSS
from pyro_vae.checkpoint import atomic_write_bytes, environment_info
from pyro_vae.compare_report import REFERENCE_GUIDE, CompareResult, CompareRow, SeedRun, summarise
from pyro_vae.config import SEED_MAX, ModelConfig, RunConfig, check_int
from pyro_vae.data import Dataset, binarize_eval, check_batch_size, check_likelihood_data, derive_seed, load_dataset
from pyro_vae.errors import ConfigError, NonFiniteLossError
from pyro_vae.evaluation import DataProtocol, evaluate, evaluate_elbo
from pyro_vae.guides import make_family
from pyro_vae.likelihoods import make_likelihood
from pyro_vae.model import VAE
from pyro_vae.objectives import make_objective
from pyro_vae.optim import adamw
from pyro_vae.stats import MeanSE
from pyro_vae.train import fit

logger = logging.getLogger(__name__)

__all__ = ["SeedRun", "CompareRow", "CompareResult", "compare", "initial_vae", "REFERENCE_GUIDE"]

#: The files a comparison writes into its output directory (besides ``runs/``, one run directory per run).
COMPARE_FILES = ("config.json", "compare.md", "compare.csv", "runs.csv")


def initial_vae(model: ModelConfig, input_dim: int, seed: int) -> VAE:
    """The VAE a comparison starts from: shared parts identical across families for a given seed.

    The encoder body and the decoder are re-initialised (each layer's ``reset_parameters``, in module order) from
    ``torch.manual_seed(derive_seed("compare-shared", seed))``, the encoder head from
    ``derive_seed("compare-head", seed)``, and everything the family builds (a flow's networks and orderings) from
    ``derive_seed("compare-family", seed, model.guide)``. The global torch RNG is left as it was.

    :param model: the model section; ``model.guide`` is the family spec.
    :param int input_dim: D.
    :param int seed: the run's seed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("compare-family", seed, model.guide))
        vae = VAE.from_config(model, input_dim)
        torch.manual_seed(derive_seed("compare-shared", seed))
        for module in (*vae.encoder.body.modules(), *vae.decoder.modules()):
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        torch.manual_seed(derive_seed("compare-head", seed))
        vae.encoder.head.reset_parameters()
    return vae


def _warm_up(config: RunConfig, input_dim: int) -> None:
    """One SVI step and one evaluation of a tiny VAE with the run's family, objective and optimiser, on two random
    images, so that one-time initialisation (the first fused AdamW step alone maps about 150 MiB of kernels) happens
    before the memory of the run is measured. The global RNG is left as it was."""
    model = dataclasses.replace(config.model, hidden_dims=(8,))
    with torch.random.fork_rng(devices=[]):
        vae = VAE.from_config(model, input_dim)
        x = torch.rand(2, input_dim).bernoulli()
        svi = SVI(vae.model, vae.guide, adamw(), make_objective(config.train.objective, config.train.num_particles))
        svi.step(x)
        evaluate_elbo(vae, x)


class _Job(NamedTuple):
    """One (family, seed) run of a comparison and where it writes (``None``: nowhere)."""

    guide: str
    seed: int
    run_dir: Path | None


def _nll(vae: VAE, data: Dataset, config: RunConfig, nll_k: int, nll_images: int | None) -> tuple[MeanSE, float, int]:
    """IS-NLL on the first ``nll_images`` test images binarised as the run's test ELBO saw them; also its seconds and
    the number of images."""
    dc, seed = config.data, config.train.seed
    x_test = binarize_eval(data.x_test, dc.binarize, seed, dc.threshold)[:nll_images]  # the ELBO's images
    x_test = x_test.to(next(vae.parameters()).device)
    protocol = DataProtocol.from_config(dc, seed, dataset=data.name)
    start = time.perf_counter()
    nll = evaluate(vae, x_test, ks=(nll_k,), protocol=protocol, seed=seed).nll
    return nll, time.perf_counter() - start, x_test.shape[0]


def _run(
    job: _Job, config: RunConfig, data: Dataset | None, nll_k: int | None, nll_images: int | None, overwrite: bool
):
    """Train one family with one seed, then estimate its NLL; loads the data when not given (in a child process)."""
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    if data is None:
        data = load_dataset(config.data)
    run_config = config.replace(model={"guide": job.guide}, train={"seed": job.seed})
    vae = initial_vae(run_config.model, data.input_dim, job.seed)
    _warm_up(run_config, data.input_dim)
    result = failure = None
    with PeakRSS() as memory:
        try:
            result = fit(vae, data, run_config, out_dir=job.run_dir, overwrite=overwrite)
        except NonFiniteLossError as err:
            # a family that diverges under the shared protocol is a result to report, not a reason to lose the others
            logger.warning("%s seed %d diverged: %s", job.guide, job.seed, err)
            failure = str(err)
    if result is not None and not result.epochs:
        raise ConfigError(
            f"the run of {job.guide} with seed {job.seed} finished no epoch; raise --max-steps or --epochs"
        )
    nll = nll_seconds = None
    if result is not None and nll_k is not None:
        nll, nll_seconds, nll_images = _nll(vae, data, run_config, nll_k, nll_images)
    return SeedRun(
        guide=job.guide,
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
    )


def _check_guides(guides: Sequence[str], latent_dim: int) -> list[str]:
    guides = [str(g).strip() for g in guides]
    if not guides or any(not g for g in guides):
        raise ConfigError(f"give at least one guide family, separated by commas, got {guides!r}")
    duplicates = sorted({g for g in guides if guides.count(g) > 1})
    if duplicates:
        raise ConfigError(f"guide families must be distinct, {duplicates} appear more than once")
    with torch.random.fork_rng(devices=[]):  # building a flow draws its initial weights: leave the caller's RNG be
        for guide in guides:
            make_family(guide, latent_dim)  # unknown names and bad specs fail here, before any training
    return guides


def _check_counts(seeds, nll_k, nll_images) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise ConfigError("seeds must be a non-empty list of integers >= 0, got []")
    for seed in seeds:
        check_int("every seed", seed, low=0, high=SEED_MAX, why="numpy seeds are 32-bit")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct, got {seeds!r}")
    check_int("nll_k (particles per image)", nll_k, low=1, allow_none=True)
    check_int("nll_images (None: all test images)", nll_images, low=1, allow_none=True)
    return seeds


def _check_data(data: Dataset, config: RunConfig) -> None:
    """What every run's :func:`~pyro_vae.train.fit` would refuse, refused once before anything is written."""
    check_batch_size(data.x_train.shape[0], config.train.batch_size)
    check_likelihood_data(data, config.data.binarize, make_likelihood(config.model.likelihood))


def _check_out_dir(out: Path, jobs: Sequence[_Job], overwrite: bool) -> None:
    """Refuse an output directory that is a file, or that holds an earlier comparison's results (unless
    ``overwrite``), before any run starts; so a comparison never stops half-way on a run directory in use."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"the comparison's output {out} exists and is not a directory; choose another out_dir")
    if overwrite:
        return
    held = [out / name for name in COMPARE_FILES[1:] if (out / name).exists()]
    held += [job.run_dir for job in jobs if job.run_dir is not None and job.run_dir.exists()]
    if held:
        raise ConfigError(
            f"{out} already holds a comparison ({held[0]} exists); pass overwrite=True (--overwrite) to replace it, "
            "or choose another out_dir"
        )


def _write_manifest(out: Path, config: RunConfig, guides: Sequence[str], seeds: Sequence[int]) -> None:
    """``config.json``: what is being compared and on what software, written before the first run."""
    record = {
        "config": config.to_dict(),
        "guides": list(guides),
        "seeds": list(seeds),
        "environment": environment_info(),
    }
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "config.json", lambda f: f.write(text.encode()))


def compare(
    guides: Sequence[str],
    config: RunConfig | None = None,
    seeds: Sequence[int] = (0,),
    *,
    data: Dataset | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    isolate: bool = False,
    nll_k: int | None = 1000,
    nll_images: int | None = None,
) -> CompareResult:
    """Train every family in ``guides`` with every seed under the same protocol, and tabulate.

    Everything is checked first (the arguments, the data against the config, the output directory); a refused
    comparison writes nothing.

    :param guides: family specs, e.g. ``["mvn_diag", "full_rank", "low_rank:4", "iaf:2"]``.
    :param config: the shared run configuration (default :class:`~pyro_vae.config.RunConfig()`); its
        ``model.guide`` and ``train.seed`` are set per run.
    :param seeds: the seeds, each an integer ≥ 0.
    :param data: the data set; default: loaded from ``config.data`` (once here to check it, and again in each run's
        process when ``isolate``).
    :param out_dir: where ``config.json`` (the configuration, families, seeds and software versions), each run's
        directory (``runs/<guide>-seed<s>``) and the tables (``compare.md``, ``compare.csv``, ``runs.csv``) are
        written; ``None`` writes nothing.
    :param bool overwrite: replace an earlier comparison in ``out_dir`` (its files and the run directories of the
        runs compared now); default ``False`` refuses such a directory.
    :param bool isolate: run every (family, seed) in a fresh process, one at a time, so that memory is measured per
        run; ``data`` must then be ``None``.
    :param nll_k: particles of the importance-sampled NLL of every run (default 1000); ``None`` skips it.
    :param nll_images: estimate the NLL on the first this many test images (default ``None``: all of them).
    :returns: a :class:`CompareResult`, rows in the order of ``guides``.
    """
    config = config or RunConfig()
    guides = _check_guides(guides, config.model.latent_dim)
    seeds = _check_counts(seeds, nll_k, nll_images)
    if isolate and data is not None:
        raise ConfigError("isolate=True loads the data in each run's process from config.data; pass data=None")
    out = Path(out_dir) if out_dir is not None else None
    jobs = [
        _Job(guide, seed, None if out is None else out / "runs" / f"{guide.replace(':', '-')}-seed{seed}")
        for seed in seeds
        for guide in guides
    ]
    if out is not None:
        _check_out_dir(out, jobs, overwrite)
    checked = data if data is not None else load_dataset(config.data)
    _check_data(checked, config)
    if out is not None:
        _write_manifest(out, config, guides, seeds)
    runs = _run_jobs(jobs, config, None if isolate else checked, nll_k, nll_images, overwrite)
    result = CompareResult(summarise(guides, runs), runs, config, runs[0].dataset, isolate, nll_k)
    if out is not None:
        result.write(out)
    return result


def _run_jobs(jobs, config, data: Dataset | None, nll_k, nll_images, overwrite: bool) -> list[SeedRun]:
    """Every job in order: in this process with ``data``, or each in a fresh process when ``data`` is ``None``."""
    runs = []
    for job in jobs:
        if data is None:
            context = multiprocessing.get_context("spawn")
            # a fresh process per run (max_tasks_per_child would need Python 3.11)
            with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                runs.append(pool.submit(_run, job, config, None, nll_k, nll_images, overwrite).result())
        else:
            runs.append(_run(job, config, data, nll_k, nll_images, overwrite))
        logger.info("%s seed %d: test ELBO %s", job.guide, job.seed, runs[-1].test_elbo)
    return runs
