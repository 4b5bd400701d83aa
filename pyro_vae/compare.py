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
  read from Linux's high-water mark ``VmHWM`` after resetting it (``/proc/self/clear_refs``, value 5) at the start
  of the run: peak RSS minus RSS at the start, in MiB; the maximum over seeds. A tiny warm-up step with the same
  family, objective and optimiser runs first, so that one-time library initialisation is not counted.
  ``tracemalloc`` cannot see torch's allocations, and ``ru_maxrss`` cannot be reset. With ``isolate=True`` (the
  default of ``pyro-vae compare``) each run has a fresh process, so the figure does not depend on what ran before;
  in-process it is a lower bound, as the heap reuses memory that earlier runs freed. On systems without ``/proc``
  it is not measured (``None``).

- **IS-NLL** (``nll_k`` particles, 1000 by default): :math:`-\log p(x)` estimated by the importance-weighted bound
  of :func:`pyro_vae.evaluation.evaluate` with the family's own q as the proposal (nats per image, on the same
  binarised test split; evaluation seed = the run's seed), mean over seeds ± standard error over seeds. It is an
  upper bound on the true NLL that tightens as q improves, so it compares the *models* the families trained, while
  the ELBO also charges each family for its own inference gap. Its time is not part of the seconds per epoch, nor
  its memory part of the peak. ``nll_images`` restricts it to the first test images (K forward passes of the
  decoder per image make it cost far more than training on a CPU); the table says how many.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import logging
import math
import multiprocessing
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from pyro.infer import SVI

from pyro_vae.config import ModelConfig, RunConfig
from pyro_vae.data import Dataset, binarize_eval, derive_seed, load_dataset
from pyro_vae.errors import ConfigError, NonFiniteLossError
from pyro_vae.evaluation import DataProtocol, MeanSE, evaluate, evaluate_elbo
from pyro_vae.guides import make_family
from pyro_vae.model import VAE
from pyro_vae.objectives import make_objective
from pyro_vae.optim import adamw
from pyro_vae.train import fit

logger = logging.getLogger(__name__)

__all__ = ["SeedRun", "CompareRow", "CompareResult", "compare", "initial_vae", "REFERENCE_GUIDE"]

#: The family that the time ratio is measured against.
REFERENCE_GUIDE = "mvn_diag"


class SeedRun(NamedTuple):
    """One training run of one family with one seed.

    :ivar guide: the family spec, e.g. ``"low_rank:4"``.
    :ivar seed: the run's seed.
    :ivar test_elbo: test ELBO after the last epoch, mean over test images ± standard error.
    :ivar epoch_seconds: training seconds of each epoch.
    :ivar peak_memory_mib: resident-set growth during the run (see the module docstring), or ``None``.
    :ivar num_params: the family's raw width (the encoder head's output width).
    :ivar num_weights: trainable numbers in the VAE (encoder, decoder, family).
    :ivar steps: optimiser steps taken.
    :ivar dataset: the data set's name.
    :ivar nll: importance-sampled NLL after the last epoch, mean over test images ± standard error (``None`` when
        not evaluated).
    :ivar nll_seconds: seconds the NLL evaluation took (``None`` when not evaluated).
    :ivar nll_images: test images the NLL was estimated on.
    :ivar failure: ``None`` for a completed run; for a run that diverged (a non-finite loss or gradient, see
        :class:`~pyro_vae.errors.NonFiniteLossError`), the error message, and then ``test_elbo`` is NaN.
    """

    guide: str
    seed: int
    test_elbo: MeanSE
    epoch_seconds: tuple[float, ...]
    peak_memory_mib: float | None
    num_params: int
    num_weights: int
    steps: int
    dataset: str
    nll: MeanSE | None = None
    nll_seconds: float | None = None
    nll_images: int | None = None
    failure: str | None = None


class CompareRow(NamedTuple):
    """One family's line of the comparison table.

    :ivar guide: the family spec.
    :ivar num_params: raw width per data point.
    :ivar num_weights: trainable numbers in the VAE.
    :ivar test_elbo: test ELBO, mean over seeds ± standard error over seeds (``se`` is NaN with one seed).
    :ivar seconds_per_epoch: median training seconds per epoch over all epochs of all seeds.
    :ivar time_ratio: ``seconds_per_epoch`` over the reference family's (``None`` when it was not compared).
    :ivar peak_memory_mib: largest resident-set growth over the seeds, or ``None`` where it cannot be measured.
    :ivar seeds: number of seeds.
    :ivar nll: IS-NLL, mean over seeds ± standard error over seeds, or ``None`` when not evaluated.
    :ivar diverged: runs that stopped on a non-finite loss or gradient; the statistics above cover the others.
    """

    guide: str
    num_params: int
    num_weights: int
    test_elbo: MeanSE
    seconds_per_epoch: float
    time_ratio: float | None
    peak_memory_mib: float | None
    seeds: int
    nll: MeanSE | None = None
    diverged: int = 0


_HEADER = ("guide", "raw width", "weights", "test ELBO (nats)", "s/epoch", f"× {REFERENCE_GUIDE}", "peak RSS (MiB)")
_NLL_HEADER = "IS-NLL (nats)"


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _fmt_mean_se(value: MeanSE | None) -> str:
    if value is None or math.isnan(value.mean):
        return "n/a"
    return f"{value.mean:.2f} ± {_fmt(value.se, '.2f')}"


class CompareResult(NamedTuple):
    """The outcome of :func:`compare`: one :class:`CompareRow` per family, in the order given, and every run.

    :ivar rows: the table.
    :ivar runs: the (family, seed) runs behind it.
    :ivar config: the run configuration shared by every run (its model guide and train seed are per run).
    :ivar dataset: the data set's name.
    :ivar isolated: whether each run had its own process.
    :ivar nll_k: particles of the IS-NLL, or ``None`` when it was not evaluated.
    """

    rows: list[CompareRow]
    runs: list[SeedRun]
    config: RunConfig
    dataset: str
    isolated: bool
    nll_k: int | None = None

    def _header(self) -> tuple[str, ...]:
        if self.nll_k is None:
            return _HEADER
        return (*_HEADER[:4], f"IS-NLL k={self.nll_k} (nats)", *_HEADER[4:])

    def _cells(self) -> list[tuple[str, ...]]:
        cells = []
        for row in self.rows:
            nll = () if self.nll_k is None else (_fmt_mean_se(row.nll),)
            diverged = f" ({row.diverged} of {row.seeds} runs diverged)" if row.diverged else ""
            cells.append(
                (
                    row.guide,
                    str(row.num_params),
                    str(row.num_weights),
                    _fmt_mean_se(row.test_elbo) + diverged,
                    *nll,
                    _fmt(row.seconds_per_epoch, ".2f"),
                    _fmt(row.time_ratio, ".2f"),
                    _fmt(row.peak_memory_mib, ".0f"),
                )
            )
        return cells

    def protocol(self) -> str:
        """One paragraph that says what was run and what the columns mean."""
        tc, mc, dc = self.config.train, self.config.model, self.config.data
        seeds = sorted({run.seed for run in self.runs})
        nll = (
            ""
            if self.nll_k is None
            else f"; IS-NLL: importance-weighted bound with k={self.nll_k} draws from q per image on the first "
            f"{self.runs[0].nll_images} test images, likewise"
        )
        return (
            f"{self.dataset}, binarize={dc.binarize}; L={mc.latent_dim}, hidden {','.join(map(str, mc.hidden_dims))}, "
            f"{mc.likelihood} likelihood; {tc.epochs} epochs of batch {tc.batch_size}"
            f"{'' if tc.max_steps is None else f' (at most {tc.max_steps} steps)'}, AdamW lr {tc.lr:g}, "
            f"objective {tc.objective} with {tc.num_particles} particle(s); seeds {seeds}; "
            f"{'one process per run' if self.isolated else 'all runs in one process'}, "
            f"{tc.threads if tc.threads is not None else torch.get_num_threads()} torch thread(s). "
            "Test ELBO after the last epoch: mean over seeds ± standard error over seeds"
            f"{nll}"
            ". s/epoch: median training "
            f"time of an epoch (SVI steps, no evaluation) over all epochs and seeds; × {REFERENCE_GUIDE}: its ratio "
            f"to {REFERENCE_GUIDE}'s. Peak RSS: growth of the resident set during a run (VmHWM after a reset, minus "
            "RSS at the start), the largest over seeds. Raw width: encoder outputs per image; weights: trainable "
            "numbers of the VAE."
        )

    def table(self) -> str:
        """The table as aligned plain text."""
        header = self._header()
        cells = [header, *self._cells()]
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            for row in cells
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """A Markdown document: the protocol, then the table."""
        lines = ["# Guide families compared", "", self.protocol(), ""]
        header = self._header()
        lines.append("| " + " | ".join(header) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in header[1:]) + " |")
        lines += ["| " + " | ".join(cells) + " |" for cells in self._cells()]
        failed = [run for run in self.runs if run.failure is not None]
        if failed:
            lines += ["", "Runs that diverged (left out of the statistics):", ""]
            lines += [f"- {run.guide}, seed {run.seed}: {run.failure}" for run in failed]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """The table as CSV, with full precision."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(
            [
                "guide",
                "num_params",
                "num_weights",
                "test_elbo_mean",
                "test_elbo_se",
                "seeds",
                "seconds_per_epoch_median",
                f"time_ratio_to_{REFERENCE_GUIDE}",
                "peak_rss_growth_mib",
                "nll_k",
                "nll_mean",
                "nll_se",
                "diverged",
            ]
        )
        for row in self.rows:
            writer.writerow(
                [
                    row.guide,
                    row.num_params,
                    row.num_weights,
                    repr(row.test_elbo.mean),
                    repr(row.test_elbo.se),
                    row.seeds,
                    repr(row.seconds_per_epoch),
                    "" if row.time_ratio is None else repr(row.time_ratio),
                    "" if row.peak_memory_mib is None else repr(row.peak_memory_mib),
                    "" if self.nll_k is None else self.nll_k,
                    "" if row.nll is None else repr(row.nll.mean),
                    "" if row.nll is None else repr(row.nll.se),
                    row.diverged,
                ]
            )
        return out.getvalue()

    def runs_csv(self) -> str:
        """Every (family, seed) run as CSV."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(
            [
                "guide",
                "seed",
                "test_elbo",
                "test_elbo_se",
                "median_epoch_seconds",
                "peak_rss_growth_mib",
                "nll",
                "nll_se",
                "nll_seconds",
                "failure",
            ]
        )
        for run in self.runs:
            writer.writerow(
                [
                    run.guide,
                    run.seed,
                    repr(run.test_elbo.mean),
                    repr(run.test_elbo.se),
                    repr(statistics.median(run.epoch_seconds)) if run.epoch_seconds else "",
                    "" if run.peak_memory_mib is None else repr(run.peak_memory_mib),
                    "" if run.nll is None else repr(run.nll.mean),
                    "" if run.nll is None else repr(run.nll.se),
                    "" if run.nll_seconds is None else repr(run.nll_seconds),
                    run.failure or "",
                ]
            )
        return out.getvalue()

    def write(self, out_dir: str | Path) -> list[Path]:
        """Write ``compare.md``, ``compare.csv`` and ``runs.csv`` into ``out_dir``; returns the paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, text in (
            ("compare.md", self.to_markdown()),
            ("compare.csv", self.to_csv()),
            ("runs.csv", self.runs_csv()),
        ):
            path = out_dir / name
            path.write_text(text)
            paths.append(path)
        return paths


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


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


class _PeakRSS:
    """Resident-set growth over a block: ``VmHWM`` (reset on entry through ``/proc/self/clear_refs``) minus ``VmRSS``
    on entry, in MiB; ``None`` where ``/proc`` does not offer it."""

    def __enter__(self) -> _PeakRSS:
        self.peak_mib: float | None = None
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
            self._start = _proc_status_kib("VmRSS")
        except OSError as err:
            logger.warning("peak memory is not measured: resetting the RSS high-water mark failed (%s)", err)
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        if self._start is not None:
            self.peak_mib = (_proc_status_kib("VmHWM") - self._start) / 1024


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


def _run(
    guide: str,
    seed: int,
    config: RunConfig,
    data: Dataset | None,
    run_dir: Path | None,
    nll_k: int | None,
    nll_images: int | None,
) -> SeedRun:
    """Train one family with one seed, then estimate its NLL; loads the data when not given (in a child process)."""
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    if data is None:
        data = load_dataset(config.data)
    run_config = config.replace(model={"guide": guide}, train={"seed": seed})
    vae = initial_vae(run_config.model, data.input_dim, seed)
    _warm_up(run_config, data.input_dim)
    num_weights = sum(p.numel() for p in vae.parameters() if p.requires_grad)
    failure = None
    with _PeakRSS() as memory:
        try:
            result = fit(vae, data, run_config, out_dir=run_dir)
        except NonFiniteLossError as err:
            # a family that diverges under the shared protocol is a result to report, not a reason to lose the others
            logger.warning("%s seed %d diverged: %s", guide, seed, err)
            failure = str(err)
    if failure is not None:
        return SeedRun(
            guide=guide,
            seed=seed,
            test_elbo=MeanSE(math.nan, math.nan),
            epoch_seconds=(),
            peak_memory_mib=memory.peak_mib,
            num_params=vae.family.num_params,
            num_weights=num_weights,
            steps=0,
            dataset=data.name,
            failure=failure,
        )
    if not result.epochs:
        raise ConfigError(f"the run of {guide} with seed {seed} finished no epoch; raise --max-steps or --epochs")
    nll = nll_seconds = None
    if nll_k is not None:
        dc = run_config.data
        x_test = binarize_eval(data.x_test, dc.binarize, seed, dc.threshold)[:nll_images]  # the ELBO's images
        x_test = x_test.to(next(vae.parameters()).device)
        protocol = DataProtocol(data.name, "test", dc.binarize, None if dc.binarize == "none" else seed)
        start = time.perf_counter()
        nll = evaluate(vae, x_test, ks=(nll_k,), protocol=protocol, seed=seed).nll
        nll_seconds = time.perf_counter() - start
        nll_images = x_test.shape[0]
    return SeedRun(
        guide=guide,
        seed=seed,
        test_elbo=result.test_elbo,
        epoch_seconds=tuple(e.seconds for e in result.epochs),
        peak_memory_mib=memory.peak_mib,
        num_params=vae.family.num_params,
        num_weights=num_weights,
        steps=result.steps,
        dataset=data.name,
        nll=nll,
        nll_seconds=nll_seconds,
        nll_images=nll_images,
    )


def _summarise(guides: Sequence[str], runs: list[SeedRun]) -> list[CompareRow]:
    rows = []
    for guide in guides:
        everyone = [run for run in runs if run.guide == guide]
        mine = [run for run in everyone if run.failure is None]
        elbos = [run.test_elbo.mean for run in mine]
        elbo = MeanSE(
            statistics.fmean(elbos) if elbos else math.nan,
            statistics.stdev(elbos) / math.sqrt(len(elbos)) if len(elbos) > 1 else math.nan,
        )
        seconds = [s for run in mine for s in run.epoch_seconds]
        memory = [run.peak_memory_mib for run in mine if run.peak_memory_mib is not None]
        nlls = [run.nll.mean for run in mine if run.nll is not None]
        nll = None
        if nlls:
            nll = MeanSE(
                statistics.fmean(nlls), statistics.stdev(nlls) / math.sqrt(len(nlls)) if len(nlls) > 1 else math.nan
            )
        rows.append(
            CompareRow(
                guide=guide,
                num_params=everyone[0].num_params,
                num_weights=everyone[0].num_weights,
                test_elbo=elbo,
                seconds_per_epoch=statistics.median(seconds) if seconds else math.nan,
                time_ratio=None,
                peak_memory_mib=max(memory) if memory else None,
                seeds=len(everyone),
                nll=nll,
                diverged=len(everyone) - len(mine),
            )
        )
    reference = next((row for row in rows if row.guide == REFERENCE_GUIDE), None)
    if reference is not None:
        rows = [row._replace(time_ratio=row.seconds_per_epoch / reference.seconds_per_epoch) for row in rows]
    return rows


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


def compare(
    guides: Sequence[str],
    config: RunConfig | None = None,
    seeds: Sequence[int] = (0,),
    *,
    data: Dataset | None = None,
    out_dir: str | Path | None = None,
    isolate: bool = False,
    nll_k: int | None = 1000,
    nll_images: int | None = None,
) -> CompareResult:
    """Train every family in ``guides`` with every seed under the same protocol, and tabulate.

    :param guides: family specs, e.g. ``["mvn_diag", "full_rank", "low_rank:4", "iaf:2"]``.
    :param config: the shared run configuration (default :class:`~pyro_vae.config.RunConfig()`); its
        ``model.guide`` and ``train.seed`` are set per run.
    :param seeds: the seeds, each an integer ≥ 0.
    :param data: the data set; default: loaded from ``config.data`` (in each run's process when ``isolate``).
    :param out_dir: where each run writes its run directory (``runs/<guide>-seed<s>``) and the tables are written
        (``compare.md``, ``compare.csv``, ``runs.csv``); ``None`` writes nothing.
    :param bool isolate: run every (family, seed) in a fresh process, one at a time, so that memory is measured per
        run; the data are then loaded in each process, and ``data`` must be ``None``.
    :param nll_k: particles of the importance-sampled NLL of every run (default 1000); ``None`` skips it.
    :param nll_images: estimate the NLL on the first this many test images (default ``None``: all of them).
    :returns: a :class:`CompareResult`, rows in the order of ``guides``.
    """
    config = config or RunConfig()
    guides = _check_guides(guides, config.model.latent_dim)
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct, got {seeds!r}")
    if nll_k is not None and (isinstance(nll_k, bool) or not isinstance(nll_k, int) or nll_k <= 0):
        raise ConfigError(f"nll_k must be a positive integer (particles per image) or None, got {nll_k!r}")
    if nll_images is not None and (isinstance(nll_images, bool) or not isinstance(nll_images, int) or nll_images <= 0):
        raise ConfigError(f"nll_images must be a positive integer or None (all test images), got {nll_images!r}")
    if isolate and data is not None:
        raise ConfigError("isolate=True loads the data in each run's process from config.data; pass data=None")
    if not isolate and data is None:
        data = load_dataset(config.data)
    out = Path(out_dir) if out_dir is not None else None
    jobs = [
        (guide, seed, None if out is None else out / "runs" / f"{guide.replace(':', '-')}-seed{seed}")
        for seed in seeds
        for guide in guides
    ]
    runs: list[SeedRun] = []
    if isolate:
        context = multiprocessing.get_context("spawn")
        for guide, seed, run_dir in jobs:
            # a fresh process per run (max_tasks_per_child would need Python 3.11)
            with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                runs.append(pool.submit(_run, guide, seed, config, None, run_dir, nll_k, nll_images).result())
            logger.info("%s seed %d: test ELBO %s", guide, seed, runs[-1].test_elbo)
    else:
        for guide, seed, run_dir in jobs:
            runs.append(_run(guide, seed, config, data, run_dir, nll_k, nll_images))
            logger.info("%s seed %d: test ELBO %s", guide, seed, runs[-1].test_elbo)
    result = CompareResult(_summarise(guides, runs), runs, config, runs[0].dataset, isolate, nll_k)
    if out is not None:
        result.write(out)
    return result
